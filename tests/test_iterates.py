"""Each solver's iterates, step by step, against an independent reference written here.

The fixed-point tests elsewhere compare where a solver ends up; a wrong
damping, mixing parameter or ridge often still ends up at the same fixed
point. These tests record every state ``f`` is called on and compare it with
the recursion of the solver's docstring, computed densely per sample in
float64, with parameter values where the usual bugs show (damping 0.7, not
0.5, where ``lambda <-> 1 - lambda`` is invisible; Anderson ``beta = 0.8``;
a visible ridge). Also the phantom and implicit backward options that only
change *how* a gradient is computed, pinned where they change its value.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deq import UPG, DEQLayer, Implicit
from deq.solvers import Anderson, Broyden, FixedPoint, solve

F64 = torch.float64


def _tanh_problem(batch=3, dim=6, rho=0.7, seed=0):
    """``f(z) = tanh(W_b z + u_b)`` with ``||W_b||_2 = rho``: per-sample, nonlinear, contractive."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, dim, dim, generator=gen, dtype=F64)
    W = w * (rho / torch.linalg.matrix_norm(w, ord=2))[:, None, None]
    u = torch.randn(batch, dim, generator=gen, dtype=F64)
    return lambda z: torch.tanh((W @ z[:, :, None]).squeeze(2) + u), torch.zeros(batch, dim, dtype=F64)


class Recorder:
    """Wraps f and keeps a copy of every state it is called on."""

    def __init__(self, f):
        self.f, self.inputs = f, []

    def __call__(self, z):
        self.inputs.append(z.clone())
        return self.f(z)


def _iterates(solver, f, z0, n):
    """The states a solver hands ``f`` in ``n`` calls (a tolerance no iterate meets)."""
    rec = Recorder(f)
    res = solve(rec, z0, solver=solver, tol=1e-300, max_iter=n)
    assert not res.converged.any() and len(rec.inputs) == n
    return torch.stack(rec.inputs)


