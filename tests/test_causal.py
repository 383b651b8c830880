"""Causal mode (``time_dim``): an output never depends on later positions, at any budget.

Bit for bit, in float64: edit the input at a later position and every earlier
output is identical, for every solver, at 3, 10 and 30 iterations, loose and
tight tolerances, tensor and tuple states. The same edits do move earlier
outputs without causal mode (the tests have teeth).
"""

from __future__ import annotations

import math

import pytest
import torch

import deq
from deq import Anderson, Broyden, FixedPoint, NonFiniteError, Solver, solve

DT = torch.float64
SOLVERS = ["fixed_point", "anderson", "broyden", Anderson(m=2, beta=0.8), Broyden(memory=3), FixedPoint(damping=0.7)]
BUDGETS = [3, 10, 30]


def _id(solver) -> str:
    return solver if isinstance(solver, str) else repr(solver)


class CausalAttention:
    """``f(z)_t = tanh(Wo softmax(q_t k_{<=t}^T / sqrt(d)) v_{<=t} + x_t)``: causal self-attention, per batch."""

    def __init__(self, batch=3, length=9, dim=6, seed=0, scale=0.8):
        gen = torch.Generator().manual_seed(seed)
        self.w = [scale * torch.randn(dim, dim, generator=gen, dtype=DT) / math.sqrt(dim) for _ in range(4)]
        self.x = torch.randn(batch, length, dim, generator=gen, dtype=DT)
        self.shape = (batch, length, dim)

    def __call__(self, z, x=None):
        x = self.x if x is None else x
        wq, wk, wv, wo = self.w
        scores = (z @ wq) @ (z @ wk).transpose(1, 2) / math.sqrt(z.shape[-1])
        future = torch.ones(z.shape[1], z.shape[1], dtype=torch.bool).triu(1)
        attn = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1) @ (z @ wv)
        return torch.tanh(attn @ wo + x)


def _edited(x, position, sample=1, seed=9):
    gen = torch.Generator().manual_seed(seed)
    out = x.clone()
    out[sample, position:] = torch.randn(out[sample, position:].shape, generator=gen, dtype=DT) * 3
    return out


@pytest.mark.parametrize("solver", SOLVERS, ids=_id)
@pytest.mark.parametrize("max_iter", BUDGETS)
@pytest.mark.parametrize("tol", [1e-3, 1e-12])
def test_future_edits_change_no_earlier_position(solver, max_iter, tol):
    f = CausalAttention()
    z0 = torch.zeros(f.shape, dtype=DT)
    base = solve(lambda z: f(z), z0, solver=solver, tol=tol, max_iter=max_iter, time_dim=1)
    for position in (2, 5, 8):
        x = _edited(f.x, position)
        res = solve(lambda z: f(z, x), z0, solver=solver, tol=tol, max_iter=max_iter, time_dim=1)
        assert torch.equal(res.z[:, :position], base.z[:, :position]), (position, solver)
        assert torch.equal(res.z[0], base.z[0]) and torch.equal(res.z[2], base.z[2])  # other samples
        # The layer's output is f(z*): causal as well.
        assert torch.equal(f(res.z, x)[:, :position], f(base.z)[:, :position])
        assert not torch.equal(res.z[1, position:], base.z[1, position:])  # the edit did something


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_without_causal_mode_future_edits_leak(solver):
    """The same setting without time_dim: Anderson's and Broyden's per-sample mixing moves earlier positions."""
    f = CausalAttention()
    z0 = torch.zeros(f.shape, dtype=DT)
    base = solve(lambda z: f(z), z0, solver=solver, tol=1e-12, max_iter=10)
    x = _edited(f.x, 5)
    res = solve(lambda z: f(z, x), z0, solver=solver, tol=1e-12, max_iter=10)
    assert (res.z[1, :5] - base.z[1, :5]).abs().max() > 1e-6


