"""Behaviours the rest of the suite let change, found by mutation testing (README: "Mutation testing").

Each test pins one documented behaviour at parameter values where a plausible
slip in the code shows: an option that must reach a call, a field of a
result, a branch that only a particular input takes.
"""

from __future__ import annotations

import collections
import math
import warnings

import pytest
import torch

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deq import JFB, NPG, UPG, DEQLayer, Implicit, solve
from deq.layer import _Call, select_rows
from deq.reg import jacobian_reg, spectral_radius
from deq.solvers import Anderson, Broyden, FixedPoint, NonFiniteError

F64 = torch.float64


# ----------------------------------------------------------------------------
# deq.reg


def _unused_part_map():
    """f(z, x) = (h * s, 0.1 h[:, :2]) for z = (h, c): no output depends on c."""
    s = torch.tensor([0.9, -0.5, 0.3], dtype=F64)
    return lambda z, x: (z[0] * s, 0.1 * z[0][:, :2]), s


def test_spectral_radius_default_is_thirty_power_steps_and_follows_the_generator():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 5, dtype=F64, generator=gen)
    z = torch.randn(2, 5, dtype=F64, generator=gen)
    f = lambda z, x: torch.tanh(z @ w.T)  # noqa: E731
    default = spectral_radius(f, z, None, generator=torch.Generator().manual_seed(3))
    thirty = spectral_radius(f, z, None, n_iter=30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(default, thirty)
    assert not torch.equal(default, spectral_radius(f, z, None, n_iter=31, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(default, spectral_radius(f, z, None, generator=torch.Generator().manual_seed(4)))
    assert default.dtype == F64


def test_spectral_radius_with_one_power_step_is_the_norm_ratio_of_one_vjp():
    s = torch.tensor([0.9, -0.5, 0.3], dtype=F64)
    z = torch.ones(2, 3, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    rho = spectral_radius(lambda z, x: z * s, z, None, n_iter=1, generator=gen)
    u = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rho, (u * s).norm(dim=1) / u.norm(dim=1), rtol=1e-14, atol=0)


def test_spectral_radius_and_jacobian_reg_of_a_tuple_state_with_an_unused_part():
    """The c part reaches no output: its VJP is None, counted as zero (not an error)."""
    f, s = _unused_part_map()
    z = (torch.ones(2, 3, dtype=F64), torch.ones(2, 2, dtype=F64))
    rho = spectral_radius(f, z, None, n_iter=200, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rho, torch.full((2,), 0.9, dtype=F64), rtol=1e-8, atol=0)
    reg = jacobian_reg(f, z, None, n_probes=1, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    eps_h, eps_c = torch.randn(2, 3, dtype=F64, generator=gen), torch.randn(2, 2, dtype=F64, generator=gen)
    vjp_h = eps_h * s + torch.cat([0.1 * eps_c, torch.zeros(2, 1, dtype=F64)], dim=1)
    torch.testing.assert_close(reg, (vjp_h ** 2).sum(dim=1).mean() / 5, rtol=1e-14, atol=0)


def test_jacobian_reg_follows_its_generator_and_keeps_the_dtype():
    w = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    z = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    f = lambda z, x: torch.tanh(z @ w.T)  # noqa: E731
    one = jacobian_reg(f, z, None, n_probes=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(one, jacobian_reg(f, z, None, n_probes=2, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(one, jacobian_reg(f, z, None, n_probes=2, generator=torch.Generator().manual_seed(6)))
    assert one.dtype == F64 and one.shape == ()


# ----------------------------------------------------------------------------
# Empty batches


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_empty_result_has_every_field_typed_like_a_full_one(solver):
    z0 = (torch.zeros(0, 3, dtype=F64), torch.zeros(0, 2, dtype=torch.float32))
    res = solve(torch.cos, z0, solver=solver, tol=1e-3, max_iter=7, stop_mode="rel", atol=1e-9)
    full = solve(lambda z: tuple(torch.cos(t) for t in z), tuple(torch.zeros(2, *t.shape[1:], dtype=t.dtype) for t in z0),
                 solver=solver, tol=1e-3, max_iter=7, stop_mode="rel", atol=1e-9)
    for name in ("nstep", "residual", "converged", "best_step"):
        got, want = getattr(res, name), getattr(full, name)
        assert got.shape == (0,) and got.dtype == want.dtype, name
    assert res.trace.shape == (0, 0) and res.trace.dtype == full.trace.dtype
    assert (res.solver, res.stop_mode, res.tol, res.atol, res.rows, res.n_iter) == (full.solver, "rel", 1e-3, 1e-9, 0, 0)
    assert [t.dtype for t in res.z] == [F64, torch.float32]
    assert res.z[0] is not z0[0]  # a copy, as for a full batch
    assert set(res.summary()) == set(full.summary())
    assert all(math.isnan(v) for v in res.summary().values())


# ----------------------------------------------------------------------------
# select_rows and the active-set form of a layer call


class _Selectable:
    def __init__(self, data):
        self.data = data

    def select_rows(self, rows):
        return _Selectable(self.data[rows])


def test_select_rows_of_nested_inputs():
    Pair = collections.namedtuple("Pair", "a b")
    x = {"t": torch.arange(4.0), "list": [torch.arange(4.0) * 2, None], "pair": Pair(torch.arange(4.0) + 1, 7),
         "own": _Selectable(torch.arange(4.0) - 1), "name": "s", "flag": True, "scale": 0.5}
    rows = torch.tensor([1, 3])
    out = select_rows(x, rows)
    assert torch.equal(out["t"], torch.tensor([1.0, 3.0]))
    assert isinstance(out["list"], list) and torch.equal(out["list"][0], torch.tensor([2.0, 6.0]))
    assert out["list"][1] is None
    assert type(out["pair"]) is Pair and torch.equal(out["pair"].a, torch.tensor([2.0, 4.0])) and out["pair"].b == 7
    assert isinstance(out["own"], _Selectable) and torch.equal(out["own"].data, torch.tensor([0.0, 2.0]))
    assert (out["name"], out["flag"], out["scale"]) == ("s", True, 0.5)
    plain = select_rows((torch.arange(4.0), 3), rows)
    assert type(plain) is tuple and torch.equal(plain[0], torch.tensor([1.0, 3.0])) and plain[1] == 3
    with pytest.raises(TypeError, match="select_rows"):
        select_rows(object(), rows)


def test_on_rows_checks_the_rng_once_and_slices_x_once_per_working_set():
    seen = []

    def f(z, x):
        seen.append(x)
        return z + x

    x = torch.arange(4.0)[:, None]
    call = _Call(f, x, None)
    z = torch.zeros(4, 1)
    call.on_rows(z, None)
    rows = torch.tensor([0, 2])
    call.on_rows(z[rows], rows)
    call.on_rows(z[rows], rows)
    assert seen[1] is seen[2] and torch.equal(seen[1], x[rows])  # sliced once for this working set
    other = torch.tensor([2])
    call.on_rows(z[other], other)
    assert torch.equal(seen[3], x[other])


# ----------------------------------------------------------------------------
# Causal mode: overflowing norms and non-finite iterates


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_causal_large_finite_float32_states_are_not_reported_non_finite(solver):
    """Entries near 1e30 from f(z0) on: squares overflow float32, the (scaled) norms do not."""
    c = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]])[None].expand(2, 2, 3) * 1e30

    def f(z):
        prev = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)
        return 0.5 * z + 0.25 * prev + c

    res = solve(f, torch.zeros(2, 2, 3), solver=solver, tol=1e-5, max_iter=200, time_dim=1)
    assert res.converged.all() and torch.isfinite(res.residual).all()
    want = torch.stack([2 * c[:, 0], 2 * c[:, 1] + c[:, 0]], dim=1)  # z_t = 2 (c_t + z_{t-1} / 4)
    torch.testing.assert_close(res.z, want, rtol=1e-4, atol=1e-3 * 1e30)


class _Overflowing(FixedPoint):
    """Plain iteration whose iterate of sample 1 turns inf at step 2 (f itself stays finite)."""

    def step(self, state, it, active, evaluate):
        z_new = it.fz.clone()
        if not hasattr(self, "_n"):
            object.__setattr__(self, "_n", 0)
        object.__setattr__(self, "_n", self._n + 1)
        if self._n == 2:
            z_new[1] = float("inf")
        fz = evaluate(z_new, active)
        return state, z_new, fz, fz - z_new


def test_causal_non_finite_iterate_with_finite_f_is_an_error():
    """tanh(inf) = 1 is finite: the causal check must look at the iterate too."""
    z0 = torch.full((3, 4, 1), 0.5, dtype=F64)
    with pytest.raises(NonFiniteError, match=r"step 2 for samples \[0\]"):
        solve(torch.tanh, z0, solver=_Overflowing(), tol=1e-12, max_iter=10, time_dim=1)


def test_scaled_norms_are_per_sample():
    """After an overflow the norms are rescaled by each sample's own largest entry, not the batch's.

    Sample 0 lives near 1e30, sample 1 near 1e-20: divided by 1e30, sample 1 would underflow to a zero
    residual and be called converged at z0.
    """
    c = torch.tensor([[1e30, -2e30, 5e29], [1e-20, 3e-20, -2e-20]])
    res = solve(lambda z: 0.5 * z + c, torch.zeros(2, 3), solver="fixed_point", tol=1e-5, max_iter=100)
    assert res.converged.all()
    torch.testing.assert_close(res.z, 2 * c, rtol=1e-4, atol=0)
    assert (res.nstep > 5).all()


# ----------------------------------------------------------------------------
# DEQLayer: unrolled mode's record, the batch-first check of compact mode


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_unrolled_record_has_the_layers_budget_and_a_residual_in_its_stop_mode(stop_mode):
    """f(z) = z + (0.5, 0): the abs residual is exactly 0.5 at every step, the rel one 0.5 / ||f(z)||."""
    c = torch.tensor([[0.5, 0.0]], dtype=F64).expand(3, 2)
    layer = DEQLayer(lambda z, x: z + x, tol=0.5, atol=0.25 if stop_mode == "rel" else 0.0, stop_mode=stop_mode,
                     unroll_steps=4)
    layer(c)
    res = layer.last_result
    assert (res.stop_mode, res.tol, res.atol, res.n_iter, res.solver) == (stop_mode, 0.5, layer.atol, 4, "unrolled")
    assert res.nstep.dtype == res.best_step.dtype == torch.int64
    assert res.nstep.tolist() == [4] * 3 and res.best_step.tolist() == [3] * 3
    last_in = 3 * c  # the 4th call's input: z0 = 0 then three steps of + c
    want = torch.full((3,), 0.5, dtype=F64)
    if stop_mode == "rel":
        want = want / (last_in + c).norm(dim=1)
    torch.testing.assert_close(res.residual, want, rtol=1e-15, atol=0)
    torch.testing.assert_close(res.z, last_in, rtol=0, atol=0)
    # converged is residual <= tol (the unrolled layer applies no atol): 0.5 <= 0.5 in abs mode.
    assert res.converged.tolist() == [True] * 3


class _SharedInput(collections.namedtuple("_SharedInput", "x table")):
    """A tuple input with a table shared by the batch: it answers select_rows itself."""

    def select_rows(self, rows):
        return _SharedInput(self.x[rows], self.table)


def test_compact_batch_first_check_of_nested_inputs():
    f = lambda z, x: torch.tanh(0.5 * z + x["inp"].x + x["inp"].table.sum() + x["scale"][:, None])  # noqa: E731
    layer = DEQLayer(f, solver="fixed_point", backward="jfb", tol=1e-10, max_iter=100, compact=1.0)
    x = {"inp": _SharedInput(torch.randn(3, 2, dtype=F64), torch.ones(7, dtype=F64)),
         "scale": torch.tensor([0.1, 0.2, 0.3], dtype=F64)}  # 1-d, batch first
    z = layer(x, torch.zeros(3, 2, dtype=F64))
    full = DEQLayer(f, solver="fixed_point", backward="jfb", tol=1e-10, max_iter=100)(x, torch.zeros(3, 2, dtype=F64))
    torch.testing.assert_close(z, full, rtol=0, atol=1e-12)
    x["scale"] = torch.tensor([0.1, 0.2], dtype=F64)
    with pytest.raises(ValueError, match=r"x\['scale'\].*shape \(2,\) for a batch of 3"):
        layer(x, torch.zeros(3, 2, dtype=F64))
    x["scale"] = torch.tensor(0.1, dtype=F64)
    with pytest.raises(ValueError, match=r"x\['scale'\]"):
        layer(x, torch.zeros(3, 2, dtype=F64))


# ----------------------------------------------------------------------------
# deq.grad.phantom


@pytest.mark.parametrize("build", [lambda: UPG(k=True), lambda: NPG(k=2.5), lambda: UPG(k=0),
                                   lambda: UPG(damping=0.0), lambda: NPG(damping=1.5), lambda: UPG(damping=-0.5)])
def test_phantom_options_are_checked(build):
    with pytest.raises(ValueError, match="k must|damping must"):
        build()


def test_attach_passes_x_to_f():
    """attach(f, z*, x) calls f(z, x) with the x it is given (the layer's f is bound; a user's is not)."""
    seen = []

    def f(z, x):
        seen.append(x)
        return 0.5 * z + x

    x = torch.ones(2, 3, dtype=F64)
    for bw in (UPG(k=2, damping=0.7), JFB()):
        seen.clear()
        z = bw.attach(f, torch.zeros(2, 3, dtype=F64), x)
        assert all(s is x for s in seen) and len(seen) == bw.k
        want = torch.zeros(2, 3, dtype=F64)
        for _ in range(bw.k):
            want = bw.damping * (0.5 * want + x) + (1 - bw.damping) * want
        torch.testing.assert_close(z, want, rtol=0, atol=1e-15)
    z_star = torch.full((2, 3), 0.25, dtype=F64)
    for bw in (Implicit(), NPG(k=2, damping=0.7)):  # one call of f at z*, with the x given
        seen.clear()
        z = bw.attach(f, z_star, x.clone().requires_grad_())
        assert len(seen) == 1 and seen[0] is not None and torch.equal(seen[0], x)
        torch.testing.assert_close(z, 0.5 * z_star + x, rtol=0, atol=0)


def test_undamped_upg_returns_what_f_returns_under_autocast():
    """damping 1: z_k is f's own output (its autocast dtype), as Implicit's is; damped steps keep z's dtype."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
    f = lambda z, x: lin(z + x)  # noqa: E731  (bf16 under CPU autocast)
    x = torch.randn(3, 4)
    out = {}
    for name, bw in (("jfb", JFB()), ("upg1", UPG(k=2, damping=1.0)), ("upg", UPG(k=2, damping=0.7)),
                     ("implicit", "implicit")):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[name] = DEQLayer(f, backward=bw, tol=1e-3, max_iter=30)(x).dtype
    assert out == {"jfb": torch.bfloat16, "upg1": torch.bfloat16, "upg": torch.float32, "implicit": torch.bfloat16}


# ----------------------------------------------------------------------------
# deq.grad.implicit


def test_implicit_atol_reaches_the_backward_solve():
    """atol = 1: the adjoint solve from g = 0 passes at once for an incoming gradient of norm < 1."""
    w = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = nn.Parameter(w * (0.8 / torch.linalg.matrix_norm(w, ord=2)))
    f = lambda z, x: torch.tanh(z @ w.T + x)  # noqa: E731
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    for atol, n_iter in ((1.0, 1), (0.0, None)):
        layer = DEQLayer(f, backward=Implicit(tol=1e-12, atol=atol, max_iter=100), tol=1e-12, max_iter=100)
        (0.01 * layer(x)).sum().backward()
        bwd = layer.last_result.backward
        assert bwd.atol == atol and bool(bwd.converged.all())
        assert bwd.n_iter == 1 if n_iter == 1 else bwd.n_iter > 5


@pytest.mark.parametrize("kwargs,match", [({"tol": 0.0}, "tol must be > 0"), ({"tol": -1e-6}, "tol must be > 0"),
                                          ({"atol": -1.0}, "atol must be"),
                                          ({"stop_mode": "abs", "atol": 1e-3}, "applies to stop_mode='rel'"),
                                          ({"max_iter": 0}, "max_iter"), ({"stop_mode": "max"}, "stop_mode")])
def test_implicit_budget_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Implicit(**kwargs)


@pytest.mark.parametrize("batch", [10, 11])
def test_divergence_error_lists_at_most_ten_samples_and_counts_the_rest(batch):
    """f(z) = 1.5 z + x: the forward converges (Anderson), every backward fixed-point solve diverges."""
    from deq.grad import ConvergenceError

    layer = DEQLayer(lambda z, x: 1.5 * z + x, backward=Implicit(solver="fixed_point", on_divergence="raise"),
                     tol=1e-10, max_iter=50, on_nonconvergence="ignore")
    x = torch.ones(batch, 2, dtype=F64, requires_grad=True)
    with pytest.raises(ConvergenceError) as err:
        layer(x).sum().backward()
    listed = str(err.value).split("samples [")[1].split("]")[0]
    if batch == 10:
        assert listed == ", ".join(map(str, range(10)))
    else:
        assert listed == ", ".join(map(str, range(10))) + ", ... (11 in all)"


def test_jacobian_reg_defaults_to_one_probe_and_takes_a_batch_of_one():
    w = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    f = lambda z, x: torch.tanh(z @ w.T)  # noqa: E731
    z = torch.randn(1, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    default = jacobian_reg(f, z, None, generator=torch.Generator().manual_seed(2))
    assert torch.equal(default, jacobian_reg(f, z, None, n_probes=1, generator=torch.Generator().manual_seed(2)))
    eps = torch.randn(1, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    jac = (1 - torch.tanh(z @ w.T) ** 2)[0, :, None] * w  # J = diag(sech^2) W
    torch.testing.assert_close(default, (eps @ jac).pow(2).sum() / 4, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------
# Solver options: the boundaries of what the constructors accept


@pytest.mark.parametrize("build", [lambda: Anderson(m=1), lambda: Anderson(lam=0.0), lambda: Anderson(beta=1e-9),
                                   lambda: Broyden(memory=1), lambda: Broyden(max_ls_iter=1),
                                   lambda: FixedPoint(damping=1.0), lambda: FixedPoint(damping=0.01)])
def test_smallest_valid_solver_options_are_accepted_and_solve(build):
    solver = build()
    res = solve(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=F64), solver=solver, tol=1e-3, max_iter=10000)
    assert res.converged.all()


@pytest.mark.parametrize("build", [lambda: Anderson(m=0), lambda: Anderson(m=True), lambda: Anderson(m=2.0),
                                   lambda: Anderson(lam=-1e-12), lambda: Anderson(beta=0.0),
                                   lambda: Anderson(beta=-1.0), lambda: Broyden(memory=0),
                                   lambda: Broyden(memory=True), lambda: Broyden(max_ls_iter=0),
                                   lambda: Broyden(max_ls_iter=2.0), lambda: FixedPoint(damping=0.0),
                                   lambda: FixedPoint(damping=1.0 + 1e-12)])
def test_invalid_solver_options_are_value_errors(build):
    with pytest.raises(ValueError, match="must be"):
        build()


# ----------------------------------------------------------------------------
# deq.grad.base: the adjoint of a tuple state whose loss ignores a part


class _PairCell(nn.Module):
    """z = (h, c): h' = tanh(0.5 h W^T + 0.3 c V^T + x), c' = 0.4 tanh(h U^T); a contraction."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W, self.V, self.U = (nn.Parameter(torch.randn(*s, dtype=F64, generator=gen) / 2)
                                  for s in ((3, 3), (3, 2), (2, 3)))

    def forward(self, z, x):
        h, c = z
        return torch.tanh(0.5 * h @ self.W.T + 0.3 * c @ self.V.T + x), 0.4 * torch.tanh(h @ self.U.T)


@pytest.mark.parametrize("backward", ["implicit", "npg"])
@pytest.mark.parametrize("used", [0, 1])
def test_tuple_state_loss_on_one_part_only(backward, used):
    """The part the loss ignores gets no incoming gradient (None): it counts as zero in the adjoint."""
    cell = _PairCell()
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 2, dtype=F64))
    bw = Implicit(tol=1e-13, max_iter=300) if backward == "implicit" else NPG(k=300, damping=1.0)
    layer = DEQLayer(cell, backward=bw, tol=1e-13, max_iter=300)
    got = torch.autograd.grad(layer(x, z0)[used].sin().sum(), (x, *cell.parameters()))
    layer.unroll_steps = 200
    want = torch.autograd.grad(layer(x, z0)[used].sin().sum(), (x, *cell.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("failure", ["singular", "nan"])
def test_anderson_with_a_failed_solve_takes_exactly_the_plain_mixing_step(failure, monkeypatch):
    """gamma falls back to 0: every iterate is z + beta g, the damped fixed-point iterate."""
    real = torch.linalg.solve_ex

    def failing(A, B, *args, **kwargs):
        x, info = real(A, B, *args, **kwargs)
        if failure == "singular":
            return x, torch.full_like(info, 2)
        return torch.full_like(x, float("nan")), info

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 4, 4, dtype=F64, generator=gen)
    w = w * (0.6 / torch.linalg.matrix_norm(w, ord=2))[:, None, None]
    f = lambda z: torch.tanh((w @ z[:, :, None]).squeeze(2) + 1)  # noqa: E731
    z0 = torch.zeros(2, 4, dtype=F64)
    monkeypatch.setattr(torch.linalg, "solve_ex", failing)
    seen = []
    solve(lambda z: seen.append(z.clone()) or f(z), z0, solver=Anderson(m=3, beta=0.8), tol=1e-300, max_iter=6)
    monkeypatch.undo()
    plain = []
    solve(lambda z: plain.append(z.clone()) or f(z), z0, solver=FixedPoint(damping=0.8), tol=1e-300, max_iter=6)
    torch.testing.assert_close(torch.stack(seen), torch.stack(plain), rtol=0, atol=1e-15)


@pytest.mark.parametrize("solver", [Anderson(), Anderson(m=2, beta=1.0), FixedPoint()])
def test_undamped_first_step_is_f_of_z0_to_the_bit(solver):
    """With beta (damping) 1 the first iterate is f(z0) itself, as the unrolled network computes it,
    not z0 + (f(z0) - z0), which rounds differently."""
    z0 = torch.randn(4, 7, dtype=torch.float32, generator=torch.Generator().manual_seed(0)) * 3
    f = lambda z: torch.tanh(0.7 * z.roll(1, dims=1) + 0.1)  # noqa: E731
    assert not torch.equal(z0 + (f(z0) - z0), f(z0))  # the two spellings do differ here
    seen = []
    solve(lambda z: seen.append(z.clone()) or f(z), z0, solver=solver, tol=1e-30, max_iter=2)
    assert torch.equal(seen[1], f(z0))


@pytest.mark.parametrize("backward", ["implicit", "npg"])
def test_second_derivative_through_the_incoming_gradient_raises(backward):
    """d/dv of the gradient for grad_outputs v (a double-backward through v, as in a Hessian-vector
    product) also runs through the adjoint: it must raise, not return a silently wrong value."""
    w = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = nn.Parameter(w * (0.5 / torch.linalg.matrix_norm(w, ord=2)))
    layer = DEQLayer(lambda z, x: torch.tanh(z @ w.T + x), backward=backward, tol=1e-10, max_iter=100)
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    v = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x), x, v, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable again"):
        torch.autograd.grad(gx.sum(), v)


