"""Property-based tests of the solver loop's per-sample contract (hypothesis).

Random batch sizes (1 included), float32 and float64, tensor and tuple states
(1 to 3 parts of different trailing shapes), per-sample contraction strengths
from easy to barely contractive (some samples run out of budget), tolerances
and budgets, over every solver variant. The properties:

* a batch gives what each sample gives alone (``z`` close, ``nstep``,
  ``converged`` and ``best_step`` equal), also with ``compact=1.0`` and
  with ``check_every=3``;
* ``nstep`` equals a per-sample count of the calls of ``f``;
* a sample that has converged is frozen: ``f`` sees the same row in every
  later call, and that row is what is returned;
* causal mode: an edit at a later position changes no earlier position of the
  result, bit for bit in float64.

The equilibrium functions are elementwise per sample (a tanh of a mix of the
state and a cyclic shift of it), so a sample's values do not depend on which
other samples share the batch, to the bit. Derandomised: every run draws the
same examples.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deq.solvers import Anderson, Broyden, FixedPoint, solve

SOLVERS = ["fixed_point", FixedPoint(damping=0.7), "anderson", Anderson(m=2, beta=0.8), "broyden",
           Broyden(line_search=True)]
IDS = ["fixed_point", "damped", "anderson", "anderson_beta", "broyden", "broyden_ls"]
solver_param = pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
# Broyden's line search has no causal mode (it raises; tests/test_causal.py pins that).
causal_solver_param = pytest.mark.parametrize("solver", SOLVERS[:-1], ids=IDS[:-1])

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Problem:
    """``f(z) = tanh(a_b z + c_b roll(z) + u_b)`` on the flattened state, ``|a_b| + |c_b| = rho_b``.

    ``roll`` shifts the flat state by one entry (across parts too), so the
    Jacobian is not diagonal; every op is elementwise per sample.
    """

    def __init__(self, *, batch, trailing, dtype, rhos, seed):
        gen = torch.Generator().manual_seed(seed)
        self.trailing, self.dtype = trailing, dtype
        self.sizes = [math.prod(t) for t in trailing]
        dim = sum(self.sizes)
        split = torch.rand(batch, 1, generator=gen, dtype=torch.float64)
        rho = torch.tensor(rhos, dtype=torch.float64)[:, None]
        sign = torch.where(torch.rand(batch, 1, generator=gen) < 0.5, -1.0, 1.0).double()
        self.a = (rho * split).to(dtype)
        self.c = (sign * rho * (1 - split)).to(dtype)
        self.u = (2 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)).to(dtype)
        self.z0 = tuple((0.5 * torch.randn(batch, *t, generator=gen, dtype=torch.float64)).to(dtype)
                        for t in trailing)
        if len(trailing) == 1:
            self.z0 = self.z0[0]

    def _flat(self, z):
        parts = z if isinstance(z, tuple) else (z,)
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)

    def _unflat(self, flat):
        parts = tuple(p.reshape(flat.shape[0], *t) for p, t in zip(flat.split(self.sizes, dim=1), self.trailing))
        return parts if len(parts) > 1 else parts[0]

    def f_for(self, idx):
        a, c, u = self.a[idx], self.c[idx], self.u[idx]

        def f(z, rows=None):
            a_, c_, u_ = (a, c, u) if rows is None else (a[rows], c[rows], u[rows])
            flat = self._flat(z)
            return self._unflat(torch.tanh(a_ * flat + c_ * flat.roll(1, dims=1) + u_))

        return f

    def z0_for(self, idx):
        if isinstance(self.z0, tuple):
            return tuple(p[idx] for p in self.z0)
        return self.z0[idx]


@st.composite
def problems(draw):
    """A Problem and a budget: (problem, tol, max_iter)."""
    batch = draw(st.integers(1, 4))
    n_parts = draw(st.integers(1, 3))
    trailing = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple))
                     for _ in range(n_parts))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    rhos = draw(st.lists(st.floats(0.05, 0.98), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2 ** 16))
    floor = 1e-6 if dtype == torch.float32 else 1e-12
    tol = draw(st.sampled_from([1e-3, 1e-5, floor]))
    max_iter = draw(st.integers(3, 25))
    return Problem(batch=batch, trailing=trailing, dtype=dtype, rhos=rhos, seed=seed), tol, max_iter


def _rows(z, b):
    """Sample ``b`` of a flat view of a state (all parts)."""
    parts = z if isinstance(z, tuple) else (z,)
    return torch.cat([p[b].reshape(-1) for p in parts])


def _assert_z_close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def _cat(parts):
    return tuple(torch.cat(p) for p in zip(*parts)) if isinstance(parts[0], tuple) else torch.cat(parts)


# ----------------------------------------------------------------------------
# Per-sample equivalence


@solver_param
@pytest.mark.parametrize("options", [{}, {"compact": 1.0}, {"check_every": 3}], ids=["plain", "compact", "every3"])
@SETTINGS
@given(drawn=problems())
def test_batch_equals_each_sample_alone(solver, options, drawn):
    prob, tol, max_iter = drawn
    batch_size = prob.a.shape[0]
    batch = solve(prob.f_for(slice(None)), prob.z0, solver=solver, tol=tol, max_iter=max_iter, **options)
    alone = [solve(prob.f_for([b]), prob.z0_for([b]), solver=solver, tol=tol, max_iter=max_iter)
             for b in range(batch_size)]
    assert batch.nstep.tolist() == [int(r.nstep) for r in alone]
    assert batch.converged.tolist() == [bool(r.converged) for r in alone]
    assert batch.best_step.tolist() == [int(r.best_step) for r in alone]
    _assert_z_close(batch.z, _cat([r.z for r in alone]), prob.dtype)


# ----------------------------------------------------------------------------
# nstep counting


class RowCounter:
    """Wraps an active-set ``f(z, rows)`` and counts, per sample, the calls that evaluate its row."""

    def __init__(self, f, batch):
        self.f, self.calls = f, torch.zeros(batch, dtype=torch.int64)

    def __call__(self, z, rows):
        if rows is None:
            self.calls += 1
        else:
            self.calls[rows] += 1
        return self.f(z, rows)


@solver_param
@SETTINGS
@given(drawn=problems())
def test_nstep_counts_the_calls_of_f_each_sample_takes_part_in(solver, drawn):
    """With ``compact=1.0`` a stopped sample leaves the working set at once: its calls are exactly its nstep."""
    prob, tol, max_iter = drawn
    batch_size = prob.a.shape[0]
    counter = RowCounter(prob.f_for(slice(None)), batch_size)
    res = solve(counter, prob.z0, solver=solver, tol=tol, max_iter=max_iter, compact=1.0)
    assert torch.equal(res.nstep, counter.calls)
    assert res.rows == int(counter.calls.sum())
    assert (res.nstep >= 1).all() and (res.nstep <= max_iter).all()
    # Unconverged samples are charged the whole budget; converged ones stop at their best step.
    assert torch.equal(res.nstep[~res.converged], torch.full_like(res.nstep[~res.converged], max_iter))
    assert torch.equal(res.nstep[res.converged], res.best_step[res.converged] + 1)


@solver_param
@SETTINGS
@given(drawn=problems())
def test_nstep_of_a_sample_alone_is_its_number_of_calls(solver, drawn):
    prob, tol, max_iter = drawn
    for b in range(prob.a.shape[0]):
        calls = []
        f = prob.f_for([b])
        res = solve(lambda z: calls.append(1) or f(z), prob.z0_for([b]), solver=solver, tol=tol, max_iter=max_iter)
        assert res.nstep.tolist() == [len(calls)] and res.n_iter == len(calls)


# ----------------------------------------------------------------------------
# Frozen converged samples


@solver_param
@pytest.mark.parametrize("check_every", [1, 3])
@SETTINGS
@given(drawn=problems())
def test_a_converged_sample_is_frozen(solver, check_every, drawn):
    prob, tol, max_iter = drawn
    inputs, f = [], prob.f_for(slice(None))

    def recording(z):
        inputs.append(tuple(p.clone() for p in z) if isinstance(z, tuple) else z.clone())
        return f(z)

    res = solve(recording, prob.z0, solver=solver, tol=tol, max_iter=max_iter, check_every=check_every)
    assert len(inputs) == res.n_iter
    for b in torch.nonzero(res.converged).flatten().tolist():
        stop = int(res.nstep[b])  # the call at which it passed the test
        frozen = _rows(inputs[stop - 1], b)
        for later in inputs[stop:]:
            assert torch.equal(_rows(later, b), frozen)
        assert torch.equal(_rows(res.z, b), frozen)
        assert int(res.best_step[b]) == stop - 1


# ----------------------------------------------------------------------------
# Causal mode


@st.composite
def causal_problems(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(2, 7))
    n_parts = draw(st.integers(1, 3))
    channels = [draw(st.integers(1, 3)) for _ in range(n_parts)]
    rhos = draw(st.lists(st.floats(0.05, 0.95), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2 ** 16))
    position = draw(st.integers(1, length - 1))
    tol = draw(st.sampled_from([1e-2, 1e-6, 1e-12]))
    max_iter = draw(st.integers(2, 30))
    return batch, length, channels, rhos, seed, position, tol, max_iter


class CausalProblem:
    """Parts ``(B, L, C_i)``: ``f(z)_t = tanh(a z_t + c z_{t-1} + d roll_C(z_t) + x_t)`` on the channels of all parts."""

    def __init__(self, batch, length, channels, rhos, seed):
        gen = torch.Generator().manual_seed(seed)
        rho = torch.tensor(rhos, dtype=torch.float64)[:, None, None]
        w = torch.rand(batch, 3, generator=gen, dtype=torch.float64)
        w = w / w.sum(dim=1, keepdim=True)
        self.a, self.c, self.d = (rho * w[:, i, None, None] for i in range(3))
        self.channels = channels
        self.x = 2 * torch.randn(batch, length, sum(channels), generator=gen, dtype=torch.float64)
        parts = tuple(torch.zeros(batch, length, ch, dtype=torch.float64) for ch in channels)
        self.z0 = parts if len(parts) > 1 else parts[0]

    def f(self, x):
        def f(z):
            flat = torch.cat(z, dim=2) if isinstance(z, tuple) else z
            prev = torch.cat([torch.zeros_like(flat[:, :1]), flat[:, :-1]], dim=1)
            out = torch.tanh(self.a * flat + self.c * prev + self.d * flat.roll(1, dims=2) + x)
            parts = out.split(self.channels, dim=2)
            return parts if len(parts) > 1 else parts[0]

        return f


@causal_solver_param
@SETTINGS
@given(drawn=causal_problems())
def test_causal_edit_at_a_later_position_changes_no_earlier_one(solver, drawn):
    batch, length, channels, rhos, seed, position, tol, max_iter = drawn
    prob = CausalProblem(batch, length, channels, rhos, seed)
    edited = prob.x.clone()
    edited[:, position:] += 3 * torch.randn(edited[:, position:].shape, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(seed + 1))
    runs = [solve(prob.f(x), prob.z0, solver=solver, tol=tol, max_iter=max_iter, time_dim=1)
            for x in (prob.x, edited)]
    first, second = ((r.z if isinstance(r.z, tuple) else (r.z,)) for r in runs)
    for p, q in zip(first, second):
        assert torch.equal(p[:, :position], q[:, :position])
