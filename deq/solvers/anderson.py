"""Anderson acceleration (type II) with a scale-aware ridge."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Solver, register


@register("anderson")
@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration, type II (Walker and Ni, 2011), in difference form.

    With ``g(z) = f(z) - z`` and the last ``m`` differences
    ``dZ = [z_{i+1} - z_i]``, ``dG = [g_{i+1} - g_i]`` stored as columns, each step
    solves the regularised least-squares problem per sample::

        gamma = argmin ||g_k - dG gamma||^2 + lam * s * ||gamma||^2
        z_{k+1} = z_k + beta * g_k - (dZ + beta * dG) gamma

    where ``s = max_i ||dG_i||^2`` scales the ridge to the problem: an absolute
    ridge dominates the Gram matrix once residuals are small and turns Anderson
    into slow averaging exactly at tight tolerances. The ``m x m`` Gram matrix is
    updated one column per step (``O(m D)`` work, not ``O(m^2 D)``). A sample
    whose system is singular or gives a non-finite ``gamma`` falls back to the
    plain mixing step ``z + beta * g`` for that iteration (never a crash).

    Args:
        m: history size (number of stored differences), ``m >= 1``.
        lam: relative ridge ``lam >= 0`` (see above).
        beta: mixing parameter ``beta > 0``; 1 is undamped.

    Raises:
        ValueError: ``m < 1``, ``lam < 0`` or ``beta <= 0``.

    Example:
        >>> res = solve(f, z0, solver=Anderson(m=5, lam=1e-4, beta=1.0), tol=1e-6)

    References:
        Walker, Ni, Anderson acceleration for fixed-point iterations, SIAM J.
        Numer. Anal. 2011; Bai, Kolter, Koltun, Deep Equilibrium Models, 2019.
    """

    m: int = 5
    lam: float = 1e-4
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"m must be an integer >= 1, got {self.m!r}")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")

    def init(self, z: Tensor, fz: Tensor) -> dict:
        batch, dim = z.shape
        new = dict(dtype=z.dtype, device=z.device)
        return {
            "z": z, "g": fz - z, "k": 0,
            "dZ": torch.zeros(batch, self.m, dim, **new),
            "dG": torch.zeros(batch, self.m, dim, **new),
            "gram": torch.zeros(batch, self.m, self.m, **new),
        }

    def step(self, state, z, fz, active, evaluate):
        g = fz - z
        k = state["k"]
        dZ, dG, gram = state["dZ"], state["dG"], state["gram"]
        if k > 0:
            slot = (k - 1) % self.m
            dZ[:, slot] = z - state["z"]
            dG[:, slot] = g - state["g"]
            col = torch.bmm(dG, dG[:, slot, :, None]).squeeze(2)  # (B, m)
            gram[:, slot, :] = col
            gram[:, :, slot] = col
        n = min(k, self.m)
        z_new = z + self.beta * g
        if n > 0:
            G, Z, A = dG[:, :n], dZ[:, :n], gram[:, :n, :n]
            rhs = torch.bmm(G, g[:, :, None])  # (B, n, 1)
            scale = A.diagonal(dim1=1, dim2=2).amax(dim=1)
            ridge = self.lam * scale + torch.finfo(z.dtype).tiny
            A = A + ridge[:, None, None] * torch.eye(n, dtype=z.dtype, device=z.device)
            gamma, info = torch.linalg.solve_ex(A, rhs)
            ok = (info == 0) & torch.isfinite(gamma).all(dim=(1, 2))
            gamma = torch.where(ok[:, None, None], gamma, torch.zeros_like(gamma))
            z_new = z_new - torch.bmm(gamma.transpose(1, 2), Z + self.beta * G).squeeze(1)
        z_new = z_new.where(active[:, None], z)
        return {**state, "z": z, "g": g, "k": k + 1}, z_new, evaluate(z_new, active)