@pytest.mark.parametrize("solver", SOLVERS, ids=_id)
def test_tuple_state_with_time_last(solver):
    """A TrellisNet-like (h, c), each (B, C, L), time_dim=-1: a causal conv of kernel 2 with a carried cell."""
    gen = torch.Generator().manual_seed(2)
    batch, chan, length = 2, 3, 8
    w = 0.5 * torch.randn(2, 4 * chan, chan, generator=gen, dtype=DT) / math.sqrt(chan)
    inp = torch.randn(batch, 4 * chan, length, generator=gen, dtype=DT)

    def f(z, u=inp):
        h, c = z
        h_prev = torch.nn.functional.pad(h, (1, 0))[..., :-1]
        pre = torch.einsum("oc,bcl->bol", w[0], h_prev) + torch.einsum("oc,bcl->bol", w[1], h) + u
        i, o, g, fg = pre.chunk(4, dim=1)
        c_prev = torch.nn.functional.pad(c, (1, 0))[..., :-1]
        c_new = torch.sigmoid(fg) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new

    z0 = (torch.zeros(batch, chan, length, dtype=DT), torch.zeros(batch, chan, length, dtype=DT))
    for max_iter in BUDGETS:
        base = solve(f, z0, solver=solver, tol=1e-12, max_iter=max_iter, time_dim=-1)
        edited = inp.clone()
        edited[0, :, 4:] += 1.0
        res = solve(lambda z: f(z, edited), z0, solver=solver, tol=1e-12, max_iter=max_iter, time_dim=-1)
        for a, b in zip(res.z, base.z):
            assert torch.equal(a[..., :4], b[..., :4])
            assert a.is_contiguous()


@pytest.mark.parametrize("solver", SOLVERS, ids=_id)
def test_causal_batch_equals_each_sample_alone(solver):
    f = CausalAttention(batch=4)
    z0 = torch.zeros(f.shape, dtype=DT)
    res = solve(lambda z: f(z), z0, solver=solver, tol=1e-9, max_iter=60, time_dim=1)
    for b in range(4):
        one = solve(lambda z: f(z, f.x[b:b + 1]), z0[b:b + 1], solver=solver, tol=1e-9, max_iter=60, time_dim=1)
        torch.testing.assert_close(one.z[0], res.z[b], rtol=0, atol=1e-12)
        assert one.nstep[0] == res.nstep[b] and one.converged[0] == res.converged[b]


def test_positions_freeze_by_prefix_and_the_sample_stops_when_all_have():
    """Record every iterate: position t stops changing from the first iteration at which every prefix <= t passed."""
    f = CausalAttention(batch=1, length=6)
    seen = []

    def spy(z):
        seen.append(z.clone())
        return f(z)

    tol = 1e-8
    res = solve(spy, torch.zeros(f.shape, dtype=DT), solver="anderson", tol=tol, max_iter=100, time_dim=1)
    assert res.converged.all() and res.nstep[0] == len(seen)

    def passed(z, t):
        fz = f(z)[0, :t + 1]
        return bool(torch.linalg.vector_norm(fz - z[0, :t + 1]) <= tol * torch.linalg.vector_norm(fz))

    first = [next(k for k, z in enumerate(seen) if all(passed(z, s) for s in range(t + 1))) for t in range(6)]
    assert first == sorted(first) and first[-1] == len(seen) - 1  # a growing frozen prefix; the last ends it
    assert first[0] < first[-1]  # early positions froze before the last one
    for t, k in enumerate(first):
        for z in seen[k + 1:]:
            assert torch.equal(z[0, t], seen[k][0, t])
    assert torch.equal(res.z, seen[-1])  # the last iterate is returned


