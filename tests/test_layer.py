"""DEQLayer: structure, budgets, policies, modes, random f and compiled f.

Gradients themselves are checked in test_grad.py; here the layer's contract.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deq import JFB, NPG, UPG, ConvergenceError, DEQLayer, FixedPoint, Implicit, SolverResult
from deq.layer import Counts, SolveCounts
from deq.reg import jacobian_reg

DT = torch.float64
TIGHT = dict(tol=1e-12, max_iter=200)


class TanhCell(nn.Module):
    """f(z, x) = tanh(z W^T + x U^T + b), ||W||_2 = rho."""

    def __init__(self, dim: int = 5, in_dim: int | None = None, rho: float = 0.6, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        in_dim = dim if in_dim is None else in_dim
        w = torch.randn(dim, dim, dtype=DT, generator=gen)
        self.W = nn.Parameter(w * (rho / torch.linalg.matrix_norm(w, ord=2)))
        self.U = nn.Parameter(torch.randn(dim, in_dim, dtype=DT, generator=gen) / in_dim ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(dim, dtype=DT, generator=gen))

    def pre(self, z, x):
        return z @ self.W.T + x @ self.U.T + self.b

    def forward(self, z, x):
        return torch.tanh(self.pre(z, x))


class DropCell(TanhCell):
    """TanhCell followed by a plain nn.Dropout; records every mask it draws."""

    def __init__(self, p: float = 0.4, **kw):
        super().__init__(**kw)
        self.p = p
        self.drop = nn.Dropout(p)
        self.masks: list[torch.Tensor] = []

    def forward(self, z, x):
        out = self.drop(torch.tanh(self.pre(z, x)))
        self.masks.append(out.detach() != 0)  # tanh(...) is never exactly 0 here
        return out


def _x(batch=3, dim=5, seed=2, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, dtype=DT, generator=gen).requires_grad_(requires_grad)


def _params_and_x_grads(loss, cell, x):
    return torch.autograd.grad(loss, (x, *cell.parameters()))


def _assert_all_close(a, b, tol=1e-10):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# Construction and structure


def test_module_f_is_registered_and_callable_f_is_not():
    cell = TanhCell()
    layer = DEQLayer(cell)
    assert layer.f is cell
    assert [id(p) for p in layer.parameters()] == [id(p) for p in cell.parameters()]
    assert set(layer.state_dict()) == {"f.W", "f.U", "f.b"}
    plain = DEQLayer(lambda z, x: 0.5 * z + x)
    assert list(plain.parameters()) == [] and plain.state_dict() == {}


def test_constructor_checks():
    with pytest.raises(TypeError, match="f must be callable"):
        DEQLayer(3)
    with pytest.raises(TypeError):
        DEQLayer(TanhCell(), max_iters=3)  # a typo is an error, not an ignored option
    with pytest.raises(ValueError, match="unknown on_nonconvergence 'loud'; known: ignore, warn, raise"):
        DEQLayer(TanhCell(), on_nonconvergence="loud")
    with pytest.raises(ValueError, match="unknown solver 'andersen'"):
        DEQLayer(TanhCell(), solver="andersen")
    with pytest.raises(ValueError, match="unknown backward 'ift'; known backward passes: implicit, jfb, npg, upg"):
        DEQLayer(TanhCell(), backward="ift")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        DEQLayer(TanhCell(), eval_max_iter=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        DEQLayer(TanhCell(), tol=0.0)
    assert DEQLayer(TanhCell()).on_nonconvergence == "warn"
    assert isinstance(DEQLayer(TanhCell(), backward="npg").backward, NPG)


def test_default_z0_is_zeros_like_x_and_output_is_a_tensor():
    seen = []

    def f(z, x):
        seen.append(z.clone())
        return torch.tanh(0.5 * z + x)

    x = _x()
    z = DEQLayer(f, tol=1e-10)(x)
    assert torch.equal(seen[0], torch.zeros_like(x))
    assert isinstance(z, torch.Tensor) and z.shape == x.shape and z.dtype == x.dtype


def test_tuple_state_and_tuple_input_pass_through():
    received = []

    def f(z, x):
        received.append(x)
        h, c = z
        a, b = x
        return torch.tanh(0.5 * h + a), 0.5 * torch.sigmoid(c) + b[:, :2]

    x = (_x(3, 4), _x(3, 3, seed=4))
    z0 = (torch.zeros(3, 4, dtype=DT), torch.zeros(3, 2, dtype=DT))
    layer = DEQLayer(f, tol=1e-10)
    z = layer(x, z0)
    assert isinstance(z, tuple) and [t.shape for t in z] == [(3, 4), (3, 2)]
    assert all(r is x for r in received)  # x is handed to f untouched
    h, c = layer.last_result.z
    torch.testing.assert_close(z[0], torch.tanh(0.5 * h + x[0]))
    with pytest.raises(ValueError, match="z0 is required when x is not a tensor"):
        layer(x)


def test_f_with_wrong_shape_is_reported():
    layer = DEQLayer(lambda z, x: (z + x)[:, :-1])
    with pytest.raises(ValueError, match=r"f returned shape \(3, 4\) but z0 has shape \(3, 5\)"):
        layer(_x())


# ---------------------------------------------------------------------------
# Budgets, modes, statistics


def test_no_grad_returns_f_of_z_star_without_graph():
    cell = TanhCell()
    layer = DEQLayer(cell, tol=1e-3)
    x = _x(requires_grad=True)
    with torch.no_grad():
        z = layer(x)
    assert not z.requires_grad and z.grad_fn is None
    assert torch.equal(z, cell(layer.last_result.z, x).detach())


@pytest.mark.parametrize("backward", [Implicit(), NPG(), UPG(k=3), JFB()], ids=["implicit", "npg", "upg", "jfb"])
def test_eval_budget_used_in_eval_mode(backward):
    layer = DEQLayer(TanhCell(rho=0.95), solver=FixedPoint(), backward=backward, tol=1e-14, max_iter=9,
                     eval_tol=1e-13, eval_max_iter=4, on_nonconvergence="ignore")
    x = _x()
    layer(x)
    res = layer.last_result
    assert res.n_iter == 9 and bool((res.nstep == 9).all()) and res.tol == 1e-14
    layer.eval()
    layer(x)
    res = layer.last_result
    assert res.n_iter == 4 and bool((res.nstep <= 4).all()) and res.trace.shape[0] == 4 and res.tol == 1e-13
    layer.train()
    layer(x)
    assert layer.last_result.n_iter == 9


def test_eval_tol_used_in_eval_mode():
    layer = DEQLayer(TanhCell(rho=0.9), solver=FixedPoint(), tol=1e-12, max_iter=500, eval_tol=1e-3)
    x = _x()
    layer(x)
    n_train = layer.last_result.n_iter
    layer.eval()
    with torch.no_grad():
        layer(x)
    res = layer.last_result
    assert res.tol == 1e-3 and bool(res.converged.all()) and float(res.residual.max()) > 1e-12
    assert res.n_iter < n_train


def test_last_result_is_detached_and_replaced_each_call():
    cell = TanhCell()
    layer = DEQLayer(cell, tol=1e-8)
    x = _x(requires_grad=True)
    layer(x)
    first = layer.last_result
    assert not first.z.requires_grad and first.z.grad_fn is None
    assert first.solver == "anderson" and first.nstep.shape == (3,) and bool(first.converged.all())
    layer(2 * x)
    assert layer.last_result is not first


def test_unrolled_mode_equals_applying_f_L_times():
    cell = TanhCell(rho=0.9)
    x = _x(requires_grad=True)
    layer = DEQLayer(cell, tol=1e-8)
    layer.unroll_steps = 4
    z = layer(x)
    w = torch.linspace(-1, 1, 5, dtype=DT)
    got = _params_and_x_grads((z * w).sum(), cell, x)

    ref = torch.zeros_like(x)
    for _ in range(4):
        ref = cell(ref, x)
    assert torch.equal(z, ref)
    for a, b in zip(got, _params_and_x_grads((ref * w).sum(), cell, x)):
        assert torch.equal(a, b)
    res = layer.last_result
    assert res.solver == "unrolled" and res.n_iter == 4 and bool((res.nstep == 4).all())
    assert res.trace.shape == (4, 3)
    # As in DEQ mode: the recorded z is the last input of f, and its residual is reported.
    with torch.no_grad():
        assert torch.equal(cell(res.z, x), z.detach())
        assert torch.allclose(res.residual, (z - res.z).norm(dim=1) / z.norm(dim=1))

    layer.unroll_steps = None  # back to DEQ mode
    layer(x)
    assert layer.last_result.solver == "anderson"
    with pytest.raises(ValueError, match="unroll_steps must be None or an integer >= 1"):
        layer.unroll_steps = 0  # refused when set, before any call


def test_unrolled_mode_with_tuple_state():
    def f(z, x):
        h, c = z
        return torch.tanh(0.5 * h + x), 0.5 * c + h

    layer = DEQLayer(f, unroll_steps=3)
    x = _x(requires_grad=True)
    z0 = (torch.zeros_like(x), torch.zeros_like(x))
    z = layer(x, z0)
    ref = z0
    for _ in range(3):
        ref = f(ref, x)
    assert all(torch.equal(a, b) for a, b in zip(z, ref))
    assert z[1].requires_grad


# ---------------------------------------------------------------------------
# Non-convergence policy (forward; the backward solve's policy is in test_grad.py)


def _stuck(policy):
    return DEQLayer(TanhCell(rho=0.95), solver=FixedPoint(), tol=1e-12, max_iter=3, on_nonconvergence=policy)


def test_forward_nonconvergence_raises():
    with pytest.raises(ConvergenceError, match=r"forward solve \(fixed_point\) did not converge for 3 of 3 "
                                               r"samples in 3 iterations: max residual .* > tol 1e-12 \(rel\)"):
        _stuck("raise")(_x())


def test_forward_nonconvergence_warns_on_the_1st_2nd_4th_8th_failure_with_the_residual_and_counts():
    layer = _stuck("warn")
    with pytest.warns(RuntimeWarning, match="did not converge") as record:
        layer(_x())
    worst = float(layer.last_result.residual.max())
    assert f"max residual {worst:.3g}" in str(record[0].message)
    assert "So far 1 of 1 forward solves failed (layer.counts.forward)" in str(record[0].message)
    shown = []
    for call in range(2, 11):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if call == 6:
                layer.max_iter = 500  # this one converges: counted as a call, not a failure
            layer(_x())
            layer.max_iter = 3
        shown += [(call, str(w.message)) for w in caught]
    assert [call for call, _ in shown] == [2, 4, 9]  # failures 2, 4 and 8 (call 6 did not fail)
    assert "So far 8 of 9 forward solves failed" in shown[-1][1]
    assert layer.counts.forward == SolveCounts(calls=10, failed=9, diverged=0)
    layer.reset_counts()
    assert layer.counts == Counts()
    with pytest.warns(RuntimeWarning, match="So far 1 of 1 forward"):
        layer(_x())


def test_forward_and_backward_warnings_are_separate():
    """Once the forward had warned, every failing backward solve used to be silent."""
    layer = DEQLayer(TanhCell(rho=0.95), solver=FixedPoint(), backward=Implicit(solver=FixedPoint(), max_iter=2),
                     tol=1e-12, max_iter=3)
    for call in (1, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer(_x(requires_grad=True)).sum().backward()
        stages = [str(w.message).split()[1] for w in caught]
        assert stages == ["forward", "backward"], call
        assert all(f"So far {call} of {call}" in str(w.message) for w in caught)
    assert layer.counts.forward.failed == layer.counts.backward.failed == 2


def test_nonconvergence_warnings_point_at_the_users_line():
    """Not at torch/nn/modules/module.py (forward) or deq/grad/implicit.py (backward)."""
    layer = DEQLayer(TanhCell(rho=0.95), solver=FixedPoint(), backward=Implicit(solver=FixedPoint(), max_iter=2),
                     tol=1e-12, max_iter=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        z = layer(_x(requires_grad=True))
        z.sum().backward()
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line), (__file__, line + 1)]


def test_counts_are_kept_under_every_policy():
    for policy in ("ignore", "warn", "raise"):
        layer = _stuck(policy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                layer(_x())
            except ConvergenceError:
                pass
        assert layer.counts.forward == SolveCounts(calls=1, failed=1, diverged=0), policy
    layer = DEQLayer(TanhCell(), tol=1e-8, on_nonconvergence="raise")
    layer(_x())
    assert layer.counts.forward == SolveCounts(calls=1, failed=0, diverged=0)
def test_forward_nonconvergence_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _stuck("ignore")(_x())
    assert not caught


# ---------------------------------------------------------------------------
# f with random state: one dropout mask per layer call


@pytest.mark.parametrize("backward", [Implicit(**TIGHT), UPG(k=3, damping=0.5)], ids=["implicit", "upg"])
def test_dropout_mask_fixed_within_a_call_and_gradient_is_that_of_the_fixed_mask(backward):
    torch.manual_seed(0)
    cell = DropCell(p=0.4)
    x = _x(4, 5, requires_grad=True)
    layer = DEQLayer(cell, backward=backward, **TIGHT)
    z = layer(x)
    masks = list(cell.masks)
    assert len(masks) >= 3  # solver iterations, the re-attached call(s)
    mask = masks[0]
    assert all(torch.equal(m, mask) for m in masks)
    assert 0 < int(mask.sum()) < mask.numel()
    w = torch.linspace(-1, 1, 5, dtype=DT)
    got = _params_and_x_grads((z * w).sum(), cell, x)
    assert len(cell.masks) == len(masks)  # backward never calls f again

    # the same deterministic f, with that mask fixed
    keep = mask.to(DT) / (1 - cell.p)
    fixed = DEQLayer(lambda z, x: torch.tanh(cell.pre(z, x)) * keep, backward=backward, **TIGHT)
    z_ref = fixed(x)
    _assert_all_close((z,), (z_ref,), tol=1e-12)
    _assert_all_close(got, _params_and_x_grads((z_ref * w).sum(), cell, x), tol=1e-10)

    # the next call draws a new mask, again fixed for the whole call
    cell.masks.clear()
    layer(x)
    assert not torch.equal(cell.masks[0], mask)
    assert all(torch.equal(m, cell.masks[0]) for m in cell.masks)


def test_dropout_off_in_eval_and_variational_in_unrolled_mode():
    torch.manual_seed(1)
    cell = DropCell(p=0.4)
    x = _x(4, 5)
    layer = DEQLayer(cell, **TIGHT)
    layer.eval()
    layer(x)
    assert all(bool(m.all()) for m in cell.masks)
    layer.train()
    layer.unroll_steps = 5
    cell.masks.clear()
    layer(x)
    assert len(cell.masks) == 5 and all(torch.equal(m, cell.masks[0]) for m in cell.masks)
    assert not bool(cell.masks[0].all())


class MCDropCell(DropCell):
    """Dropout kept on in eval (Monte Carlo dropout): F.dropout(training=True)."""

    def forward(self, z, x):
        out = F.dropout(torch.tanh(self.pre(z, x)), self.p, training=True)
        self.masks.append(out.detach() != 0)
        return out


def test_mc_dropout_in_eval_keeps_one_mask_per_call():
    """fix_rng replays in eval too: 31 calls of f drew 31 masks and the solve never converged."""
    torch.manual_seed(4)
    cell = MCDropCell(p=0.4, rho=0.4)
    layer = DEQLayer(cell, solver=FixedPoint(), tol=1e-10, max_iter=100).eval()
    with torch.no_grad():
        layer(_x(4, 5))
    assert bool(layer.last_result.converged.all()) and len(cell.masks) > 10
    first = cell.masks[0]
    assert 0 < int(first.sum()) < first.numel() and all(torch.equal(m, first) for m in cell.masks)
    cell.masks.clear()
    with torch.no_grad():
        layer(_x(4, 5))
    assert not torch.equal(cell.masks[0], first) and all(torch.equal(m, cell.masks[0]) for m in cell.masks)


def test_without_fix_rng_every_call_of_f_draws_a_new_mask():
    torch.manual_seed(2)
    cell = DropCell(p=0.4)
    DEQLayer(cell, fix_rng=False, on_nonconvergence="ignore", max_iter=5)(_x(4, 5))
    assert not all(torch.equal(m, cell.masks[0]) for m in cell.masks)


# ---------------------------------------------------------------------------
# torch.compile-d f (fast CPU backends)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_f_gives_the_same_fixed_point_and_gradients(backend):
    torch._dynamo.reset()
    cell = TanhCell()
    compiled = torch.compile(cell, backend=backend)
    x = _x(requires_grad=True)
    w = torch.linspace(-1, 1, 5, dtype=DT)
    for backward in (Implicit(**TIGHT), NPG(k=3), UPG(k=2)):
        out = []
        for f in (cell, compiled):
            z = DEQLayer(f, backward=backward, **TIGHT)(x)
            out.append((z.detach(), *_params_and_x_grads((z * w).sum(), cell, x)))
        _assert_all_close(out[0], out[1], tol=1e-12)


def test_compiled_f_with_dropout_keeps_one_mask_per_call():
    """aot_eager draws dropout masks from the global generator, so the replay fixes them too."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    cell = DropCell(p=0.4)
    compiled = torch.compile(lambda z, x: cell.drop(torch.tanh(cell.pre(z, x))), backend="aot_eager")
    x = _x(4, 5, requires_grad=True)
    z = DEQLayer(compiled, backward=Implicit(**TIGHT), **TIGHT)(x)
    mask = z.detach() != 0  # the output is f(z*): its zeros are the mask
    assert 0 < int(mask.sum()) < mask.numel()
    w = torch.linspace(-1, 1, 5, dtype=DT)
    got = _params_and_x_grads((z * w).sum(), cell, x)
    keep = mask.to(DT) / (1 - cell.p)
    z_ref = DEQLayer(lambda z, x: torch.tanh(cell.pre(z, x)) * keep, backward=Implicit(**TIGHT), **TIGHT)(x)
    _assert_all_close((z,), (z_ref,), tol=1e-12)
    _assert_all_close(got, _params_and_x_grads((z_ref * w).sum(), cell, x), tol=1e-10)


