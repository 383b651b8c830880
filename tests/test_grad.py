"""Backward passes of DEQLayer: Implicit (IFT), UPG, NPG, JFB.

Everything in float64. Each gradient is checked against an independent
reference: finite differences (gradcheck), autograd through hundreds of
unrolled steps, closed forms for linear f, explicit Jacobians built with
``torch.autograd.functional.jacobian``. Memory is counted, not timed: the bytes
of the tensors autograd saves for backward, deduplicated by storage.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.utils.checkpoint import checkpoint

from deq import (JFB, NPG, UPG, Anderson, ConvergenceError, DEQLayer, FixedPoint, Implicit, NonFiniteError,
                 get_backward)
from deq.grad.implicit import default_tol

DT = torch.float64
TIGHT = dict(tol=1e-13, max_iter=200)


def _orth_scaled(dim: int, rho: float, gen: torch.Generator) -> torch.Tensor:
    """A random matrix with spectral norm exactly ``rho``."""
    w = torch.randn(dim, dim, dtype=DT, generator=gen)
    return w * (rho / torch.linalg.matrix_norm(w, ord=2))


class TanhCell(nn.Module):
    """f(z, x) = tanh(z W^T + x U^T + b) with ||W||_2 = rho: a contraction."""

    def __init__(self, dim: int = 5, in_dim: int | None = None, rho: float = 0.6, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        in_dim = dim if in_dim is None else in_dim
        self.W = nn.Parameter(_orth_scaled(dim, rho, gen))
        self.U = nn.Parameter(torch.randn(dim, in_dim, dtype=DT, generator=gen) / in_dim ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(dim, dtype=DT, generator=gen))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class ResidualCell(nn.Module):
    """f(z, x) = x + 0.5 tanh(z W^T): the output comes from an add, which saves nothing."""

    def __init__(self, dim: int = 5, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(_orth_scaled(dim, 1.0, gen))

    def forward(self, z, x):
        return x + 0.5 * torch.tanh(z @ self.W.T)


class PairCell(nn.Module):
    """A tuple state z = (h, c) of different widths (LSTM-like), contractive.

    h' = tanh(h A^T + c C^T + x U^T),  c' = 0.5 sigmoid(h G^T) * c + tanh(x V^T)
    """

    def __init__(self, dh: int = 4, dc: int = 3, dx: int = 5, seed: int = 1):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(_orth_scaled(dh, 0.4, gen))
        self.C = nn.Parameter(0.3 * torch.randn(dh, dc, dtype=DT, generator=gen) / dc ** 0.5)
        self.U = nn.Parameter(torch.randn(dh, dx, dtype=DT, generator=gen) / dx ** 0.5)
        self.G = nn.Parameter(torch.randn(dc, dh, dtype=DT, generator=gen) / dh ** 0.5)
        self.V = nn.Parameter(torch.randn(dc, dx, dtype=DT, generator=gen) / dx ** 0.5)
        self.dh, self.dc, self.dx = dh, dc, dx

    def forward(self, z, x):
        h, c = z
        h2 = torch.tanh(h @ self.A.T + c @ self.C.T + x @ self.U.T)
        c2 = 0.5 * torch.sigmoid(h @ self.G.T) * c + torch.tanh(x @ self.V.T)
        return h2, c2

    def z0(self, batch: int):
        return torch.zeros(batch, self.dh, dtype=DT), torch.zeros(batch, self.dc, dtype=DT)


def _x(batch: int, dim: int, seed: int = 2, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, dtype=DT, generator=gen).requires_grad_(requires_grad)


def _loss_weights(z, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, dtype=DT, generator=gen) for t in (z if isinstance(z, tuple) else (z,)))


def _loss(z, weights):
    """A nonlinear scalar loss: sum_i w_i * z_i + 0.5 * z_i^2."""
    parts = z if isinstance(z, tuple) else (z,)
    return sum((w * p + 0.5 * p * p).sum() for w, p in zip(weights, parts))


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _close(a, b, tol=1e-10):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# Implicit: finite differences, unrolling, closed forms


def test_gradcheck_implicit_theta_and_x():
    cell = TanhCell(dim=4, in_dim=3)
    layer = DEQLayer(cell, backward=Implicit(tol=1e-12, max_iter=100), tol=1e-12, max_iter=100)
    x = _x(2, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x, torch.zeros(2, 4, dtype=DT)),
                                    (x, *cell.parameters()), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_implicit_tuple_state():
    cell = PairCell()
    layer = DEQLayer(cell, backward=Implicit(tol=1e-12, max_iter=100), tol=1e-12, max_iter=100)
    x = _x(2, cell.dx, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: layer(x, cell.z0(2)), (x, *cell.parameters()),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_implicit_equals_autograd_through_unrolled_steps(solver):
    cell = TanhCell(dim=6, rho=0.8)
    x = _x(3, 6, requires_grad=True)
    params = (x, *cell.parameters())
    layer = DEQLayer(cell, backward=Implicit(solver=solver, tol=1e-13, max_iter=300), tol=1e-13,
                     max_iter=300)
    z = layer(x)
    w = _loss_weights(z)
    got = _grads(_loss(z, w), params)
    assert bool(layer.last_result.backward.converged.all())
    layer.unroll_steps = 300  # 0.8^300 ~ 1e-29: the unrolled net is at the fixed point
    ref = _grads(_loss(layer(x), w), params)
    _close(got, ref)


def test_implicit_equals_closed_form_for_linear_f():
    """z = A z + B x: z* = (I - A)^{-1} B x, dL/dx = B^T (I - A)^{-T} dL/dz*, dL/dA = g z*^T."""
    dim, din, batch = 5, 3, 4
    gen = torch.Generator().manual_seed(5)
    A = nn.Parameter(_orth_scaled(dim, 0.7, gen))
    B = nn.Parameter(torch.randn(dim, din, dtype=DT, generator=gen))
    x = _x(batch, din, requires_grad=True)
    layer = DEQLayer(lambda z, x: z @ A.T + x @ B.T, backward=Implicit(**TIGHT), **TIGHT)
    z = layer(x, torch.zeros(batch, dim, dtype=DT))
    (w,) = _loss_weights(z)
    gx, gA, gB = _grads(_loss(z, (w,)), (x, A, B))

    eye = torch.eye(dim, dtype=DT)
    z_star = torch.linalg.solve(eye - A.detach(), (x.detach() @ B.detach().T).T).T  # (batch, dim)
    v = w + z_star  # dL/dz at z*
    g = torch.linalg.solve((eye - A.detach()).T, v.T).T  # rows g_b = (I - A)^{-T} v_b
    _close((z.detach(),), (z_star,))
    _close((gx, gA, gB), (g @ B.detach(), g.T @ z_star, g.T @ x.detach()))


def _flat_f(cell, x, spec):
    """f as a map of the flat batch vector (B*D,), for explicit Jacobians."""
    def f(flat):
        parts, start = [], 0
        for shape in spec:
            n = shape.numel()
            parts.append(flat[start:start + n].reshape(shape))
            start += n
        z = tuple(parts) if len(parts) > 1 else parts[0]
        out = cell(z, x)
        return torch.cat([o.reshape(-1) for o in (out if isinstance(out, tuple) else (out,))])
    return f


def _explicit_jacobians(cell, z_star, x):
    """J = df/dz (flat, (N, N)) and df/dtheta per parameter ((N, *shape)) at z_star."""
    parts = z_star if isinstance(z_star, tuple) else (z_star,)
    spec = [p.shape for p in parts]
    flat = torch.cat([p.reshape(-1) for p in parts]).detach()
    J = jacobian(_flat_f(cell, x, spec), flat)
    names = [n for n, _ in cell.named_parameters()]
    base = dict(cell.named_parameters())

    def with_param(name):
        def g(p):
            out = torch.func.functional_call(cell, {**base, name: p}, (z_star, x))
            return torch.cat([o.reshape(-1) for o in (out if isinstance(out, tuple) else (out,))])
        return g

    dtheta = [jacobian(with_param(n), base[n].detach()) for n in names]
    return J, dtheta


def _flat(z):
    return torch.cat([t.reshape(-1) for t in (z if isinstance(z, tuple) else (z,))])


def _param_grads_from_adjoint(g, dtheta):
    return [torch.tensordot(g, d, dims=1) for d in dtheta]


def test_implicit_linearised_at_returned_z():
    """The IFT formula at res.z (not at f(res.z)) is what Implicit computes.

    A loose forward solve makes z* and f(z*) differ by ~1e-3; the backward is
    tight, so the two candidate formulas differ by far more than the tolerance.
    """
    cell = TanhCell(dim=5, rho=0.9)
    x = _x(2, 5)
    layer = DEQLayer(cell, solver=FixedPoint(), backward=Implicit(**TIGHT), tol=1e-3, max_iter=200)
    z = layer(x)
    w = _loss_weights(z)
    got = _grads(_loss(z, w), tuple(cell.parameters()))

    z_star = layer.last_result.z
    v = _flat(w) + _flat(z.detach())  # dL/dz at the returned output
    results = []
    for point in (z_star, cell(z_star, x).detach()):
        J, dtheta = _explicit_jacobians(cell, point, x)
        g = torch.linalg.solve((torch.eye(J.shape[0], dtype=DT) - J).T, v)
        results.append(_param_grads_from_adjoint(g, dtheta))
    at_z, at_fz = results
    _close(got, at_z)
    assert max((a - b).abs().max().item() for a, b in zip(at_z, at_fz)) > 1e-6


# ---------------------------------------------------------------------------
# Phantom gradients


def _cell_and_input(kind: str, batch: int = 2):
    if kind == "tensor":
        cell = TanhCell(dim=4, in_dim=3, rho=0.7)
        return cell, _x(batch, 3, requires_grad=True), torch.zeros(batch, 4, dtype=DT)
    cell = PairCell()
    return cell, _x(batch, cell.dx, requires_grad=True), cell.z0(batch)


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
@pytest.mark.parametrize("k,damping", [(1, 1.0), (1, 0.5), (3, 0.5), (5, 1.0), (5, 0.5)])
def test_upg_equals_autograd_through_k_damped_steps(kind, k, damping):
    cell, x, z0 = _cell_and_input(kind)
    layer = DEQLayer(cell, backward=UPG(k=k, damping=damping), tol=1e-4, max_iter=50)
    z = layer(x, z0)
    w = _loss_weights(z)
    params = (x, *cell.parameters())
    got = _grads(_loss(z, w), params)

    ref_z = tuple(t.detach() for t in _as_tuple(layer.last_result.z))
    for _ in range(k):
        fz = _as_tuple(cell(ref_z if kind == "tuple" else ref_z[0], x))
        ref_z = tuple((1 - damping) * a + damping * b for a, b in zip(ref_z, fz))
    _close(_as_tuple(z), tuple(t.detach() for t in ref_z), tol=1e-13)
    ref = _grads(_loss(ref_z if kind == "tuple" else ref_z[0], w), params)
    _close(got, ref, tol=1e-12)


def _as_tuple(z):
    return z if isinstance(z, tuple) else (z,)


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
@pytest.mark.parametrize("k,damping", [(1, 0.5), (2, 1.0), (4, 0.5), (7, 0.8)])
def test_npg_equals_truncated_series_from_explicit_jacobian(kind, k, damping):
    """g = damping * sum_{i<k} B^{T i} v with B = damping J + (1 - damping) I, J explicit."""
    cell, x, z0 = _cell_and_input(kind)
    layer = DEQLayer(cell, backward=NPG(k=k, damping=damping), tol=1e-3, max_iter=50)
    z = layer(x, z0)
    w = _loss_weights(z)
    got = _grads(_loss(z, w), tuple(cell.parameters()))

    z_star = layer.last_result.z
    J, dtheta = _explicit_jacobians(cell, z_star, x.detach())
    Bt = (damping * J + (1 - damping) * torch.eye(J.shape[0], dtype=DT)).T
    v = _flat(w) + _flat(tuple(t.detach() for t in _as_tuple(z)))
    term, total = v, v.clone()
    for _ in range(k - 1):
        term = Bt @ term
        total = total + term
    _close(got, _param_grads_from_adjoint(damping * total, dtheta), tol=1e-11)


def test_npg_equals_upg_for_linear_f_at_exact_fixed_point():
    dim = 4
    gen = torch.Generator().manual_seed(7)
    A = nn.Parameter(_orth_scaled(dim, 0.8, gen))
    x = _x(3, dim, requires_grad=True)
    grads = []
    for bw in (UPG(k=4, damping=0.6), NPG(k=4, damping=0.6)):
        layer = DEQLayer(lambda z, x: z @ A.T + x, backward=bw, **TIGHT)
        z = layer(x)
        grads.append(_grads(_loss(z, _loss_weights(z)), (x, A)))
    _close(*grads, tol=1e-11)


def test_jfb_is_upg_one_step_undamped():
    assert JFB() == UPG(k=1, damping=1.0)
    assert get_backward("jfb") == UPG(k=1, damping=1.0)
    cell = TanhCell()
    x = _x(3, 5, requires_grad=True)
    grads = []
    for bw in (JFB(), UPG(k=1, damping=1.0), "jfb"):
        layer = DEQLayer(cell, backward=bw, tol=1e-8, max_iter=50)
        z = layer(x)
        grads.append(_grads(_loss(z, _loss_weights(z)), (x, *cell.parameters())))
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert torch.equal(a, b)
    # JFB: the gradient of one plain step f(z*, x) with z* detached.
    z_star = layer.last_result.z
    fz = cell(z_star, x)
    _close(grads[0], _grads(_loss(fz, _loss_weights(fz)), (x, *cell.parameters())), tol=1e-14)


# ---------------------------------------------------------------------------
# The incoming gradient, the backward statistics, the policy


BACKWARDS = [Implicit(**TIGHT), NPG(k=5, damping=0.5), UPG(k=5, damping=0.5), JFB()]
IDS = ["implicit", "npg", "upg", "jfb"]


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
@pytest.mark.parametrize("backward", BACKWARDS, ids=IDS)
def test_grad_output_is_not_modified(kind, backward):
    cell, x, z0 = _cell_and_input(kind, batch=3)
    layer = DEQLayer(cell, backward=backward, tol=1e-10, max_iter=100)
    z = layer(x, z0)
    gen = torch.Generator().manual_seed(11)
    grad_out = tuple(torch.randn(t.shape, dtype=DT, generator=gen) for t in _as_tuple(z))
    before = tuple(g.clone() for g in grad_out)
    torch.autograd.backward(_as_tuple(z), grad_out)
    for g, g0 in zip(grad_out, before):
        assert torch.equal(g, g0)
    assert cell.U.grad is not None and x.grad is not None


def test_backward_statistics_recorded_after_backward():
    cell = TanhCell()
    x = _x(3, 5)
    layer = DEQLayer(cell, backward=Implicit(tol=1e-10, max_iter=60), tol=1e-8, max_iter=60)
    z = layer(x)
    assert layer.last_result.backward is None
    fwd_nstep = layer.last_result.nstep.clone()
    z.pow(2).sum().backward()
    bwd = layer.last_result.backward
    assert bwd is not None and bwd.stop_mode == "rel" and bwd.tol == 1e-10 and bwd.solver == "anderson"
    assert bwd.nstep.shape == (3,) and bool((bwd.nstep >= 2).all()) and bool((bwd.nstep <= 60).all())
    assert bool(bwd.converged.all()) and bool((bwd.residual <= 1e-10).all())
    assert torch.equal(layer.last_result.nstep, fwd_nstep)  # the forward statistics are kept
    assert not bwd.z.requires_grad and not layer.last_result.z.requires_grad


@pytest.mark.parametrize("backward", [NPG(), UPG(k=3, damping=0.7), JFB()], ids=["npg", "upg", "jfb"])
def test_phantom_backward_records_no_solve(backward):
    layer = DEQLayer(TanhCell(), backward=backward, tol=1e-8)
    layer(_x(2, 5, requires_grad=True)).sum().backward()
    assert layer.last_result is not None and layer.last_result.backward is None
    assert layer.counts.backward.calls == 0


def _stubborn_layer(policy):
    """A backward solve that cannot reach its tolerance in 2 iterations."""
    return DEQLayer(TanhCell(rho=0.9), backward=Implicit(solver=FixedPoint(), tol=1e-12, max_iter=2),
                    tol=1e-12, max_iter=100, on_nonconvergence=policy)


def test_backward_nonconvergence_raises():
    layer = _stubborn_layer("raise")
    z = layer(_x(2, 5))  # the forward converges: no error yet
    with pytest.raises(ConvergenceError, match=r"backward solve \(fixed_point\) did not converge for 2 of 2"):
        z.sum().backward()


def test_backward_nonconvergence_warns_on_the_1st_2nd_4th_failure_with_counts():
    layer = _stubborn_layer("warn")
    with pytest.warns(RuntimeWarning, match=r"backward solve .* max residual [0-9.e+-]+ > tol 1e-12"):
        layer(_x(2, 5)).sum().backward()
    assert layer.last_result.backward.n_iter == 2
    messages = []
    for _ in range(7):  # failures 2 to 8
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(_x(2, 5)).sum().backward()
        messages.append([str(w.message) for w in caught if "did not converge" in str(w.message)])
    assert [len(m) for m in messages] == [1, 0, 1, 0, 0, 0, 1]  # the 2nd, 4th and 8th
    assert "So far 8 of 8 backward solves failed, 0 diverged" in messages[-1][0]
    assert layer.counts.backward.calls == 8 and layer.counts.backward.failed == 8
    assert layer.counts.forward.calls == 8 and layer.counts.forward.failed == 0


def test_backward_nonconvergence_ignored():
    layer = _stubborn_layer("ignore")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(_x(2, 5)).sum().backward()
    assert not caught
    assert not bool(layer.last_result.backward.converged.any())


def test_backward_nonfinite_names_the_stage():
    layer = DEQLayer(TanhCell(), backward=Implicit(), tol=1e-8)
    z = layer(_x(2, 5))
    with pytest.raises(NonFiniteError, match="backward solve") as info:
        (z * torch.tensor([[float("nan")], [1.0]], dtype=DT)).sum().backward()
    assert info.value.stage == "backward" and info.value.samples == [0]


def test_backward_diverging_solve_raises_nonfinite():
    """f(z) = 3 z + x: the forward (Anderson) solves it, the backward fixed-point iteration overflows."""
    layer = DEQLayer(lambda z, x: 3.0 * z + x, backward=Implicit(solver=FixedPoint(), max_iter=1000),
                     tol=1e-8, max_iter=20)
    x = _x(2, 3, requires_grad=True)
    z = layer(x)
    assert bool(layer.last_result.converged.all())
    with pytest.raises(NonFiniteError, match=r"backward solve \(fixed_point\).* at step \d+") as info:
        z.sum().backward()
    # 3^n overflows float64 (or its residual norm does) after 300 to 650 steps
    assert info.value.stage == "backward" and 300 < info.value.step < 700 and info.value.samples == [0, 1]


@pytest.mark.parametrize("backward", [Implicit(**TIGHT), NPG()], ids=["implicit", "npg"])
def test_second_derivative_through_adjoint_raises(backward):
    """The adjoint solve keeps no graph; a second derivative must not be silently wrong."""
    layer = DEQLayer(TanhCell(), backward=backward, tol=1e-10, max_iter=100)
    x = _x(2, 5, requires_grad=True)
    z = layer(x)
    (gx,) = torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
    layer2 = DEQLayer(layer.f, backward=backward, tol=1e-10, max_iter=100)
    (ref,) = torch.autograd.grad(layer2(x).pow(2).sum(), x)
    _close((gx.detach(),), (ref,), tol=1e-12)  # first order is still right under create_graph
    with pytest.raises(RuntimeError, match="not differentiable again"):
        torch.autograd.grad(gx.sum(), x)


# ---------------------------------------------------------------------------
# Memory: bytes saved for backward, counted through saved_tensors_hooks


class SavedBytes:
    """Storages autograd saves for backward inside the context, each counted once."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def _pack(self, t):
        s = t.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _storage(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


SLOW_CONTRACTION = dict(solver=FixedPoint(), tol=1e-300, stop_mode="abs", on_nonconvergence="ignore")


@pytest.mark.parametrize("backward", BACKWARDS, ids=IDS)
def test_saved_bytes_do_not_grow_with_max_iter(backward):
    cell = TanhCell(dim=6, rho=0.98)
    x = _x(4, 6)
    totals = []
    for max_iter in (10, 100):
        layer = DEQLayer(cell, backward=backward, max_iter=max_iter, **SLOW_CONTRACTION)
        with SavedBytes() as saved:
            z = layer(x)
        assert layer.last_result.n_iter == max_iter  # the solver really ran every iteration
        totals.append(saved.total)
        z.sum().backward()
    assert totals[0] == totals[1]


@pytest.mark.parametrize("backward", [Implicit(**TIGHT), NPG(k=5, damping=0.5)], ids=["implicit", "npg"])
@pytest.mark.parametrize("cell_kind", ["tanh", "residual"])
def test_implicit_and_npg_save_exactly_one_f_graph(backward, cell_kind):
    """Saved storages == those of one plain call f(z*, x) with z* requiring grad, plus f(z*)'s.

    The layer's extra is the storage of f(z*) itself (which it hands back as
    the output, a view of it): for TanhCell f's graph already saves it (tanh
    saves its output), so nothing is extra; for ResidualCell the output of the
    final add is saved by nobody else, so the extra is exactly one z-sized
    tensor, batch * dim * 8 bytes.
    """
    batch, dim = 4, 6
    cell = TanhCell(dim=dim) if cell_kind == "tanh" else ResidualCell(dim=dim)
    x = _x(batch, dim)
    layer = DEQLayer(cell, backward=backward, tol=1e-10, max_iter=100)
    with SavedBytes() as saved:
        z = layer(x)
    z_star = layer.last_result.z.detach().requires_grad_()  # the same storage the layer linearised at
    with SavedBytes() as plain:
        out = cell(z_star, x)
    # z* and the layer's own f(z*) (z is a view of it) are kept, whether or not f's graph keeps them.
    assert _storage(z_star)[0] in saved.storages and _storage(z)[0] in saved.storages
    expected = plain.total + sum(n for p, n in (_storage(z_star), _storage(out)) if p not in plain.storages)
    assert saved.total == expected
    extra = saved.total - plain.total
    assert extra == (0 if cell_kind == "tanh" else batch * dim * 8)
    z.sum().backward()


def test_upg_saves_k_f_graphs():
    """UPG(k) keeps k graphs of f: each step adds one f graph's activations (z_i and its output).

    Shared storages (W, x) count once. The first step starts at the detached z*,
    so autograd does not keep W for a gradient w.r.t. z there; from k = 2 on, it
    does. Hence JFB = UPG(1) saves one f graph without W.
    """
    batch, dim = 4, 6
    cell = TanhCell(dim=dim)
    x = _x(batch, dim)
    z_leaf = torch.zeros(batch, dim, dtype=DT, requires_grad=True)
    with SavedBytes() as plain:
        cell(z_leaf, x)
    shared = {_storage(cell.W)[0], _storage(x)[0]}
    act = sum(n for p, n in plain.storages.items() if p not in shared)
    assert act == 2 * batch * dim * 8  # z and tanh(...)
    w_bytes = _storage(cell.W)[1]

    for k in range(1, 6):
        layer = DEQLayer(cell, backward=UPG(k=k, damping=0.5), tol=1e-10, max_iter=100)
        with SavedBytes() as saved:
            layer(x)
        one_graph_shared = plain.total - act  # W and x
        expected = k * act + one_graph_shared - (w_bytes if k == 1 else 0)
        assert saved.total == expected, k
        # and exactly what autograd through k damped steps from the detached z* saves
        z = layer.last_result.z
        with SavedBytes() as manual:
            for _ in range(k):
                z = 0.5 * z + 0.5 * cell(z, x)
        assert saved.total == manual.total

    layer = DEQLayer(cell, backward=JFB(), tol=1e-10, max_iter=100)
    with SavedBytes() as saved:
        layer(x)
    assert saved.total == plain.total - w_bytes


# ---------------------------------------------------------------------------
# A backward solve that diverges: never a silent, huge, wrong gradient


def _slopes_layer(slopes, **implicit):
    """f(z, x) = a_b z + x per sample: J = a_b I, exact dL/dx_b = w_b / (1 - a_b).

    Anderson solves the forward of any slope != 1 in a few steps; the backward
    FixedPoint iteration g <- a_b g + w_b contracts for |a_b| < 1 and grows
    like a_b^k for a_b > 1.
    """
    a = torch.tensor(slopes, dtype=DT)[:, None]
    layer = DEQLayer(lambda z, x: a * z + x, backward=Implicit(solver=FixedPoint(), max_iter=50, **implicit),
                     tol=1e-10, max_iter=20)
    return layer, a


def test_diverging_backward_gives_no_gradient_and_is_counted_and_warned():
    """The reproducer of the issue: f(z) = 1.5 z + x. dL/dx was 8.5e8 (exact: -2), and silent on the 2nd call."""
    layer, _ = _slopes_layer([1.5, 1.5])
    for call in (1, 2):
        x = _x(2, 3, requires_grad=True)
        z = layer(x)
        assert bool(layer.last_result.converged.all())  # the forward is fine
        with pytest.warns(RuntimeWarning, match=r"backward solve \(fixed_point\) did not converge for 2 of 2 .* "
                                                r"2 of them diverged .* on_divergence='zero'") as record:
            z.sum().backward()
        assert f"So far {call} of {call} backward solves failed, {call} diverged" in str(record[0].message)
        assert torch.equal(x.grad, torch.zeros_like(x))
    assert (layer.counts.backward.calls, layer.counts.backward.failed, layer.counts.backward.diverged) == (2, 2, 2)


def test_only_the_diverged_samples_lose_their_gradient():
    """a = 0.5 converges; a = 0.95 runs out of iterations but progresses (it keeps its partial sum); 1.5 diverges."""
    layer, a = _slopes_layer([0.5, 0.95, 1.5])
    x = _x(3, 4, requires_grad=True)
    (w,) = _loss_weights(x)
    with pytest.warns(RuntimeWarning, match="2 of 3 samples .* 1 of them diverged"):
        (layer(x) * w).sum().backward()
    bwd = layer.last_result.backward
    assert bwd.converged.tolist() == [True, False, False]
    # Fixed-point iterates from 0: g_k = (1 - a^k) / (1 - a) w at the step k returned.
    k = bwd.best_step.to(DT)[:, None]
    partial = (1 - a ** k) / (1 - a) * w
    torch.testing.assert_close(x.grad[0], w[0] / (1 - a[0]), rtol=1e-5, atol=0)  # converged: the exact gradient
    torch.testing.assert_close(x.grad[1], partial[1], rtol=1e-12, atol=0)          # not converged: its best iterate
    assert torch.equal(x.grad[2], torch.zeros(4, dtype=DT))                        # diverged: no gradient
    assert layer.counts.backward.diverged == 1


def test_on_divergence_jfb_pushes_the_incoming_gradient_through_one_step():
    layer, a = _slopes_layer([0.5, 1.5], on_divergence="jfb")
    x = _x(2, 3, requires_grad=True)
    (w,) = _loss_weights(x)
    with pytest.warns(RuntimeWarning, match="on_divergence='jfb'"):
        (layer(x) * w).sum().backward()
    torch.testing.assert_close(x.grad[0], w[0] / (1 - a[0]), rtol=1e-5, atol=0)
    assert torch.equal(x.grad[1], w[1])  # JFB: d f / d x = I


def test_on_divergence_raise_names_the_samples():
    layer, _ = _slopes_layer([0.5, 1.5, 1.5], on_divergence="raise")
    layer.on_nonconvergence = "ignore"  # the raise is the backward object's, not the layer's policy
    z = layer(_x(3, 2, requires_grad=True))
    message = r"Implicit backward solve \(fixed_point\) diverged for samples \[1, 2\]"
    with pytest.raises(ConvergenceError, match=message):
        z.sum().backward()
    assert layer.counts.backward.diverged == 1  # counted before it raised


def test_on_divergence_is_checked():
    with pytest.raises(ValueError, match="unknown on_divergence 'skip'; known: zero, jfb, raise"):
        Implicit(on_divergence="skip")


def test_implicit_defaults():
    assert Implicit() == Implicit(solver=Anderson(m=5, lam=1e-4, beta=1.0), tol=None, max_iter=50, stop_mode="rel",
                                  on_divergence="zero")


class _CountingHook:
    """A full backward hook on a module inside f: counts its calls (one per VJP through the module)."""

    def __init__(self, module):
        self.calls = 0
        module.register_full_backward_hook(self)

    def __call__(self, module, grad_input, grad_output):
        self.calls += 1


@pytest.mark.parametrize("slow", [False, True], ids=["converges", "slow"])
def test_backward_hooks_in_f_fire_once_per_vjp(slow):
    """Implicit: n_iter VJPs in the solve, one for theta and x, and one for the divergence check when not converged."""
    lin = nn.Linear(5, 5, dtype=DT)
    with torch.no_grad():
        lin.weight.copy_(_orth_scaled(5, 0.99 if slow else 0.5, torch.Generator().manual_seed(0)))
    hook = _CountingHook(lin)
    layer = DEQLayer(lambda z, x: torch.tanh(lin(z + x)), backward=Implicit(solver=FixedPoint(), max_iter=30),
                     tol=1e-10, max_iter=100, on_nonconvergence="ignore")
    layer(_x(3, 5, requires_grad=True)).sum().backward()
    bwd = layer.last_result.backward
    assert bool(bwd.converged.all()) != slow
    assert hook.calls == bwd.n_iter + 1 + (1 if slow else 0)
    for k, backward in ((4, NPG(k=4)), (3, UPG(k=3))):
        hook.calls = 0
        layer = DEQLayer(lambda z, x: torch.tanh(lin(z + x)), backward=backward, tol=1e-10)
        layer(_x(3, 5, requires_grad=True)).sum().backward()
        assert hook.calls == k


# ---------------------------------------------------------------------------
# Nothing to differentiate: no re-attachment, no solve; in-place outputs


@pytest.mark.parametrize("backward", [Implicit(**TIGHT), NPG(k=3), UPG(k=2)], ids=["implicit", "npg", "upg"])
def test_frozen_f_and_x_without_grad_run_no_backward(backward):
    cell = TanhCell().requires_grad_(False)
    hook = _CountingHook(cell)
    layer = DEQLayer(cell, backward=backward, tol=1e-10)
    z = layer(_x(3, 5))
    assert not z.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(z, layer(_x(3, 5)), rtol=0, atol=1e-9)  # UPG: k damped steps, not f(z*)
    head = nn.Parameter(torch.ones(5, dtype=DT))
    (z * head).sum().backward()  # a trainable head after the frozen DEQ still trains
    assert head.grad is not None and hook.calls == 0
    assert layer.last_result.backward is None and layer.counts.backward.calls == 0


@pytest.mark.parametrize("backward", [Implicit(**TIGHT), NPG(k=3)], ids=["implicit", "npg"])
def test_frozen_f_with_x_needing_grad_still_differentiates_x(backward):
    cell = TanhCell()
    x = _x(3, 5, requires_grad=True)
    (ref,) = _grads(DEQLayer(cell, backward=backward, tol=1e-12, max_iter=100)(x).pow(2).sum(), (x,))
    cell.requires_grad_(False)
    z = DEQLayer(cell, backward=backward, tol=1e-12, max_iter=100)(x)
    assert z.requires_grad
    _close(_grads(z.pow(2).sum(), (x,)), (ref,), tol=1e-14)


def test_a_parameter_captured_by_a_closure_is_found():
    """f is a lambda, not a module: the layer cannot list its parameters, the graph of f(z*) still reaches A."""
    A = nn.Parameter(_orth_scaled(4, 0.5, torch.Generator().manual_seed(1)))
    z = DEQLayer(lambda z, x: torch.tanh(z @ A.T + x), backward=Implicit(**TIGHT), **TIGHT)(_x(2, 4))
    assert z.requires_grad
    (gA,) = _grads(z.sum(), (A,))
    assert gA.abs().sum() > 0


def test_parameters_inside_a_checkpointed_f_are_found():
    """Non-reentrant checkpoint keeps an ordinary graph (recomputed on use): its parameters are reached."""
    cell = TanhCell()
    x = _x(3, 5)
    grads = []
    for f in (cell, lambda z, x: checkpoint(cell, z, x, use_reentrant=False)):
        z = DEQLayer(f, backward=Implicit(**TIGHT), **TIGHT)(x)
        assert z.requires_grad
        grads.append(_grads(z.pow(2).sum(), tuple(cell.parameters())))
    _close(*grads, tol=1e-14)


@pytest.mark.parametrize("backward", [Implicit(**TIGHT), NPG(k=3)], ids=["implicit", "npg"])
def test_implicit_and_npg_outputs_are_views_that_refuse_in_place_ops(backward):
    """Documented: they are views of the f(z*) the backward keeps (no copy); clone first. UPG's are not."""
    cell = TanhCell()
    x = _x(3, 5, requires_grad=True)
    layer = DEQLayer(cell, backward=backward, **TIGHT)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        layer(x).relu_()
    got = _grads(layer(x).clone().relu_().sum(), (x, *cell.parameters()))
    _close(got, _grads(torch.relu(layer(x)).sum(), (x, *cell.parameters())), tol=1e-14)


def test_upg_and_jfb_outputs_can_be_modified_in_place():
    """Plain autograd outputs (f's last op here, an add, saves nothing): in-place ops just work."""
    cell = ResidualCell()
    x = _x(3, 5, requires_grad=True)
    for backward in (UPG(k=2, damping=0.7), JFB()):
        layer = DEQLayer(cell, backward=backward, tol=1e-10)
        got = _grads(layer(x).relu_().sum(), (x, cell.W))
        _close(got, _grads(torch.relu(layer(x)).sum(), (x, cell.W)), tol=1e-14)


# ---------------------------------------------------------------------------
# The backward tolerance follows the dtype f runs in


def test_default_tol_is_the_unit_roundoff_and_never_below_1e6():
    assert default_tol(torch.float64) == 1e-6 and default_tol(torch.float32) == 1e-6
    assert default_tol(torch.float16) == 2.0 ** -11 and default_tol(torch.bfloat16) == 2.0 ** -8


class _Float32Cell(nn.Module):
    """TanhCell in float32: under CPU bf16 autocast its matmuls (and their VJPs) run in bf16."""

    def __init__(self, dim: int = 64, rho: float = 0.9):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(_orth_scaled(dim, rho, gen).float())
        self.U = nn.Parameter((torch.randn(dim, dim, dtype=DT, generator=gen) / dim ** 0.5).float())

    def forward(self, z, x):
        # Back to the state's dtype, as a LayerNorm (float32 under autocast) would do.
        return torch.tanh(z @ self.W.T + x @ self.U.T).to(z.dtype)


def _autocast_grad(layer, x, dtype):
    with torch.autocast("cpu", dtype=dtype):
        z = layer(x)
    assert z.dtype == torch.float32
    (gW,) = _grads(z.pow(2).sum(), (layer.f.W,))
    return gW.double()


@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)], ids=["bf16", "fp16"])
def test_autocast_backward_stops_at_the_dtypes_default_tol_as_accurate_as_at_its_floor(dtype, unit):
    """At tol 1e-6 the bf16/fp16 adjoint stalls near 1e-4/1e-5, runs to its cap and warns; the gradient is no better.

    Measured here: 6-8 iterations at the default tol against 200, gradient errors
    against float64 within 18% of those at the floor (bf16 8.5e-3 vs 7.2e-3,
    fp16 1.0e-3 vs 0.9e-3).
    """
    cell = _Float32Cell()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    ref_cell = copy.deepcopy(cell).double()
    ref_z = DEQLayer(ref_cell, backward=Implicit(tol=1e-12, max_iter=100), tol=1e-12, max_iter=100)(x.double())
    (ref,) = _grads(ref_z.pow(2).sum(), (ref_cell.W,))

    layer = DEQLayer(cell, backward=Implicit(), tol=unit, max_iter=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        at_default = _autocast_grad(layer, x, dtype)
    assert not [w for w in caught if "did not converge" in str(w.message)]
    bwd = layer.last_result.backward
    assert bwd.tol == unit and bool(bwd.converged.all()) and bwd.n_iter < 20

    layer.backward = Implicit(tol=1e-6, max_iter=200)  # the old default: unreachable
    with pytest.warns(RuntimeWarning, match="backward solve .* did not converge"):
        at_floor = _autocast_grad(layer, x, dtype)
    assert layer.last_result.backward.n_iter == 200
    err_default, err_floor = (float((g - ref).norm() / ref.norm()) for g in (at_default, at_floor))
    assert err_default <= 1.3 * err_floor and err_default < 20 * unit


def test_default_tol_follows_the_state_dtype_and_an_explicit_tol_wins():
    cell = TanhCell()
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-6), (torch.bfloat16, 2.0 ** -8)):
        layer = DEQLayer(copy.deepcopy(cell).to(dtype), solver=FixedPoint(), backward=Implicit(), tol=1e-2,
                         max_iter=100)
        layer(_x(3, 5).to(dtype)).float().sum().backward()
        assert layer.last_result.backward.tol == tol, dtype
    layer = DEQLayer(copy.deepcopy(cell).float(), solver=FixedPoint(), backward=Implicit(tol=1e-3), tol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(_x(3, 5).float())
    z.sum().backward()
    assert layer.last_result.backward.tol == 1e-3
