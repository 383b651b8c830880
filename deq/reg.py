"""Stabilisers: Jacobian regularisation (Hutchinson) and the spectral radius (power method)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .grad.base import as_tuple, detached_input
from .solvers.base import State


def _batch_sq_norm(parts: tuple[Tensor, ...]) -> Tensor:
    return sum(p.reshape(p.shape[0], -1).pow(2).sum(dim=1) for p in parts)


def _graph_at(f, z: State, x: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One graph of ``f`` at the detached ``z``: ``(f(z) parts, z parts)`` for VJPs."""
    z_in = detached_input(z)
    with torch.enable_grad():
        fz = as_tuple(f(z_in, x))
    return fz, as_tuple(z_in)


def jacobian_reg(f: Callable[[State, Any], State], z: State, x: Any, *, n_probes: int = 1,
                 generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson estimate of ``||J_f(z)||_F^2 / D``, averaged over the batch.

    ``||J||_F^2 = E_eps ||eps^T J||^2`` for ``eps ~ N(0, I)``; each probe costs one
    VJP with ``create_graph=True``, so the estimate is differentiable with
    respect to the parameters of ``f`` (and ``x``). Add ``gamma * jacobian_reg``
    to the loss to keep the fixed point well conditioned. It builds its own graph
    of ``f`` at ``z`` (detached), so ``z`` must be the fixed point ``z*`` itself
    (``layer.last_result.z``), not the layer's output ``f(z*)``, and ``f`` must
    draw the dropout masks of the solve: ``DEQLayer(...)(x, jac_reg=n)`` does
    both and returns ``(z, jac_loss)``.

    Args:
        f: the equilibrium function, ``f(z, x)``.
        z: the point, the fixed point ``z*`` (detached inside), ``(B, ...)``.
        x: the input of ``f``.
        n_probes: number of Gaussian probe vectors, ``>= 1``.
        generator: optional RNG for the probes.

    Returns:
        A scalar tensor: mean over samples of ``||J_b||_F^2 / D``.

    Raises:
        ValueError: ``n_probes < 1``.

    Example:
        >>> z, jac_loss = layer(x, jac_reg=1)          # evaluated at z*, same masks
        >>> loss = task_loss(z) + 2.0 * jac_loss

    References:
        Bai, Koltun, Kolter, Stabilizing Equilibrium Models by Jacobian
        Regularization, ICML 2021.
    """
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    fz, inputs = _graph_at(f, z, x)
    dim = sum(p[0].numel() for p in inputs)
    with torch.enable_grad():
        total = 0.0
        for _ in range(n_probes):
            eps = tuple(torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=generator) for p in fz)
            vjp = torch.autograd.grad(fz, inputs, eps, create_graph=True, retain_graph=True, allow_unused=True)
            total = total + _batch_sq_norm(tuple(v for v in vjp if v is not None))
    return (total / (n_probes * dim)).mean()


def spectral_radius(f: Callable[[State, Any], State], z: State, x: Any, *, n_iter: int = 30,
                    generator: torch.Generator | None = None) -> Tensor:
    """Power-method estimate of the spectral radius of ``J_f(z)``, per sample.

    Iterates ``u <- J^T u / ||u||`` with VJPs through one graph of ``f`` (``J^T``
    has the spectral radius of ``J``) and returns ``||J^T u|| / ||u||``. For
    monitoring: below 1 means the plain iteration contracts locally. When the
    dominant eigenvalues are a complex pair the estimate oscillates around
    their modulus.

    Args:
        f: the equilibrium function, ``f(z, x)``.
        z: the point (detached inside), ``(B, ...)``.
        x: the input of ``f``.
        n_iter: power iterations, ``>= 1``.
        generator: optional RNG for the start vector.

    Returns:
        ``(B,)`` estimates (no graph).

    Example:
        >>> rho = spectral_radius(layer.f, z, x)   # (B,)
    """
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    fz, inputs = _graph_at(f, z, x)
    u = tuple(torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=generator) for p in fz)
    est = None
    for _ in range(n_iter):
        norm = _batch_sq_norm(u).sqrt().clamp_min(torch.finfo(u[0].dtype).tiny)
        u = tuple(p / norm.view(-1, *([1] * (p.dim() - 1))) for p in u)
        v = torch.autograd.grad(fz, inputs, u, retain_graph=True, allow_unused=True)
        u = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(v, inputs))
        est = _batch_sq_norm(u).sqrt()
    return est.detach()