# ---------------------------------------------------------------------------
# Per-call options: the budget and the Jacobian regulariser


def test_max_iter_of_one_call_replaces_the_modes_budget():
    layer = DEQLayer(TanhCell(rho=0.95), solver=FixedPoint(), tol=1e-14, max_iter=40, eval_max_iter=60,
                     on_nonconvergence="ignore")
    x = _x()
    layer(x, max_iter=7)
    assert layer.last_result.n_iter == 7
    layer(x)
    assert layer.last_result.n_iter == 40
    layer.eval()
    layer(x, max_iter=9)
    assert layer.last_result.n_iter == 9
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_iter"):
            layer(x, max_iter=bad)


def test_unroll_steps_is_checked_when_set():
    layer = DEQLayer(TanhCell())
    for bad in (0, -2, 1.5, True, "3"):
        with pytest.raises(ValueError, match="unroll_steps"):
            layer.unroll_steps = bad
    layer.unroll_steps = 3
    layer.unroll_steps = None
    assert layer.unroll_steps is None


@pytest.mark.parametrize("backward", ["implicit", "npg", "upg", "jfb"])
def test_jacobian_reg_is_taken_at_z_star_not_at_f_of_z_star(backward):
    """Far from converged (3 iterations), J_f(z*) and J_f(f(z*)) differ; the layer must use z*."""
    cell = TanhCell(rho=0.9)
    layer = DEQLayer(cell, solver=FixedPoint(), backward=backward, tol=1e-14, max_iter=3,
                     on_nonconvergence="ignore", fix_rng=False)
    x = 3 * _x()
    torch.manual_seed(11)
    z, jac = layer(x, jac_reg=2)
    z_star = layer.last_result.z
    torch.manual_seed(11)
    at_z_star = jacobian_reg(cell, z_star, x, n_probes=2)
    torch.manual_seed(11)
    at_output = jacobian_reg(cell, cell(z_star, x).detach(), x, n_probes=2)
    torch.testing.assert_close(jac, at_z_star, rtol=1e-12, atol=0)
    assert abs(float((at_output - at_z_star).detach())) > 1e-3 * float(at_z_star.detach())  # the points really differ
    (gW,) = torch.autograd.grad(jac, cell.W)
    assert gW.abs().sum() > 0  # the regulariser trains f