def _assert_same_iterates(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------
# Fixed point


def fixed_point_reference(f, z0, damping, n):
    zs = [z0]
    for _ in range(n - 1):
        zs.append((1 - damping) * zs[-1] + damping * f(zs[-1]))
    return torch.stack(zs)


@pytest.mark.parametrize("damping", [0.7, 0.3, 1.0])
def test_fixed_point_iterates_follow_the_damped_recursion(damping):
    f, z0 = _tanh_problem()
    z0 = z0 + 0.5
    got = _iterates(FixedPoint(damping=damping), f, z0, 6)
    _assert_same_iterates(got, fixed_point_reference(f, z0, damping, 6))


def test_fixed_point_damping_is_the_weight_of_f_not_of_z():
    """z1 = 0.7 f(z0) + 0.3 z0 exactly; the swapped weights give another point."""
    f, z0 = _tanh_problem()
    got = _iterates(FixedPoint(damping=0.7), f, z0, 2)[1]
    torch.testing.assert_close(got, 0.7 * f(z0) + 0.3 * z0, rtol=0, atol=1e-15)
    assert (got - (0.3 * f(z0) + 0.7 * z0)).abs().max() > 0.1


# ----------------------------------------------------------------------------
# Anderson (type II, difference form, with the scale-aware ridge of its docstring)


def anderson_reference(f, z0, *, m, lam, beta, n):
    """Per sample, dense: z' = z + beta g - (dZ + beta dG) gamma, gamma from the ridged normal equations."""
    out = []
    tiny = torch.finfo(F64).tiny
    for b in range(z0.shape[0]):
        fb = lambda v: f(v[None].expand(z0.shape[0], -1).clone())[b]  # noqa: E731 (f is per-sample)
        zs, gs = [z0[b]], [fb(z0[b]) - z0[b]]
        for k in range(n - 1):
            z, g = zs[-1], gs[-1]
            if k == 0:
                z_new = z + beta * g
            else:
                lo = max(0, k - m)
                dZ = torch.stack([zs[i + 1] - zs[i] for i in range(lo, k)])  # (h, D)
                dG = torch.stack([gs[i + 1] - gs[i] for i in range(lo, k)])
                gram = dG @ dG.T
                ridge = tiny + lam * gram.diagonal().max()
                gamma = torch.linalg.solve(gram + ridge * torch.eye(len(dG), dtype=F64), dG @ g)
                z_new = z + beta * g - gamma @ (dZ + beta * dG)
            zs.append(z_new)
            gs.append(fb(z_new) - z_new)
        norms = torch.stack([g.norm() for g in gs])
        # No restart inside the window (the residual falls every step), so the plain recursion applies.
        assert (norms[1:] < norms[:-1]).all()
        out.append(torch.stack(zs))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("m,lam,beta", [(3, 0.0, 0.8), (3, 1e-2, 0.8), (2, 1e-2, 1.0), (5, 0.0, 1.0),
                                        (3, 1e-4, 0.6)])
def test_anderson_iterates_match_a_reference_implementation(m, lam, beta):
    f, z0 = _tanh_problem(rho=0.6)
    n = 8  # past the memory: the oldest difference leaves the history
    got = _iterates(Anderson(m=m, lam=lam, beta=beta), f, z0, n)
    _assert_same_iterates(got, anderson_reference(f, z0, m=m, lam=lam, beta=beta, n=n))


def test_anderson_reference_is_sensitive_to_beta_in_the_history():
    """Non-vacuous: dropping beta from ``dZ + beta dG`` (or the ridge) moves the iterates well past 1e-12."""
    f, z0 = _tanh_problem(rho=0.6)
    ref = anderson_reference(f, z0, m=3, lam=1e-2, beta=0.8, n=6)
    assert (ref - anderson_reference(f, z0, m=3, lam=1e-2, beta=1.0, n=6)).abs().max() > 1e-3
    assert (ref - anderson_reference(f, z0, m=3, lam=0.0, beta=0.8, n=6)).abs().max() > 1e-6


# ----------------------------------------------------------------------------
# Broyden (good Broyden on the inverse Jacobian, restarted when the memory is full)


def broyden_reference(f, z0, *, memory, n):
    out = []
    for b in range(z0.shape[0]):
        fb = lambda v: f(v[None].expand(z0.shape[0], -1).clone())[b]  # noqa: E731
        eye = torch.eye(z0.shape[1], dtype=F64)
        z, H = z0[b], -eye
        g = fb(z) - z
        zs = [z]
        for k in range(n - 1):
            if k > 0:
                s, y = zs[-1] - zs[-2], g - g_prev
                if (k - 1) % memory == 0:
                    H = -eye
                Hy = H @ y
                H = H + torch.outer(s - Hy, s @ H) / (s @ Hy)
            z_new = z - H @ g
            g_prev, z = g, z_new
            g = fb(z) - z
            zs.append(z)
        out.append(torch.stack(zs))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("memory", [2, 3, 20])
def test_broyden_iterates_match_a_dense_reference(memory):
    f, z0 = _tanh_problem(rho=0.8)
    got = _iterates(Broyden(memory=memory), f, z0, 8)
    _assert_same_iterates(got, broyden_reference(f, z0, memory=memory, n=8))


def test_broyden_line_search_takes_the_full_step_where_it_is_accepted():
    """On a contraction every full Broyden step decreases ||g||: with the search the iterates are Broyden's."""
    f, z0 = _tanh_problem(rho=0.3)
    got = _iterates(Broyden(memory=20, line_search=True), f, z0, 5)
    _assert_same_iterates(got, broyden_reference(f, z0, memory=20, n=5))


# ----------------------------------------------------------------------------
# Backward options that change the gradient's value


class _Cell(nn.Module):
    def __init__(self, dim=5, rho=0.8, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, dtype=F64, generator=gen)
        self.W = nn.Parameter(w * (rho / torch.linalg.matrix_norm(w, ord=2)))
        self.b = nn.Parameter(0.3 * torch.randn(dim, dtype=F64, generator=gen))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


def _upg_by_hand(cell, z_star, x, k, damping):
    z = z_star.detach()
    for _ in range(k):
        z = damping * cell(z, x) + (1 - damping) * z
    return z


@pytest.mark.parametrize("damping", [0.7, 0.3])
def test_upg_damping_is_the_weight_of_f(damping):
    """UPG(k=3, damping) equals autograd through z <- damping f(z) + (1 - damping) z from z*; the swap differs."""
    cell = _Cell()
    x = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    layer = DEQLayer(cell, backward=UPG(k=3, damping=damping), tol=1e-12, max_iter=200)
    z = layer(x)
    loss = lambda z: (z.sin() * torch.arange(5, dtype=F64)).sum()  # noqa: E731
    got = torch.autograd.grad(loss(z), (x, cell.W, cell.b))
    z_star = layer.last_result.z
    want = torch.autograd.grad(loss(_upg_by_hand(cell, z_star, x, 3, damping)), (x, cell.W, cell.b))
    swapped = torch.autograd.grad(loss(_upg_by_hand(cell, z_star, x, 3, 1 - damping)), (x, cell.W, cell.b))
    for a, b, c in zip(got, want, swapped):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
        assert (a - c).abs().max() > 1e-3


def _adjoint_residuals(cell, z_star, x, v, g):
    """``(||J^T g + v - g||, ||J^T g + v||)`` per sample, with J = df/dz at z*, by autograd here."""
    z_in = z_star.detach().requires_grad_()
    with torch.enable_grad():
        (vjp,) = torch.autograd.grad(cell(z_in, x.detach()), z_in, g)
    fg = vjp + v
    return torch.linalg.vector_norm(fg - g, dim=1), torch.linalg.vector_norm(fg, dim=1)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_implicit_stop_mode_is_the_backward_solves(stop_mode):
    """Implicit(stop_mode=...) decides when the adjoint solve stops.

    ``dL/dz* = 1e4 w``: the adjoint is large, so an absolute tolerance of 1e-6
    takes more iterations than a relative one, and the adjoint returned passes
    the test of its own mode (checked here with an independent VJP), not the other's.
    """
    cell = _Cell(rho=0.9)
    x = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    tol = 1e-6
    layer = DEQLayer(cell, solver="fixed_point",
                     backward=Implicit(solver="fixed_point", tol=tol, max_iter=500, stop_mode=stop_mode),
                     tol=1e-13, max_iter=300, on_nonconvergence="raise")
    z = layer(x)
    v = 1e4 * torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    (v * z).sum().backward()
    bwd = layer.last_result.backward
    assert bwd.stop_mode == stop_mode and bwd.tol == tol and bool(bwd.converged.all())
    gap, size = _adjoint_residuals(cell, layer.last_result.z, x, v, bwd.z)
    if stop_mode == "abs":
        assert (gap <= tol).all()
        torch.testing.assert_close(bwd.residual, gap, rtol=1e-6, atol=0)
    else:
        assert (gap <= tol * size).all() and (gap > tol).all()  # the relative test, which the absolute one is not
        torch.testing.assert_close(bwd.residual, gap / size, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------
# The stateful parts: Anderson's restart on stagnation, Broyden's line search


def _spd_root(batch=2, dim=5, top=6.0, nonlin=2.0, seed=2):
    """z + g(z) with g(z) = b - A z - nonlin tanh(z), A SPD in [0.5, top]: plain iteration diverges."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=F64))
    A = q @ torch.diag_embed(torch.linspace(0.5, top, dim, dtype=F64).expand(batch, dim)) @ q.transpose(1, 2)
    b = 2 * torch.randn(batch, dim, generator=gen, dtype=F64)
    return lambda z: z + b - (A @ z[:, :, None]).squeeze(2) - nonlin * torch.tanh(z), torch.zeros(batch, dim, dtype=F64)


def anderson_restarting_reference(f, z0, *, m, lam, beta, n):
    """As above, and a sample whose ||g|| has not fallen below its best for m steps drops its history."""
    out, restarts = [], 0
    tiny = torch.finfo(F64).tiny
    for b in range(z0.shape[0]):
        fb = lambda v: f(v[None].expand(z0.shape[0], -1).clone())[b]  # noqa: E731
        zs, gs = [z0[b]], [fb(z0[b]) - z0[b]]
        hist, best, stale = [], math.inf, 0
        for k in range(n - 1):
            z, g = zs[-1], gs[-1]
            if k > 0:
                hist = (hist + [k - 1])[-m:]  # the pair (k - 1 -> k)
                g_sq = float(g @ g)
                stale = 0 if g_sq < best else stale + 1
                best = min(best, g_sq)
                if stale >= m:
                    hist, stale, best, restarts = [], 0, g_sq, restarts + 1
            if not hist:
                z_new = z + beta * g
            else:
                dZ = torch.stack([zs[i + 1] - zs[i] for i in hist])
                dG = torch.stack([gs[i + 1] - gs[i] for i in hist])
                gram = dG @ dG.T
                ridge = tiny + lam * gram.diagonal().max()
                gamma = torch.linalg.solve(gram + ridge * torch.eye(len(hist), dtype=F64), dG @ g)
                z_new = z + beta * g - gamma @ (dZ + beta * dG)
            zs.append(z_new)
            gs.append(fb(z_new) - z_new)
        out.append(torch.stack(zs))
    return torch.stack(out, dim=1), restarts


@pytest.mark.parametrize("top,nonlin,beta,m", [(6.0, 2.0, 1.0, 2), (6.0, 2.0, 1.0, 3), (10.0, 3.0, 0.5, 2)])
def test_anderson_restarts_on_stagnation_as_its_docstring_says(top, nonlin, beta, m):
    f, z0 = _spd_root(top=top, nonlin=nonlin)
    n = 14
    want, restarts = anderson_restarting_reference(f, z0, m=m, lam=1e-3, beta=beta, n=n)
    assert restarts > 0  # the window does contain restarts
    _assert_same_iterates(_iterates(Anderson(m=m, lam=1e-3, beta=beta), f, z0, n), want)


def broyden_line_search_reference(f, z0, *, memory, max_ls_iter, n, c=1e-4):
    """Per sample: Armijo backtracking by halves; every step (trial or not) advances the restart cycle."""
    out, backtracks = [], 0
    for b in range(z0.shape[0]):
        fb = lambda v: f(v[None].expand(z0.shape[0], -1).clone())[b]  # noqa: E731
        eye = torch.eye(z0.shape[1], dtype=F64)
        H = -eye
        z = z0[b]
        g = fb(z) - z
        z_base, g_base, d, alpha, trials = z, g, g, 1.0, 1
        zs = [z]
        for k in range(n - 1):
            if k > 0:
                accept = bool(g.norm() <= (1 - c * alpha) * g_base.norm()) or trials >= max_ls_iter
                if (k - 1) % memory == 0:
                    H = -eye
                if accept:
                    s, y = z - z_base, g - g_base
                    Hy = H @ y
                    H = H + torch.outer(s - Hy, s @ H) / (s @ Hy)
                    d, z_base, g_base, alpha, trials = -H @ g, z, g, 1.0, 1
                else:
                    alpha, trials, backtracks = alpha / 2, trials + 1, backtracks + 1
            z = z_base + alpha * d
            g = fb(z) - z
            zs.append(z)
        out.append(torch.stack(zs))
    return torch.stack(out, dim=1), backtracks


@pytest.mark.parametrize("memory,max_ls_iter", [(20, 5), (3, 2), (4, 3)])
def test_broyden_line_search_iterates_match_a_reference(memory, max_ls_iter):
    f, z0 = _spd_root()
    n = 16
    want, backtracks = broyden_line_search_reference(f, z0, memory=memory, max_ls_iter=max_ls_iter, n=n)
    assert backtracks > 0
    got = _iterates(Broyden(memory=memory, line_search=True, max_ls_iter=max_ls_iter), f, z0, n)
    _assert_same_iterates(got, want)


def _armijo_edge(c=1e-4):
    """``g(z) = s_b R(theta_b) z`` in 2-D (``f(z) = z + g(z)``): the trial ``z0 + alpha g0`` has
    ``||g|| / ||g0|| = sqrt(1 + 2 alpha s cos(theta) + alpha^2 s^2)``, placed at the Armijo threshold's
    edges. Sample 0: the full step keeps ``||g||`` exactly (ratio 1, inside ``(1 - c, 1 + c)``: rejected),
    and the half step is accepted. Sample 1: the full step is rejected, and the half step's ratio is
    ``1 - 1.25 c``, between ``1 - 2c`` and ``1 - c/2``: accepted by ``1 - c alpha`` only."""
    s = torch.tensor([0.5, 0.5], dtype=F64)
    cos = torch.stack([-s[0] / 2, ((1 - 1.25 * c) ** 2 - 1 - s[1] ** 2 / 4) / s[1]])
    sin = (1 - cos ** 2).sqrt()
    A = s[:, None, None] * torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    return lambda z: z + (A @ z[:, :, None]).squeeze(2), torch.tensor([[1.0, 0.0], [0.6, -0.8]], dtype=F64)


def test_broyden_line_search_threshold_is_one_minus_c_alpha():
    f, z0 = _armijo_edge()
    n = 6
    want, backtracks = broyden_line_search_reference(f, z0, memory=20, max_ls_iter=5, n=n)
    g0 = f(z0) - z0
    torch.testing.assert_close(want[2], z0 + 0.5 * g0, rtol=0, atol=1e-15)  # both full steps rejected
    _assert_same_iterates(_iterates(Broyden(memory=20, line_search=True), f, z0, n), want)


def _broyden_dense(A, z0, n, restart_on_degenerate=True):
    """Iterates of Broyden's good method on ``g(z) = A z`` (one sample), with the docstring's rule:
    an update with ``|s^T H y| <= sqrt(eps) |s| |H y|`` restarts the sample from ``H = -I``. Also returns
    ``s^T H y / (|s| |H y|)`` of each update."""
    eye = torch.eye(len(z0), dtype=F64)
    H, z, zs, cosines = -eye, z0, [z0], []
    g = A @ z
    for k in range(n - 1):
        if k > 0:
            s, y = zs[-1] - zs[-2], g - g_prev
            Hy = H @ y
            cosines.append(float(s @ Hy / (s.norm() * Hy.norm())))
            if restart_on_degenerate and abs(s @ Hy) <= math.sqrt(torch.finfo(F64).eps) * s.norm() * Hy.norm():
                H = -eye
            else:
                H = H + torch.outer(s - Hy, s @ H) / (s @ Hy)
        g_prev, z = g, z - H @ g
        g = A @ z
        zs.append(z)
    return torch.stack(zs), cosines


def test_a_degenerate_broyden_update_restarts_that_sample_from_minus_identity():
    """Sample 0's second update is degenerate (s^T H y = 0, found by bisection on the start's angle):
    it restarts from H = -I, its first term dropped; sample 1 updates normally throughout."""
    A = torch.tensor([[-0.3, 0.9], [0.6, -1.2]], dtype=F64)

    def start(phi):
        return torch.stack([torch.cos(phi), torch.sin(phi)])

    def second_cosine(phi):
        return _broyden_dense(A, start(phi), 4, restart_on_degenerate=False)[1][1]

    lo, hi = torch.tensor(26 * math.pi / 256, dtype=F64), torch.tensor(27 * math.pi / 256, dtype=F64)
    assert 0 < second_cosine(lo) < 0.1 and -0.1 < second_cosine(hi) < 0  # a zero, not a pole, in between
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if second_cosine(lo) * second_cosine(mid) > 0 else (lo, mid)
    z0 = torch.stack([start(lo), torch.tensor([1.0, -0.3], dtype=F64)])
    n = 6
    want = torch.stack([_broyden_dense(A, z0[b], n)[0] for b in range(2)], dim=1)
    cosines = [_broyden_dense(A, z0[b], n)[1] for b in range(2)]
    assert abs(cosines[0][1]) < 1e-12 and min(abs(c) for c in cosines[1]) > 1e-3
    assert (want - torch.stack([_broyden_dense(A, z0[b], n, False)[0] for b in range(2)], 1)).abs().max() > 1e-3
    got = _iterates(Broyden(memory=20), lambda z: z + z @ A.T, z0, n)
    _assert_same_iterates(got, want)


# ----------------------------------------------------------------------------
# Causal Broyden (time_dim): the second method with prefix inner products


def _causal_problem(batch=2, length=5, chan=3, seed=3):
    """``f(z)_t = tanh(W z_t + c z_{t-1} + x_t)``: couples each position to the previous one."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(chan, chan, generator=gen, dtype=F64)
    W = w * (0.5 / torch.linalg.matrix_norm(w, ord=2))
    x = torch.randn(batch, length, chan, generator=gen, dtype=F64)

    def f(z):
        prev = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)
        return torch.tanh(z @ W.T + 0.4 * prev + x)

    return f, torch.zeros(batch, length, chan, dtype=F64)