class _IgnoresC(nn.Module):
    """z = (h, c): h' = tanh(h W^T + x), c' = 0.5 tanh(x U^T): no output depends on c (its VJP is None)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.W = nn.Parameter(0.4 * torch.randn(3, 3, dtype=F64, generator=gen))
        self.U = nn.Parameter(torch.randn(2, 3, dtype=F64, generator=gen))

    def forward(self, z, x):
        return torch.tanh(z[0] @ self.W.T + x), 0.5 * torch.tanh(x @ self.U.T)


@pytest.mark.parametrize("backward", ["implicit", "npg"])
def test_tuple_state_with_a_part_no_output_depends_on(backward):
    cell = _IgnoresC()
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 2, dtype=F64))
    bw = Implicit(tol=1e-13, max_iter=300) if backward == "implicit" else NPG(k=300, damping=1.0)
    layer = DEQLayer(cell, backward=bw, tol=1e-13, max_iter=300)
    loss = lambda z: z[0].sin().sum() + z[1].pow(2).sum()  # noqa: E731
    got = torch.autograd.grad(loss(layer(x, z0)), (x, cell.W, cell.U))
    layer.unroll_steps = 200
    want = torch.autograd.grad(loss(layer(x, z0)), (x, cell.W, cell.U))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", [Implicit(), NPG(k=3, damping=0.7)])
def test_an_f_returning_a_leaf_is_attached_only_when_that_leaf_is_not_z(backward):
    """The needs-grad walk on outputs without a graph: f returning a parameter itself must pass its
    gradient on; f returning z itself, or an x that needs none, has nothing to differentiate."""
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.arange(6, dtype=F64).view(2, 3))

        def forward(self, z, x):
            return self.p

    cell, w = Const(), torch.linspace(-1, 1, 6, dtype=F64).view(2, 3)
    layer = DEQLayer(cell, backward=backward, tol=1e-10, max_iter=5)
    (layer(torch.zeros(2, 3, dtype=F64)) * w).sum().backward()
    # z* = p and J_z = 0: dL/dp = dL/dz* exactly; NPG's damped series sums lambda (1 - lambda)^i, i < k.
    scale = 1.0 if isinstance(backward, Implicit) else 1 - (1 - backward.damping) ** backward.k
    torch.testing.assert_close(cell.p.grad, scale * w, rtol=0, atol=1e-12)

    x = torch.ones(2, 3, dtype=F64)
    for f in (lambda z, x: z, lambda z, x: x):
        z = DEQLayer(f, backward=backward, tol=1e-10, max_iter=5)(x)
        assert not z.requires_grad


# ----------------------------------------------------------------------------
# State structure and layout: the checks of f's output, z0's type, memory formats.


def test_f_returning_the_wrong_structure_is_named():
    z2 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="f must return a tuple of 2 tensors .* got tuple of length 3"):
        solve(lambda z: (*z, z[0]), z2, max_iter=3)  # the first two parts are right
    with pytest.raises(ValueError, match="f must return a tuple of 1 tensors .* got Tensor"):
        solve(lambda z: z[0], (torch.zeros(2, 3, dtype=F64),), max_iter=3)
    with pytest.raises(ValueError, match="f must return a tensor like z0 .* got tuple of length 1"):
        solve(lambda z: (z,), torch.zeros(2, 3, dtype=F64), max_iter=3)
    with pytest.raises(ValueError, match="but z0 has shape"):
        solve(lambda z: z[:, :2], torch.zeros(2, 3, dtype=F64), max_iter=3)
    with pytest.raises(ValueError, match="but the rows of z it was given have shape"):
        # compact: sample 0 converges at once; f then gets sample 1's row alone and returns two rows
        solve(lambda z, rows: torch.tensor([[0.0] * 3, [1.0] * 3], dtype=F64), torch.zeros(2, 3, dtype=F64),
              max_iter=5, compact=True)


def test_z0_of_the_wrong_type_is_refused():
    for z0 in ((torch.zeros(2, 3), 5.0), (), [torch.zeros(2, 3)]):
        with pytest.raises(TypeError, match="z0 must be a tensor or a non-empty tuple of tensors"):
            solve(lambda z: z, z0, max_iter=3)


def test_strided_states_solve_as_their_contiguous_copies():
    """A transposed 2-D z0 and a 4-D z0 that is neither contiguous nor channels_last: the same result as
    the contiguous copy (the 4-D one returned contiguous: only channels-last layouts are kept); a
    channels_last_3d z0 stays channels_last_3d."""
    def f(z):
        return torch.tanh(0.5 * z.flip(1) + 0.3)

    for z0 in (torch.zeros(4, 2, dtype=F64).t(), torch.zeros(2, 5, 4, 3, dtype=F64).transpose(2, 3)):
        assert not z0.is_contiguous() and not z0.is_contiguous(memory_format=torch.channels_last)
        res = solve(f, z0, tol=1e-10, max_iter=60)
        want = solve(f, z0.contiguous(), tol=1e-10, max_iter=60)
        assert res.z.is_contiguous() or z0.dim() == 2
        torch.testing.assert_close(res.z, want.z, rtol=0, atol=0)

    seen = []

    def f3(z):
        seen.append(z.is_contiguous(memory_format=torch.channels_last_3d))
        return f(z)

    z0 = torch.zeros(2, 3, 4, 2, 5, dtype=F64).to(memory_format=torch.channels_last_3d)
    res = solve(f3, z0, tol=1e-10, max_iter=60)
    assert all(seen) and res.z.is_contiguous(memory_format=torch.channels_last_3d)


def test_causal_solve_under_autocast_keeps_the_float32_state():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.mul_(0.5)
    x = torch.randn(2, 6, 4)

    def f(z):
        prev = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)
        return torch.tanh(lin(z) + 0.3 * prev + x)  # bfloat16 under autocast

    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = solve(f, torch.zeros(2, 6, 4), solver="anderson", tol=1e-2, max_iter=30, time_dim=1)
    assert res.z.dtype == torch.float32 and torch.isfinite(res.z).all() and res.converged.all()


def test_causal_bfloat16_state_is_iterated_in_float32_like_the_plain_one():
    """A bf16 z0 is iterated in float32 (the working dtype) in causal mode too: with one position the
    causal solve is the plain one, bit for bit (a damped step in bf16 arithmetic rounds differently)."""
    x = torch.linspace(-2, 2, 12).view(3, 1, 4)

    def f(z):
        return torch.tanh(0.6 * z.float().flip(2) + x).to(torch.bfloat16)

    z0 = torch.zeros(3, 1, 4, dtype=torch.bfloat16)
    kw = dict(solver=FixedPoint(damping=0.7), tol=1e-30, max_iter=7)
    causal, plain = solve(f, z0, time_dim=1, **kw), solve(f, z0, **kw)
    assert causal.z.dtype == torch.bfloat16 and torch.equal(causal.z, plain.z)


def test_a_scalar_z0_is_refused_and_a_vector_is_a_batch_of_scalars():
    with pytest.raises(ValueError, match="needs the same leading batch dimension"):
        solve(torch.cos, torch.tensor(0.5, dtype=F64), max_iter=5)
    with pytest.raises(ValueError, match="needs the same leading batch dimension"):
        solve(lambda z: z, (torch.zeros(2, dtype=F64), torch.tensor(0.0, dtype=F64)), max_iter=5)
    vec = solve(torch.cos, torch.zeros(3, dtype=F64), tol=1e-12, max_iter=100)
    col = solve(torch.cos, torch.zeros(3, 1, dtype=F64), tol=1e-12, max_iter=100)
    assert vec.z.shape == (3,) and vec.converged.all()
    torch.testing.assert_close(vec.z, col.z[:, 0], rtol=0, atol=0)


def test_backward_warnings_follow_the_failed_and_diverged_schedules():
    """Warned at the 1st, 2nd, 4th, ... failed backward solve, and at the 1st, 2nd, 4th, ... diverged one:
    failures 1 (diverged), 2, 3, 4, 5 (diverged, the 2nd) warn at 1, 2, 4 and 5, not at 3."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = 1.5

        def forward(self, z, x):
            return self.a * z + x

    cell = Scaled()
    layer = DEQLayer(cell, solver="broyden", tol=1e-10, max_iter=20,
                     backward=Implicit(solver=FixedPoint(), max_iter=5, on_divergence="zero"))
    warned = []
    for a in (1.5, 0.99, 0.99, 0.99, 1.5):  # 1.5: the adjoint iteration diverges; 0.99: too slow for 5 steps
        cell.a = a
        x = torch.ones(1, 3, dtype=F64, requires_grad=True)  # one sample: one diverged sample per call
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(x).sum().backward()
        warned.append(sum("backward solve" in str(w.message) for w in caught))
    assert warned == [1, 1, 0, 1, 1]
    assert (layer.counts.backward.failed, layer.counts.backward.diverged) == (5, 2)