def test_jacobian_reg_sees_the_dropout_masks_of_the_solve():
    cell = DropCell(p=0.4, rho=0.5)
    layer = DEQLayer(cell, solver=FixedPoint(), tol=1e-10, max_iter=60)
    _, jac = layer(_x(), jac_reg=1)
    nstep = int(layer.last_result.nstep.max())
    assert len(cell.masks) == nstep + 2  # the solve, the re-attached call, the regulariser's call
    for mask in cell.masks[1:]:
        assert torch.equal(mask, cell.masks[0])
    assert torch.isfinite(jac)


def test_jacobian_reg_in_unrolled_mode_is_taken_at_the_last_input_of_f():
    cell = TanhCell(rho=0.9)
    layer = DEQLayer(cell, unroll_steps=4, fix_rng=False)
    x = _x()
    torch.manual_seed(3)
    z, jac = layer(x, jac_reg=3)
    z_in = x.new_zeros(x.shape)
    for _ in range(3):
        z_in = cell(z_in, x)
    torch.manual_seed(3)
    torch.testing.assert_close(jac, jacobian_reg(cell, z_in, x, n_probes=3), rtol=1e-12, atol=0)
    torch.testing.assert_close(z, cell(z_in, x), rtol=1e-12, atol=0)


def test_jacobian_reg_argument_is_checked():
    layer = DEQLayer(TanhCell())
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="jac_reg"):
            layer(_x(), jac_reg=bad)
    assert isinstance(layer(_x(), jac_reg=0), torch.Tensor)