def test_causal_anderson_needs_no_more_f_calls_than_the_plain_one_here():
    f = CausalAttention(batch=4, length=12, scale=1.0)
    z0 = torch.zeros(f.shape, dtype=DT)
    for tol in (1e-3, 1e-8):
        causal = solve(lambda z: f(z), z0, solver="anderson", tol=tol, max_iter=200, time_dim=1)
        plain = solve(lambda z: f(z), z0, solver="anderson", tol=tol, max_iter=200)
        assert causal.converged.all() and plain.converged.all()
        assert causal.nstep.double().mean() <= 1.1 * plain.nstep.double().mean()


def test_invalid_causal_settings():
    z0 = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="time_dim=0"):
        solve(torch.cos, z0, time_dim=0)
    with pytest.raises(ValueError, match="time_dim=3"):
        solve(torch.cos, z0, time_dim=3)
    with pytest.raises(ValueError, match="same time axis and length"):
        solve(lambda z: z, (torch.zeros(2, 4, 3), torch.zeros(2, 5, 3)), time_dim=1)
    for beyond in (4, 5, -4):  # past the last dim: not wrapped around to a valid one
        with pytest.raises(ValueError, match=f"time_dim={beyond}"):
            solve(torch.cos, z0, time_dim=beyond)
    for not_int in (1.0, True, "1"):
        with pytest.raises(ValueError, match="time_dim must be an integer"):
            solve(torch.cos, z0, time_dim=not_int)

    class RowBlind(Solver):
        name = "row_blind"

        def init(self, it):
            return None

        def step(self, state, it, active, evaluate):
            z = it.fz
            fz = evaluate(z, active)
            return state, z, fz, fz - z

    with pytest.raises(TypeError, match="no causal mode"):
        solve(torch.cos, z0, solver=RowBlind(), time_dim=1)


def test_non_finite_in_causal_mode_names_the_sample_and_step():
    f = CausalAttention()
    calls = [0]

    def bad(z):
        calls[0] += 1
        out = f(z)
        if calls[0] >= 4:
            out[2, 5] = math.nan
        return out

    with pytest.raises(NonFiniteError, match=r"step 3 for samples \[2\]") as err:
        solve(bad, torch.zeros(f.shape, dtype=DT), solver="anderson", tol=1e-12, max_iter=20, time_dim=1)
    assert err.value.result is None


@pytest.mark.parametrize("backward", ["implicit", "npg", "upg"])
def test_layer_in_causal_mode_is_causal_and_differentiable(backward):
    f = CausalAttention()

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.ParameterList([torch.nn.Parameter(w) for w in f.w])

        def forward(self, z, x):
            f.w = list(self.w)
            return f(z, x)

    cell = Cell()
    layer = deq.DEQLayer(cell, solver="anderson", backward=backward, tol=1e-3, max_iter=10, time_dim=1,
                         on_nonconvergence="ignore")
    x = f.x.clone()
    z = layer(x)
    z.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())
    with torch.no_grad():
        edited = _edited(x, 4)
        assert torch.equal(layer(edited)[:, :4], layer(x)[:, :4])


