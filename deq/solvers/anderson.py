"""Anderson acceleration (type II) with a scale-aware ridge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .contract import Iterate, Solver, register


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
    updated one column per step (``O(m D)`` work, not ``O(m^2 D)``), in the
    same pass over the history as the right-hand side ``dG^T g``. A sample
    whose system is singular or gives a non-finite ``gamma`` falls back to the
    plain mixing step ``z + beta * g`` for that iteration (never a crash). A
    sample whose residual has not fallen below its best for ``m`` steps restarts:
    its history is dropped (masked out of the system) and it takes the plain
    step, because undamped Anderson can cycle on a plateau of a nonlinear ``f``
    (seen on a DEQ-Transformer block at init, where plain iteration converges).
    Working memory: ``(2 m + 4) B D + m^2 B`` numbers (the history, two work
    pairs and the Gram matrices), whatever ``max_iter`` is.

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
    # Causal mode (set by ``causal``): the sequence length whose prefixes the
    # least-squares problems run over; None for one problem per sample.
    _prefix: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"m must be an integer >= 1, got {self.m!r}")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")

    def causal(self, length: int) -> "Anderson":
        """Per-position mixing for causal mode: position ``t`` fits its coefficients on positions ``<= t``.

        Row ``t`` of a sample solves ``min ||g_{<=t} - dG_{<=t} gamma_t||^2 + ridge``,
        whose Gram matrix and right-hand side are prefix sums over positions
        of the per-position products (one cumulative sum per step), then
        mixes its own row with ``gamma_t``; the ridge scale and the restart
        test use the same prefix. At the last position this is the
        per-sample problem of the non-causal mode.
        """
        return dataclasses.replace(self, _prefix=length)

    def init(self, it: Iterate) -> "_AndersonState":
        z = it.z
        batch, dim = z.shape
        new = dict(dtype=z.dtype, device=z.device)
        pairs = (torch.empty(batch, 2, dim, **new), torch.empty(batch, 2, dim, **new))
        pairs[0][:, 1].copy_(it.g)
        return _AndersonState(
            z=z, fz=it.fz, dG=torch.zeros(batch, self.m, dim, **new), dY=torch.zeros(batch, self.m, dim, **new),
            gram=torch.zeros(batch, self.m, self.m, **new), pairs=pairs, valid=torch.zeros(batch, self.m, **new),
            best_sq=torch.full((batch, 1), float("inf"), **new), stale=torch.zeros(batch, 1, **new),
            eye=torch.eye(self.m, **new), tiny=torch.tensor(torch.finfo(z.dtype).tiny, **new))

    def step(self, state, it, active, evaluate):
        k = state.k
        z, fz = it.z, it.fz
        # The loop's g of this iterate: rows[k % 2][1] (step k - 1 wrote it there).
        dg, g = state.rows[k % 2]
        weight = active.to(z.dtype)[:, None]  # 0 freezes a stopped sample
        mixed = fz if self.beta == 1.0 else torch.add(z, g, alpha=self.beta)  # z + beta g
        if k == 0:
            z_new = z.lerp(mixed, weight)
        else:
            dg_slot, dy_slot, gram_row, gram_col = state.slots[(k - 1) % self.m]
            torch.sub(g, state.rows[(k + 1) % 2][1], out=dg)
            dg_slot.copy_(dg)
            if self.beta == 1.0:
                torch.sub(fz, state.fz, out=dy_slot)  # dZ + dG = the change of f(z)
            else:
                torch.sub(z, state.z, out=dy_slot).add_(dg, alpha=self.beta)
            # One pass over the history for both the new Gram column dG^T dg
            # and the right-hand side dG^T g: O(m D), not O(m^2 D).
            prods = torch.bmm(state.pairs[k % 2], state.dG_t)  # (B, 2, m)
            if self._prefix is not None:  # causal: sums over the positions <= t of each sample
                prods = prods.view(-1, self._prefix, 2, self.m).cumsum(dim=1).view(-1, 2, self.m)
            column = prods[:, 0]
            gram_row.copy_(column)
            gram_col.copy_(column)
            gamma = self._gamma(state, k, prods, it.gn.square()[:, None])
            z_new = z.lerp(torch.baddbmm(mixed.unsqueeze(1), gamma, state.dY, alpha=-1.0).squeeze(1), weight)
        fz_new = evaluate(z_new, active)
        # g of the new iterate, where the next step reads it.
        g_new = torch.sub(fz_new, z_new, out=state.rows[(k + 1) % 2][1])
        state.z, state.fz, state.k = z, fz, k + 1
        return state, z_new, fz_new, g_new

    def _gamma(self, state: "_AndersonState", k: int, prods: Tensor, g_sq: Tensor) -> Tensor:
        """The ``(B, 1, m)`` mixing coefficients, after the per-sample restart on stagnation.

        A sample whose residual has not fallen below its best for ``m`` steps
        drops its history and takes the plain mixing step: on a nonlinear f
        Anderson can otherwise cycle on a plateau.
        """
        valid, best_sq, stale = state.valid, state.best_sq, state.stale
        improved = g_sq < best_sq
        torch.minimum(best_sq, g_sq, out=best_sq)
        stale.add_(1.0).masked_fill_(improved, 0.0)
        keep = stale < self.m
        state.valid_cols[(k - 1) % self.m].fill_(1.0)
        valid.mul_(keep)
        stale.mul_(keep)
        torch.where(keep, best_sq, g_sq, out=best_sq)
        masked = state.gram * (state.valid_col * state.valid_row)
        ridge = torch.add(state.tiny, masked.diagonal(dim1=1, dim2=2).amax(dim=1, keepdim=True), alpha=self.lam)
        system = torch.addcmul(masked, ridge.unsqueeze(2), state.eye)
        # gamma (B, 1, m) as a row: gamma A = rhs^T, the same as A gamma^T = rhs (A symmetric).
        gamma, info = torch.linalg.solve_ex(system, prods[:, 1:] * state.valid_row, left=False)
        # A singular or non-finite solve falls back to the plain mixing step.
        return gamma.masked_fill_((info != 0).view(-1, 1, 1), 0.0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class _AndersonState:
    """Anderson's per-solve state; per-row tensors first (the active set selects their rows).

    Slots not yet filled stay zero: their Gram rows and right-hand sides are
    zero, so (with the ridge on the diagonal) their gamma is exactly zero and
    every step solves the same fixed-size ``m x m`` system.
    """

    z: Tensor  # the previous iterate and its f(z)
    fz: Tensor
    dG: Tensor  # (B, m, D) residual differences
    dY: Tensor  # (B, m, D) dZ + beta dG: the only combination of dZ the update uses (one batched product)
    gram: Tensor  # (B, m, m) dG^T dG, one column updated per step
    # Two (B, 2, D) buffers used in turn, rows [dg, g] of one step: the new
    # residual is written where the product with the history reads it (no
    # stacking copy) while the previous step's g survives in the other one.
    pairs: tuple[Tensor, Tensor]
    valid: Tensor  # (B, m): 1 where the column belongs to the current run of the history
    best_sq: Tensor  # (B, 1): lowest squared residual of the current run
    stale: Tensor  # (B, 1): steps since it fell
    eye: Tensor = field(metadata={"shared": True})
    tiny: Tensor = field(metadata={"shared": True})
    k: int = 0
    # Views made once per state, not per step: on small problems each indexing
    # op costs about as much as the arithmetic it feeds.
    rows: tuple = field(init=False, repr=False)
    dG_t: Tensor = field(init=False, repr=False)
    slots: tuple = field(init=False, repr=False)
    valid_cols: tuple = field(init=False, repr=False)
    valid_col: Tensor = field(init=False, repr=False)
    valid_row: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = tuple(p.unbind(1) for p in self.pairs)
        self.dG_t = self.dG.transpose(1, 2)
        self.valid_cols = self.valid.unbind(1)
        self.valid_col, self.valid_row = self.valid[:, :, None], self.valid[:, None, :]
        self.slots = tuple((self.dG[:, i], self.dY[:, i], self.gram[:, i], self.gram[:, :, i])
                           for i in range(self.dG.shape[1]))