@pytest.mark.parametrize("backward", ["implicit", "npg", "upg", "jfb"])
def test_empty_batch_gives_empty_output_and_zero_gradients(backward):
    cell = TanhCell()
    layer = DEQLayer(cell, backward=backward, tol=1e-8)
    x = torch.zeros(0, 5, dtype=DT, requires_grad=True)
    z = layer(x)
    assert z.shape == (0, 5) and layer.last_result.n_iter == 0
    z.sum().backward()
    assert x.grad.shape == (0, 5) and all(p.grad is None or p.grad.abs().sum() == 0 for p in cell.parameters())


def test_atol_reaches_the_solve_in_both_modes():
    layer = DEQLayer(lambda z, x: 0.5 * z + x, solver=FixedPoint(), tol=1e-12, atol=1e-3, max_iter=200,
                     eval_max_iter=200)
    x = torch.full((2, 3), 1e-6, dtype=DT)  # z* = 2e-6: tiny, so ||g|| <= atol from the start
    layer(x)
    assert layer.last_result.atol == 1e-3 and layer.last_result.n_iter == 1
    layer.eval()
    layer(x)
    assert layer.last_result.n_iter == 1
    with pytest.raises(ValueError, match="atol"):
        DEQLayer(lambda z, x: z, atol=-1.0)