def test_causal_broyden_keeps_the_coupling_between_positions():
    """A TrellisNet-like cell couples each position to the previous ones strongly. Broyden's causal
    construction (the second method with prefix inner products) keeps that coupling: its f-calls stay
    near the plain Broyden's. One good-method inverse per position (block diagonal in time) needed
    several times as many here."""
    gen = torch.Generator().manual_seed(7)
    batch, chan, length = 3, 6, 16
    w = torch.randn(2, 4 * chan, chan, generator=gen, dtype=DT) / math.sqrt(chan)
    inp = torch.randn(batch, 4 * chan, length, generator=gen, dtype=DT)

    def f(z):
        h, c = z
        pre = (torch.einsum("oc,bcl->bol", w[0], torch.nn.functional.pad(h, (1, 0))[..., :-1])
               + torch.einsum("oc,bcl->bol", w[1], h) + inp)
        i, o, g, fg = pre.chunk(4, dim=1)
        c_new = torch.sigmoid(fg) * torch.nn.functional.pad(c, (1, 0))[..., :-1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new

    z0 = (torch.zeros(batch, chan, length, dtype=DT), torch.zeros(batch, chan, length, dtype=DT))
    for tol in (1e-3, 1e-8):
        plain = solve(f, z0, solver="broyden", tol=tol, max_iter=300)
        causal = solve(f, z0, solver="broyden", tol=tol, max_iter=300, time_dim=2)
        assert plain.converged.all() and causal.converged.all()
        assert causal.nstep.double().mean() <= 1.3 * plain.nstep.double().mean(), (tol, causal.nstep, plain.nstep)


def test_broyden_line_search_has_no_causal_mode():
    with pytest.raises(TypeError, match="line_search"):
        solve(torch.cos, torch.zeros(2, 4, 3), solver=Broyden(line_search=True), time_dim=1)


@pytest.mark.parametrize("solver", SOLVERS, ids=_id)
def test_compact_in_causal_mode_equals_the_full_batch(solver):
    """Samples whose positions have all stopped leave the working set; the others are unchanged."""
    f = CausalAttention(batch=5, length=7)
    f.x[0] *= 0.05  # easy samples stop early
    f.x[1] *= 0.2
    z0 = torch.zeros(f.shape, dtype=DT)

    def rowwise(z, rows):
        return f(z, f.x if rows is None else f.x[rows])

    full = solve(lambda z: f(z), z0, solver=solver, tol=1e-10, max_iter=80, time_dim=1)
    for compact in (1.0, 0.5):
        res = solve(rowwise, z0, solver=solver, tol=1e-10, max_iter=80, time_dim=1, compact=compact)
        torch.testing.assert_close(res.z, full.z, rtol=0, atol=1e-12)
        assert torch.equal(res.nstep, full.nstep) and torch.equal(res.converged, full.converged)
        torch.testing.assert_close(res.trace, full.trace, rtol=1e-9, atol=1e-15)
        assert res.rows <= full.rows
    assert solve(rowwise, z0, solver=solver, tol=1e-10, max_iter=80, time_dim=1, compact=1.0).rows < full.rows


def test_a_single_position_is_the_plain_solve():
    z0 = torch.zeros(3, 1, 4, dtype=DT)
    x = torch.linspace(-1, 1, 12, dtype=DT).view(3, 1, 4)
    f = lambda z: torch.tanh(0.6 * z.flip(2) + x)  # noqa: E731
    causal = solve(f, z0, solver="anderson", tol=1e-10, max_iter=40, time_dim=1)
    plain = solve(f, z0, solver="anderson", tol=1e-10, max_iter=40)
    assert causal.converged.all() and causal.z.shape == z0.shape
    torch.testing.assert_close(causal.z, plain.z, rtol=0, atol=1e-9)


def test_causal_tuple_state_keeps_each_parts_dtype_and_is_contiguous():
    """Time last (a non-trivial move of the time axis) and parts of two dtypes: each part comes back
    in its own dtype, contiguous, equal to the plain solve's."""
    h0, c0 = torch.zeros(2, 3, 5, dtype=torch.float32), torch.zeros(2, 3, 5, dtype=DT)
    x = torch.linspace(-1, 1, 30, dtype=DT).view(2, 3, 5)

    def f(z):
        h, c = z
        c_new = 0.5 * torch.tanh(c + x) + 0.2 * torch.nn.functional.pad(h.to(DT), (1, 0))[..., :-1]
        return torch.tanh(c_new).to(torch.float32), c_new

    causal = solve(f, (h0, c0), solver="anderson", tol=1e-9, max_iter=60, time_dim=2)
    plain = solve(f, (h0, c0), solver="anderson", tol=1e-9, max_iter=60)
    assert causal.converged.all()
    for got, want, like in zip(causal.z, plain.z, (h0, c0)):
        assert got.dtype == like.dtype and got.shape == like.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