def causal_broyden_reference(f, z0, *, memory, n):
    """Broyden's second method on ``(B, T, C)`` states with ``<a, b>_t = sum_{s <= t} a_s . b_s``:
    ``(H v)_t = -v_t + sum_i u_{i,t} <y_i, v>_t``, the secant term ``u = (s - H y) / <y, y>``,
    the step ``z <- z - H' g``, and a restart from ``H = -I`` when the memory is full."""
    def ip(a, b):
        return (a * b).sum(dim=2).cumsum(dim=1)[:, :, None]

    def apply_h(terms, v):
        return -v + sum((u * ip(y, v) for u, y in terms), torch.zeros_like(v))

    z, terms = z0, []
    g = f(z) - z
    zs = [z]
    for k in range(n - 1):
        if k == 0:
            step = g
        else:
            if (k - 1) % memory == 0:
                terms = []
            s, y = zs[-1] - zs[-2], g - g_prev
            terms.append(((s - apply_h(terms, y)) / ip(y, y), y))
            step = -apply_h(terms, g)
        g_prev, z = g, z + step
        g = f(z) - z
        zs.append(z)
    return torch.stack(zs)


@pytest.mark.parametrize("memory", [2, 3, 20])
def test_causal_broyden_iterates_match_a_dense_reference(memory):
    f, z0 = _causal_problem()
    rec = Recorder(f)
    res = solve(rec, z0, solver=Broyden(memory=memory), tol=1e-300, max_iter=8, time_dim=1)
    assert not res.converged.any() and len(rec.inputs) == 8
    want = causal_broyden_reference(f, z0, memory=memory, n=8)
    _assert_same_iterates(torch.stack(rec.inputs), want)
    torch.testing.assert_close(res.z, want[-1], rtol=0, atol=1e-12)  # causal mode returns the last iterate


def test_causal_broyden_reference_differs_from_the_plain_broyden():
    """Not a vacuous reference: the plain Broyden on the flattened sequence takes other iterates."""
    f, z0 = _causal_problem()
    want = causal_broyden_reference(f, z0, memory=20, n=6)
    got = _iterates(Broyden(memory=20), lambda z: f(z.view(z0.shape)).flatten(1),
                    z0.flatten(1), 6).view(6, *z0.shape)
    assert (got - want).abs().max() > 1e-6