# ----------------------------------------------------------------------------
# DEQLayer's own options: defaults, checks at construction, what reaches solve.


def test_deq_layer_defaults_and_construction_checks():
    layer = DEQLayer(lambda z, x: z)
    assert (layer.tol, layer.max_iter, layer.last_result) == (1e-4, 30, None)
    for bad in (dict(stop_mode="abs", atol=1e-3), dict(atol=-1.0), dict(eval_tol=1e-3, atol=float("nan"))):
        with pytest.raises(ValueError, match="atol"):
            DEQLayer(lambda z, x: z, **bad)
    assert DEQLayer(lambda z, x: z, check_every="auto").check_every == "auto"


def test_deq_layer_passes_stop_mode_and_per_call_budgets_in_abs_mode():
    x = torch.linspace(-1, 1, 6, dtype=F64).view(2, 3)
    layer = DEQLayer(lambda z, x: torch.tanh(0.5 * z + x), stop_mode="abs", tol=1e-9, max_iter=60,
                     on_nonconvergence="ignore")
    layer(x)
    assert layer.last_result.stop_mode == "abs" and layer.last_result.converged.all()
    layer(x, max_iter=3)  # a per-call budget is checked with the layer's (abs) stop mode and no atol
    assert layer.last_result.n_iter == 3


