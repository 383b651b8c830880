"""Exact implicit differentiation (implicit function theorem)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..solvers.base import Solver, _check_budget, get_solver, solve
from .base import Backward, register


@register("implicit")
@dataclass(frozen=True)
class Implicit(Backward):
    """Exact gradient of the fixed point by the implicit function theorem.

    At ``z* = f(z*, x)``, ``dz*/dtheta = (I - J)^{-1} df/dtheta`` with
    ``J = df/dz (z*)``. The backward solves the adjoint fixed-point equation::

        g = J^T g + dL/dz*

    with a registered solver (each iteration one VJP through the single graph of
    ``f`` re-attached at the returned ``z*``), then pushes ``g`` through that same
    graph for the gradients of ``theta`` and ``x``. Memory: one graph of ``f``;
    cost: ``backward.nstep`` VJPs plus one.

    Args:
        solver: solver object or name for the adjoint equation.
        tol: tolerance of the adjoint solve.
        max_iter: iteration budget of the adjoint solve.
        stop_mode: ``"rel"`` or ``"abs"``.
        atol: ``rel`` mode only: the absolute term of the adjoint solve's stop
            test (see :func:`deq.solve`); default 0.

    Raises:
        ValueError: unknown solver name, ``tol <= 0``, ``max_iter < 1``.

    Example:
        >>> layer = DEQLayer(f, backward=Implicit(solver="broyden", tol=1e-6, max_iter=35))

    References:
        Bai, Kolter, Koltun, Deep Equilibrium Models, NeurIPS 2019.
    """

    solver: Solver | str = "anderson"
    tol: float = 1e-6
    max_iter: int = 50
    stop_mode: str = "rel"
    atol: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", get_solver(self.solver))
        _check_budget(self.tol, self.max_iter, self.stop_mode, self.atol)

    def adjoint(self, vjp, v, report):
        res = solve(lambda u: vjp(u) + v, torch.zeros_like(v), solver=self.solver, tol=self.tol,
                    max_iter=self.max_iter, stop_mode=self.stop_mode, atol=self.atol, stage="backward")
        if report is not None:
            report(res)
        return res.z
