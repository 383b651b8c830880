"""Limited-memory Broyden's method with an optional Armijo line search."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .contract import Iterate, Solver, register


@register("broyden")
@dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's ("good") method on ``g(z) = f(z) - z`` with a low-rank inverse Jacobian.

    Keeps ``H ~ J_g^{-1} = -I + sum_i u_i v_i^T`` with at most ``memory`` rank-one
    terms in fixed-size buffers, so its working memory is
    ``(2 memory + 11) B D + 6 memory B`` numbers (terms, work vectors, mask;
    ``2 B D + 3 B`` more with the line search) whatever ``max_iter`` is. Per step::

        d = -H g(z);  z' = z + alpha d
        s = z' - z,  y = g(z') - g(z)
        H <- H + (s - H y) (s^T H) / (s^T H y)

    When the memory is full, every sample restarts from ``H = -I`` and this
    step's update is applied to ``-I`` (restarted L-Broyden). Overwriting only
    the oldest term instead breaks the secant equations that the later terms
    were built on; on a tanh contraction with ``rho(J) = 0.99`` that version
    stalls at a relative residual of ~1e-2, where restarting converges in ~60
    steps. The update degenerates when ``s^T H y`` is lost in rounding,
    ``|s^T H y| <= sqrt(eps) |s| |H y|`` (``eps`` of the working dtype), or is
    not finite; that sample alone then restarts from ``H = -I`` (its next step
    is a plain fixed-point step).

    With ``line_search=True``, ``alpha`` backtracks from 1 by halves until the
    Armijo-type sufficient decrease ``||g(z')|| <= (1 - c alpha) ||g(z)||`` holds
    (``c = 1e-4``), per sample, at most ``max_ls_iter`` trials (the last one is
    taken if none passes). Each trial is one iteration of the solve loop and
    one f-call charged to that sample: in one call of ``f`` on the batch some
    samples try a shorter step while others take a new one, so no sample waits
    for another and no host sync is needed. The search makes Broyden safe
    where a full step overshoots, at the price of extra calls where it does
    not: Broyden's steps are not monotone in ``||g||``.

    Each update reads the terms in use twice: ``[U; V] [g', s]`` then one
    product of the buffer with the coefficients gives ``H g(z')`` (the next
    direction) and ``H^T s`` (the new ``v``) together; ``H y`` is
    ``H g(z') - H g(z)``. With the line search, H may change between the
    accepted point and the trial (a restart when the memory fills), so ``H y``
    joins the same two passes instead. With the line search, trials also
    advance the memory's restart cycle.

    Its inner products (``s^T H y`` and the like) are formed in the working
    dtype, so they overflow for float32 states with entries above about
    ``1e19`` (an iterate turns non-finite and the solve raises
    :class:`~deq.solvers.NonFiniteError`); use float64 states at such scales.
    Anderson falls back to plain mixing there instead.

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

    def __post_init__(self) -> None:
        for name in ("memory", "max_ls_iter"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")

    def causal(self, length: int) -> "_CausalBroyden":
        """Broyden's second ("bad") method with prefix inner products, for causal mode.

        The good method's update ``v = H^T s`` runs backwards in time, so it
        cannot be causal. The second method's ``v = y`` can: with
        ``<a, b>_t = sum_{s <= t} a_s . b_s`` over the positions of a sample,
        the inverse Jacobian ``(H x)_t = -x_t + sum_i u_{i,t} <y_i, x>_t`` is
        lower triangular in time, and the secant update
        ``u_t = (s_t - (H y)_t) / <y, y>_t`` keeps ``H y = s`` row by row.
        Every quantity at position ``t`` uses positions ``<= t`` only; at the
        last position the products are the whole sequence's. (Keeping one
        good-method inverse per position instead ignores the coupling between
        positions and took 5x the f-calls on a TrellisNet cell.)

        Raises:
            TypeError: with ``line_search=True`` (no causal line search).
        """
        if self.line_search:
            raise TypeError("Broyden(line_search=True) has no causal mode (time_dim=...); use line_search=False")
        return _CausalBroyden(memory=self.memory, length=length)

    def init(self, it: Iterate) -> "_BroydenState":
        z = it.z
        batch, dim = z.shape
        new = dict(dtype=z.dtype, device=z.device)
        work = (torch.empty(batch, 5, dim, **new), torch.empty(batch, 5, dim, **new))
        work[0][:, 0].copy_(it.g)
        state = _BroydenState(UV=torch.zeros(batch, 2 * self.memory, dim, **new),
                              mask=torch.zeros(batch, 3, 2 * self.memory, **new), work=work)
        if self.line_search:
            state.search = _Search(z_base=z.clone(), g_base=it.g.clone(), gn_base=it.gn, d=it.g.clone(),
                                   alpha=torch.ones(batch, **new),
                                   trials=torch.ones(batch, dtype=torch.int64, device=z.device))
        return state

    def _slot_views(self, state: "_BroydenState", slot: int) -> tuple:
        """Views of term ``slot`` and of the live prefix before it, built once per slot."""
        views = state.slots.get(slot)
        if views is None:
            UV, mask = state.UV, state.mask
            live = UV[:, :2 * slot]
            views = (UV[:, 2 * slot], UV[:, 2 * slot + 1], mask[:, 0:2, 2 * slot], mask[:, 2, 2 * slot + 1],
                     live, live.transpose(1, 2), (mask[:, :, :2 * slot], mask[:, 0:3:2, :2 * slot]))
            state.slots[slot] = views
        return views

    def _update(self, state: "_BroydenState", k: int, accept: Tensor, g_prev: Tensor | None = None,
                Hg_prev: Tensor | None = None) -> Tensor:
        """Broyden update of H with the rows (g', y, s) of this step's work buffer; returns H' g'.

        Only samples in ``accept`` are updated (a degenerate update restarts
        the sample from H = -I); the returned H' g' is meaningful for them.
        Without the line search every sample takes every step, ``g_prev`` and
        ``Hg_prev = H g_prev`` (under the current H) are known, and
        ``H y = H g' - H g_prev`` needs no product of its own.
        """
        mask = state.mask
        g_new, y, s, Hg_new, Hy = state.rows[k % 2]
        slot = (k - 1) % self.memory
        u, v, mask_u, mask_v, live, live_t, (live_mask, live_mask_gs) = self._slot_views(state, slot)
        if slot == 0:
            # First update, or memory full: every sample restarts from H = -I and
            # this update is applied to -I (restarted L-Broyden; dropping only
            # the oldest term would break the secant equations of the rest).
            mask.zero_()
            torch.neg(g_new, out=Hg_new)
            if Hg_prev is None:
                torch.neg(y, out=Hy)
            else:
                torch.sub(g_prev, g_new, out=Hy)
            torch.neg(s, out=v)
        elif Hg_prev is None:
            # Pass 1: [g'; y; s] . [u_0; v_0; u_1; ...]. Pass 2, one product:
            # rows sum_i u_i (v_i . g'), sum_i u_i (v_i . y), sum_i v_i (u_i . s),
            # so that H x = -x + row (x = g', y) and v = H^T s = -s + row 2.
            prods = torch.bmm(state.pass_rows[k % 2][0], live_t)  # (B, 3, 2 slot)
            coef = prods.unflatten(2, (slot, 2)).flip(3).flatten(2).mul_(live_mask)
            low_rank = torch.bmm(coef, live).unbind(1)  # 3 x (B, D)
            torch.sub(low_rank[0], g_new, out=Hg_new)
            torch.sub(low_rank[1], y, out=Hy)
            torch.sub(low_rank[2], s, out=v)
        else:
            # The same with rows (g', s) only.
            prods = torch.bmm(state.pass_rows[k % 2][1], live_t)  # (B, 2, 2 slot)
            coef = prods.unflatten(2, (slot, 2)).flip(3).flatten(2).mul_(live_mask_gs)
            low_rank = torch.bmm(coef, live).unbind(1)  # 2 x (B, D)
            torch.sub(low_rank[0], g_new, out=Hg_new)
            torch.sub(low_rank[1], s, out=v)
            torch.sub(Hg_new, Hg_prev, out=Hy)

        # Rows (s, Hy) times (s, H g', Hy): s.s, s.Hg' (= v.g'), s.Hy (= s^T H y), Hy.Hy.
        left, right = state.dot_views[k % 2]
        ss, sHg, sHy, _, _, HyHy = torch.bmm(left, right).flatten(1).unbind(1)
        size = ss * HyHy
        # |s^T H y| > sqrt(eps) |s| |H y| (False for NaN), and s^T H y bounded away
        # from 0 (Cauchy-Schwarz then bounds |s| |Hy| too) so u stays finite.
        ok = (sHy * sHy > size.mul_(torch.finfo(s.dtype).eps).clamp_min_(torch.finfo(s.dtype).tiny)) & accept
        restart = accept ^ ok  # accepted but degenerate
        ok_w, restart_w = ok.to(s.dtype), restart.to(s.dtype)
        torch.sub(s, Hy, out=u).div_(torch.where(ok, sHy, 1.0)[:, None])

        # H' g' = H g' + u (v . g') for updated samples, -g' for restarted ones.
        Hg_next = torch.addcmul(Hg_new, u, (sHg * ok_w)[:, None])
        Hg_next.lerp_(g_new.neg(), restart_w[:, None])  # exact row select

        mask.mul_((1 - restart_w)[:, None, None])
        mask_u.copy_(ok_w[:, None].expand(-1, 2))
        mask_v.copy_(ok_w)
        return Hg_next

    def step(self, state, it, active, evaluate):
        # Step k evaluates one new point per sample. From step 1 on, the point
        # evaluated by step k - 1 arrives as (z, fz) and, once accepted, gives
        # the pair (s, y) of the Broyden update.
        k = state.k
        z = it.z
        # g of this iterate is rows[k % 2][0]: step k - 1 (or init) wrote it there.
        g_new, y, s, _, _ = state.rows[k % 2]
        nxt = state.rows[(k + 1) % 2]
        weight = active.to(z.dtype)
        if self.line_search:
            z_new = self._search_step(state, k, z, g_new, it.gn, y, s, active, weight)
        else:
            # nxt[0] is the previous g, and s (the previous d) is already in place.
            Hg = g_new.neg() if k == 0 else self._update(state, k, active, nxt[0], state.Hg)
            state.Hg = Hg
            # d = -H g', written where the next step reads s; zero for stopped samples.
            d = torch.mul(Hg, weight.neg()[:, None], out=nxt[2])
            z_new = z + d
        fz_new = evaluate(z_new, active)
        # g of the new iterate, where the next step reads it (this step is done with nxt[0]).
        g_next = torch.sub(fz_new, z_new, out=nxt[0])
        state.k = k + 1
        return state, z_new, fz_new, g_next

    def _search_step(self, state, k, z, g_new, gn, y, s, active, weight):
        """The next point with the line search: a new step where the last trial is accepted, else a shorter trial.

        Per sample, with no host sync: the trial ``z_base + alpha d`` is accepted
        when ``||g|| <= (1 - c alpha) ||g(z_base)||`` or after ``max_ls_iter``
        trials; then H is updated with ``s = z - z_base`` and the next trial is
        ``z + d'`` with ``d' = -H' g``; otherwise ``alpha`` halves.
        """
        search = state.search
        z_base, g_base, d, alpha = search.z_base, search.g_base, search.d, search.alpha
        if k == 0:
            accept = active  # z0 is the first accepted point; its direction is g (H = -I)
            trials = search.trials
        else:
            armijo = gn <= (1 - self._ARMIJO_C * alpha) * search.gn_base
            accept = active & (armijo | (search.trials >= self.max_ls_iter))
            torch.sub(g_new, g_base, out=y)
            torch.sub(z, z_base, out=s)
            Hg = self._update(state, k, accept)
            accept_w = accept.to(z.dtype)[:, None]
            d.lerp_(Hg.neg_(), accept_w)  # exact row select: a new direction where accepted
            z_base.lerp_(z, accept_w)
            g_base.lerp_(g_new, accept_w)
            search.gn_base = torch.where(accept, gn, search.gn_base)
            trials = torch.where(accept, 1, search.trials + 1)
        search.alpha = alpha = torch.where(accept, 1.0, alpha * 0.5)
        search.trials = trials
        return z.lerp(torch.addcmul(z_base, alpha[:, None], d), weight[:, None])


@dataclass
class _Search:
    """The line search's per-sample state: the accepted point, its g and ||g||, the direction
    from it, the step length being tried and the trials so far."""

    z_base: Tensor
    g_base: Tensor
    gn_base: Tensor
    d: Tensor
    alpha: Tensor
    trials: Tensor


@dataclass
class _BroydenState:
    """Broyden's per-solve state; per-row tensors (the active set selects their rows).

    Term ``i`` of ``H = -I + sum_i u_i v_i^T`` is ``u_i`` in row ``2i`` of ``UV`` and
    ``v_i`` in row ``2i + 1``: the terms in use are always a prefix of the
    buffer, so each pass reads only that prefix. ``mask`` says which products
    enter the second pass: rows 0, 1 (for g and y) take ``v_i . x`` at ``u_i``'s
    place, row 2 (for s) takes ``u_i . s`` at ``v_i``'s place, where term ``i`` is
    live; a restart zeroes a sample's mask, not its buffers. ``work`` holds two
    buffers used in turn, each ``[g(z), y, s, H g(z), H y]`` for one step: the
    products read them in place (no stacking copies), and the previous step's
    ``g`` survives in the other one.
    """

    UV: Tensor
    mask: Tensor
    work: tuple[Tensor, Tensor]
    Hg: Tensor | None = None
    search: "_Search | None" = None
    k: int = 0
    # Views made once per state, not per step: on small problems each indexing
    # op costs about as much as the arithmetic it feeds.
    rows: tuple = field(init=False, repr=False)
    pass_rows: tuple = field(init=False, repr=False)
    dot_views: tuple = field(init=False, repr=False)
    slots: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = tuple(w.unbind(1) for w in self.work)
        self.pass_rows = tuple((w[:, :3], w[:, 0:3:2]) for w in self.work)  # (g, y, s) and (g, s)
        self.dot_views = tuple((w[:, 2::2], w[:, 2:].transpose(1, 2)) for w in self.work)
        self.slots = {}


@dataclass(frozen=True)
class _CausalBroyden(Solver):
    """Broyden's second method with prefix inner products (see :meth:`Broyden.causal`)."""

    memory: int
    length: int
    name = "broyden"

    def init(self, it: Iterate) -> "_CausalBroydenState":
        rows, dim = it.z.shape
        new = dict(dtype=it.z.dtype, device=it.z.device)
        # [y; g] of this step, next to each other for one product with the terms.
        pair = torch.empty(rows, 2, dim, **new)
        return _CausalBroydenState(U=torch.zeros(rows, self.memory, dim, **new),
                                   Y=torch.zeros(rows, self.memory, dim, **new), pair=pair)

    def _prefix(self, products: Tensor) -> Tensor:
        """Per-row products ``(R, ...)`` -> sums over each sample's positions ``<= t``."""
        return products.view(-1, self.length, *products.shape[1:]).cumsum(dim=1).view(products.shape)

    def step(self, state, it, active, evaluate):
        k, slot = state.k, (state.k - 1) % self.memory
        weight = active.to(it.z.dtype)[:, None]
        if k == 0:
            direction = it.g  # H = -I
        else:
            if slot == 0:
                state.used = 0  # memory full (or first update): restart from H = -I
            y, g = state.pair.unbind(1)
            torch.sub(it.g, state.g, out=y)
            g.copy_(it.g)
            used = state.used
            if used:
                # [H y; H g] = -x + sum_i u_i <y_i, x>_t under the current terms, in one pass over them.
                coef = self._prefix(torch.bmm(state.pair, state.Y[:, :used].transpose(1, 2)))  # (R, 2, used)
                Hx = torch.baddbmm(state.pair, coef, state.U[:, :used], beta=-1)
            else:
                Hx = state.pair.neg()
            Hy, Hg = Hx.unbind(1)
            yy, yg = self._prefix(torch.stack([(y * y).sum(dim=1), (y * g).sum(dim=1)], dim=1)).unbind(1)
            ok = yy > torch.finfo(yy.dtype).tiny
            u = (it.z - state.z - Hy).div_(torch.where(ok, yy, 1.0)[:, None]).mul_(ok.to(yy.dtype)[:, None])
            state.U[:, used].copy_(u)
            state.Y[:, used].copy_(y)
            state.used = used + 1
            direction = -(Hg + u * yg[:, None])  # -H' g with the new term
        z_new = torch.addcmul(it.z, direction, weight)
        fz_new = evaluate(z_new, active)
        state.z, state.g, state.k = it.z, it.g, k + 1
        return state, z_new, fz_new, fz_new - z_new


@dataclass
class _CausalBroydenState:
    """Terms ``u_i`` and ``y_i`` of the inverse Jacobian (per row), the previous iterate and its g."""

    U: Tensor
    Y: Tensor
    pair: Tensor
    z: Tensor | None = None
    g: Tensor | None = None
    used: int = 0
    k: int = 0