def test_deq_layer_without_compact_accepts_an_x_that_broadcasts_over_the_batch():
    x = torch.tensor([[0.1, -0.2, 0.3]], dtype=F64)  # (1, D) against a (4, D) state
    z = DEQLayer(lambda z, x: torch.tanh(0.5 * z + x), tol=1e-10, max_iter=60)(x, torch.zeros(4, 3, dtype=F64))
    torch.testing.assert_close(z, z[:1].expand(4, 3), rtol=0, atol=0)


class _HostSyncs(TorchDispatchMode):
    """Counts device-to-host reads (``.item()``, ``.tolist()``, ``bool(tensor)``: ``aten._local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_check_every_auto_is_one_on_the_cpu():
    """On the CPU "auto" checks every iteration: the syncs, iterations and trace of check_every=1."""
    rates = torch.linspace(0.5, 0.97, 5, dtype=F64)[:, None]
    f = lambda z: rates * torch.tanh(z) + 0.3  # noqa: E731 - contraction rates 0.5 .. 0.97 per sample
    runs = {}
    for every in ("auto", 1, "adaptive"):
        with _HostSyncs() as syncs:
            res = solve(f, torch.zeros(5, 2, dtype=F64), solver="fixed_point", tol=1e-8, max_iter=500,
                        check_every=every)
        runs[every] = (res, syncs.count)
    (auto, n_auto), (one, n_one), (adaptive, n_adaptive) = runs.values()
    assert n_auto == n_one > n_adaptive and auto.n_iter == one.n_iter
    assert torch.equal(auto.trace, one.trace)