# ---------------------------------------------------------------------------
# Active set: compact=...


class RowCell(nn.Module):
    """f(z, (x, scale)) = tanh(z W^T + x U^T) * scale: per-sample data in a tuple x."""

    def __init__(self):
        super().__init__()
        self.cell = TanhCell(rho=0.9)

    def forward(self, z, x):
        inp, scale = x
        return self.cell(z, inp) * scale


@pytest.mark.parametrize("backward", ["implicit", "npg", "upg"])
def test_compact_layer_equals_the_full_batch_forward_and_gradients(backward):
    cell = RowCell()
    x = _x(batch=6, requires_grad=True)
    scale = torch.linspace(0.2, 1.0, 6, dtype=DT)[:, None]  # samples converge at different speeds
    results = []
    for compact in (False, 1.0):
        layer = DEQLayer(cell, solver="anderson", backward=backward, tol=1e-10, max_iter=100, compact=compact)
        z = layer((x, scale), torch.zeros(6, 5, dtype=DT))
        grads = _params_and_x_grads((z * torch.arange(5, dtype=DT)).sum(), cell, x)
        results.append((z.detach(), grads, layer.last_result))
    (z_full, g_full, r_full), (z_c, g_c, r_c) = results
    torch.testing.assert_close(z_c, z_full, rtol=0, atol=1e-12)
    _assert_all_close(g_c, g_full, tol=1e-9)
    assert torch.equal(r_c.nstep, r_full.nstep)
    assert r_c.rows == int(r_c.nstep.sum()) < r_full.rows


