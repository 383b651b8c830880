"""Exact implicit differentiation (implicit function theorem)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..solvers.base import Solver, SolverResult, _check_budget, get_solver, solve
from .base import Backward, ConvergenceError, register

DIVERGENCE_POLICIES = ("zero", "jfb", "raise")

# The adjoint tolerance never asked for below this, whatever the dtype (the
# float32/float64 default since the first release).
_TIGHTEST_DEFAULT_TOL = 1e-6


def default_tol(dtype: torch.dtype) -> float:
    """The adjoint tolerance ``Implicit(tol=None)`` uses when ``f`` runs in ``dtype``.

    ``max(1e-6, u)`` with ``u = torch.finfo(dtype).eps / 2`` the unit roundoff:
    ``1e-6`` for float32 and float64, ``4.9e-4`` for float16, ``3.9e-3`` for
    bfloat16. Each VJP rounds to ``dtype``, so the relative residual of the
    adjoint stalls at a floor set by that rounding; a tolerance below the floor
    is never reached and every backward runs to ``max_iter``. Measured under
    CPU autocast on tanh cells (width 8 to 256, ``||W||_2`` 0.5 and 0.9,
    FixedPoint/Anderson/Broyden, 16 samples), the worst sample's floor was at
    most ``1.3e-3`` (bf16) and ``1.2e-4`` (fp16), and stopping at ``u`` instead
    of the floor raised the gradient's error against float64 by 10 to 20% of
    the error bf16/fp16 already carry (5e-3 and 6e-4).
    """
    return max(_TIGHTEST_DEFAULT_TOL, torch.finfo(dtype).eps / 2)


@register("implicit")
@dataclass(frozen=True)
class Implicit(Backward):
    """Exact gradient of the fixed point by the implicit function theorem.

    At ``z* = f(z*, x)``, ``dz*/dtheta = (I - J)^{-1} df/dtheta`` with
    ``J = df/dz (z*)``. The backward solves the adjoint fixed-point equation::

        g = J^T g + v,    v = dL/dz*

    from ``g = 0`` with a registered solver (each iteration one VJP through the
    single graph of ``f`` re-attached at the returned ``z*``), then pushes ``g``
    through that same graph for the gradients of ``theta`` and ``x``. Memory:
    one graph of ``f``; cost: ``backward.n_iter`` VJPs plus one, plus one more
    when a sample did not converge (the divergence check below); backward
    hooks registered inside ``f`` fire on each of them.

    A backward solve that did not reach ``tol`` is counted and warned about by
    the layer (``on_nonconvergence``); its best iterate is used. One that
    *diverged* is handled by ``on_divergence``. A sample diverged when its solve
    did not converge and the adjoint it returns satisfies the equation no
    better than the trivial ``g = 0`` does::

        ||J^T g + v - g|| >= ||v||      (absolute residuals, one extra VJP)

    The solve made no progress at all (a growing iteration, as for a spectral
    radius of ``J`` above 1, ends there whichever iterate is kept), so its
    answer carries no information; without this rule such a solve returned
    its most diverged iterate as the gradient (8.5e8 where the exact value is
    -2 for ``f(z) = 1.5 z + x``). The check costs one VJP, and only when some
    sample did not converge.

    Args:
        solver: solver object or name for the adjoint equation; default
            ``"anderson"``, i.e. ``Anderson(m=5, lam=1e-4, beta=1.0)``.
        tol: tolerance of the adjoint solve in ``stop_mode``; ``None`` (the
            default) takes :func:`default_tol` of the narrowest dtype ``f``
            runs in (its state's dtype, or the autocast dtype when ``f`` was
            re-attached under autocast): ``1e-6`` for float32/float64,
            ``4.9e-4`` for float16, ``3.9e-3`` for bfloat16. An ``f`` that
            casts to a narrower dtype by itself should be given ``tol``.
        max_iter: iteration budget of the adjoint solve (default 50).
        stop_mode: ``"rel"`` (default) or ``"abs"``.
        atol: ``rel`` mode only: the absolute term of the adjoint solve's stop
            test (see :func:`deq.solve`); default 0.
        on_divergence: what the gradient of a diverged sample becomes:

            * ``"zero"`` (default): its adjoint is set to 0, so the sample adds
              nothing to the gradients of ``theta`` and ``x`` (the
              ``GradScaler`` way: skip, count, go on). Safe because nothing is
              better than a wrong direction: the other two options assume
              what divergence says is false.
            * ``"jfb"``: its adjoint is ``v``, the Jacobian-free gradient (one
              step of ``f``); a descent direction when ``f`` contracts, of
              either sign when it does not (+1 against the exact -2 above).
            * ``"raise"``: :class:`ConvergenceError` naming the samples.

            The layer counts diverged solves in
            ``layer.counts.backward.diverged`` and warns.

    Raises:
        ValueError: unknown solver name or ``on_divergence``, ``tol <= 0``,
            ``max_iter < 1``.

    Example:
        >>> layer = DEQLayer(f, backward=Implicit(solver="broyden", tol=1e-6, max_iter=35))

    References:
        Bai, Kolter, Koltun, Deep Equilibrium Models, NeurIPS 2019.
    """

    solver: Solver | str = "anderson"
    tol: float | None = None
    max_iter: int = 50
    stop_mode: str = "rel"
    atol: float = 0.0
    on_divergence: str = "zero"

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", get_solver(self.solver))
        _check_budget(_TIGHTEST_DEFAULT_TOL if self.tol is None else self.tol, self.max_iter, self.stop_mode,
                      self.atol)
        if self.on_divergence not in DIVERGENCE_POLICIES:
            raise ValueError(f"unknown on_divergence {self.on_divergence!r}; known: {', '.join(DIVERGENCE_POLICIES)}")

    def adjoint(self, vjp, v, report, *, dtype=torch.float32):
        tol = default_tol(dtype) if self.tol is None else self.tol
        res = solve(lambda u: vjp(u) + v, torch.zeros_like(v), solver=self.solver, tol=tol,
                    max_iter=self.max_iter, stop_mode=self.stop_mode, atol=self.atol, stage="backward")
        g = res.z
        diverged = None if bool(res.converged.all()) else _diverged(vjp, v, g, res.converged)
        if report is not None:
            report(res, diverged)
        if diverged is None or not bool(diverged.any()):
            return g
        if self.on_divergence == "raise":
            raise ConvergenceError(_divergence_message(res, diverged))
        fallback = torch.zeros_like(g) if self.on_divergence == "zero" else v
        return torch.where(diverged[:, None], fallback, g)


def _diverged(vjp, v: Tensor, g: Tensor, converged: Tensor) -> Tensor:
    """(B,) bool: not converged and ``||J^T g + v - g|| >= ||v||`` (no better than ``g = 0``)."""
    gap = torch.linalg.vector_norm(vjp(g) + v - g, dim=1)
    start = torch.linalg.vector_norm(v, dim=1)
    return ~converged & ~(gap < start)  # a NaN gap counts as diverged


def _divergence_message(res: SolverResult, diverged: Tensor) -> str:
    idx = diverged.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:10])) + (f", ... ({len(idx)} in all)" if len(idx) > 10 else "")
    return (f"Implicit backward solve ({res.solver}) diverged for samples [{shown}] in {res.n_iter} iterations: "
            "its adjoint g solves g = J^T g + dL/dz* no better than g = 0 (absolute residual not below "
            "||dL/dz*||); on_divergence='raise'. The Jacobian of f at z* may have a spectral radius >= 1: "
            "consider Jacobian regularisation, or on_divergence='zero'")
