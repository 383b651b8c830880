"""Limited-memory Broyden's method with an optional Armijo line search."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Solver, register


def _apply(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """``H x`` with ``H = -I + sum_i u_i v_i^T`` stored as rows of ``U``, ``V`` (B, mem, D)."""
    return torch.bmm(U.transpose(1, 2), torch.bmm(V, x[:, :, None])).squeeze(2) - x


def _apply_t(U: Tensor, V: Tensor, x: Tensor) -> Tensor:
    """``H^T x``."""
    return torch.bmm(V.transpose(1, 2), torch.bmm(U, x[:, :, None])).squeeze(2) - x


@register("broyden")
@dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's ("good") method on ``g(z) = f(z) - z`` with a low-rank inverse Jacobian.

    Keeps ``H ~ J_g^{-1} = -I + sum_i u_i v_i^T`` with at most ``memory`` rank-one
    terms in fixed-size buffers (a ring: the oldest term is overwritten), so its
    working memory is ``2 * memory * B * D`` whatever ``max_iter`` is. Per step::

        d = -H g(z);  z' = z + alpha d
        s = z' - z,  y = g(z') - g(z)
        H <- H + (s - H y) (s^T H) / (s^T H y)

    When the update degenerates (``|s^T H y|`` tiny against ``|s| |H y|``, or not
    finite) the sample restarts from ``H = -I``. With ``line_search=True``,
    ``alpha`` backtracks from 1 by halves until the Armijo-type sufficient
    decrease ``||g(z')|| <= (1 - c alpha) ||g(z)||`` holds (``c = 1e-4``), per
    sample, at most ``max_ls_iter`` tries; every trial is an f-call counted in
    ``nstep`` for the samples still searching.

    Args:
        memory: number of rank-one terms kept, ``memory >= 1``.
        line_search: backtracking Armijo line search on the step length.
        max_ls_iter: trials per line search, ``>= 1``.

    Raises:
        ValueError: ``memory < 1`` or ``max_ls_iter < 1``.

    Example:
        >>> res = solve(f, z0, solver=Broyden(memory=20, line_search=True))

    References:
        Broyden, A class of methods for solving nonlinear simultaneous
        equations, Math. Comp. 1965; Bai, Kolter, Koltun, Deep Equilibrium
        Models, 2019.
    """

    memory: int = 20
    line_search: bool = False
    max_ls_iter: int = 5

    _ARMIJO_C = 1e-4
    _DEGENERATE = 1e-10

    def __post_init__(self) -> None:
        for name in ("memory", "max_ls_iter"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")

    def init(self, z: Tensor, fz: Tensor) -> dict:
        batch, dim = z.shape
        new = dict(dtype=z.dtype, device=z.device)
        return {"U": torch.zeros(batch, self.memory, dim, **new),
                "V": torch.zeros(batch, self.memory, dim, **new), "k": 0}

    def _search(self, z, g, d, active, evaluate):
        """Backtracking from alpha = 1; returns the accepted (z', f(z'))."""
        g_norm = torch.linalg.vector_norm(g, dim=1)
        searching = active.clone()
        z_try = z + d
        fz_try = evaluate(z_try, searching)
        alpha = 1.0
        for _ in range(self.max_ls_iter - 1):
            g_try = torch.linalg.vector_norm(fz_try - z_try, dim=1)
            searching &= ~(g_try <= (1 - self._ARMIJO_C * alpha) * g_norm)
            if not searching.any():
                break
            alpha *= 0.5
            z_try = torch.where(searching[:, None], z + alpha * d, z_try)
            fz_try = evaluate(z_try, searching)
        return z_try, fz_try

    def step(self, state, z, fz, active, evaluate):
        U, V, k = state["U"], state["V"], state["k"]
        g = fz - z
        d = (-_apply(U, V, g)).where(active[:, None], torch.zeros_like(g))
        if self.line_search:
            z_new, fz_new = self._search(z, g, d, active, evaluate)
        else:
            z_new = z + d
            fz_new = evaluate(z_new, active)
        s = z_new - z
        y = (fz_new - z_new) - g
        Hy = _apply(U, V, y)
        v = _apply_t(U, V, s)
        denom = (v * y).sum(dim=1)
        size = torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(Hy, dim=1)
        ok = active & torch.isfinite(denom) & (denom.abs() > self._DEGENERATE * size) & (size > 0)
        u = ((s - Hy) / torch.where(ok, denom, torch.ones_like(denom))[:, None])
        keep = ok[:, None]
        slot = k % self.memory
        # Degenerate samples restart from H = -I: clear their terms.
        U.mul_(keep[:, :, None] | active.logical_not()[:, None, None])
        V.mul_(keep[:, :, None] | active.logical_not()[:, None, None])
        U[:, slot] = torch.where(keep, u, U[:, slot])
        V[:, slot] = torch.where(keep, v, V[:, slot])
        return {"U": U, "V": V, "k": k + 1}, z_new, fz_new