def test_compact_refuses_an_f_that_draws_random_numbers():
    layer = DEQLayer(DropCell(p=0.3), tol=1e-8, max_iter=50, compact=True)
    with pytest.raises(ValueError, match="random numbers"):
        layer(_x())
    layer.eval()  # no dropout: allowed
    layer(_x())


def test_compact_checks_that_x_is_batch_first():
    layer = DEQLayer(lambda z, x: torch.tanh(z + x[0] + x[1]), tol=1e-8, compact=True)
    with pytest.raises(ValueError, match=r"x\[1\].*shape \(5,\)"):
        layer((torch.zeros(3, 5), torch.zeros(5)), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="compact"):
        DEQLayer(lambda z, x: z, compact=2.0)
    with pytest.raises(ValueError, match="check_every"):
        DEQLayer(lambda z, x: z, check_every=0)


def test_check_every_reaches_the_solve():
    layer = DEQLayer(TanhCell(rho=0.9), solver="anderson", tol=1e-10, max_iter=100)
    x = _x()
    layer(x)
    one = layer.last_result
    layer.check_every = 5
    layer(x)
    assert torch.equal(layer.last_result.nstep, one.nstep) and layer.last_result.n_iter >= one.n_iter
    assert layer.last_result.n_iter % 5 == 0 or layer.last_result.n_iter == 100


# ---------------------------------------------------------------------------
# torch.func, last_result, its repr


def test_torch_func_transforms_raise_a_clear_error():
    layer = DEQLayer(TanhCell(), tol=1e-8)
    x = _x()
    message = "DEQLayer does not support torch.func transforms"
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(layer)(x[:, None])
    with pytest.raises(RuntimeError, match=message):
        torch.func.grad(lambda x: layer(x).sum())(x)
    with pytest.raises(RuntimeError, match=message):
        torch.func.jacrev(layer)(x)
    # functional_call is not a transform: plain autograd through it works
    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    z = torch.func.functional_call(layer, params, (x,))
    (gW,) = torch.autograd.grad(z.sum(), params["f.W"])
    assert gW.abs().sum() > 0


def test_last_result_gets_its_backward_in_place():
    layer = DEQLayer(TanhCell(), tol=1e-8)
    x = _x(requires_grad=True)
    z1 = layer(x)
    first = layer.last_result  # a reference taken after the forward
    z2 = layer(2 * x)
    second = layer.last_result
    assert first is not second and first.backward is None
    z1.sum().backward()
    assert first.backward is not None and second.backward is None  # each call's own result
    z2.sum().backward()
    assert layer.last_result is second and second.backward is not None
    assert bool(first.backward.converged.all()) and not first.backward.z.requires_grad


def test_repr_of_last_result_is_one_short_line():
    layer = DEQLayer(lambda z, x: torch.tanh(0.5 * z + x), solver=FixedPoint(), tol=1e-6, max_iter=100)
    x = torch.randn(256, 64, dtype=DT, requires_grad=True)
    z = layer(x)
    res = layer.last_result
    text = repr(res)
    summary = res.summary()
    assert "\n" not in text and len(text) < 200
    assert text.startswith(f"SolverResult(fixed_point, batch 256, n_iter {res.n_iter}, nstep mean "
                           f"{summary['nstep_mean']:.3g} max {int(summary['nstep_max'])}, max residual "
                           f"{summary['residual_max']:.3g} (tol 1e-06, rel), converged 256/256, rows {res.rows}")
    z.sum().backward()
    text = repr(res)
    assert "\n" not in text and len(text) < 400
    assert ", backward=SolverResult(anderson, batch 256, " in text
    assert text.endswith(f"converged 256/256, rows {res.backward.rows}))")
    empty = SolverResult(z=torch.zeros(0, 3), nstep=torch.zeros(0, dtype=torch.int64), residual=torch.zeros(0),
                         converged=torch.zeros(0, dtype=torch.bool), trace=torch.zeros(1, 0),
                         best_step=torch.zeros(0, dtype=torch.int64), n_iter=1, solver="anderson", stop_mode="rel",
                         tol=1e-4)
    assert repr(empty) == "SolverResult(anderson, batch 0, n_iter 1)"
    layer = DEQLayer(lambda z, x: torch.tanh(0.5 * z + x), tol=1e-6, atol=1e-9, compact=True)
    layer(x)
    text = repr(layer.last_result)
    assert "(tol 1e-06, atol 1e-09, rel)" in text and text.endswith(f", rows {layer.last_result.rows})")
