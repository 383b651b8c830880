"""Forward solvers: closed forms, SciPy, the shared per-sample contract, errors.

Every test runs in float64 on the CPU (bf16 only where the dtype contract is the
point) and takes well under a second. The shared contract (per-sample stopping,
best iterate, f-call counting, flattening) is one parametrised test per rule run
over every registered solver plus the variants that take other code paths
(damped iteration, Broyden with its line search).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.optimize
import torch

import deq
from deq.solvers import (Anderson, Broyden, FixedPoint, NonFiniteError, Solver, SolverResult, get_solver,
                         residual, solve, solver_names)

F64 = torch.float64
COS_FIXED_POINT = 0.7390851332151607  # the Dottie number, cos(x) = x

# Every registered name (default options) plus variants that run other branches.
SOLVERS = [*solver_names(), FixedPoint(damping=0.7), Anderson(m=2, beta=0.8), Broyden(line_search=True),
           Broyden(memory=3)]
# Those that are meant to find roots where the plain iteration diverges.
ACCELERATED = ["anderson", "broyden", Broyden(line_search=True)]


def _id(solver) -> str:
    return solver if isinstance(solver, str) else repr(solver)


solver_param = pytest.mark.parametrize("solver", SOLVERS, ids=_id)




# ----------------------------------------------------------------------------
# Problems. Each is a batch of independent per-sample problems; ``f_for(idx)``
# is the same f restricted to the samples ``idx``, so a batch can be compared
# with each of its samples solved alone.

class Affine:
    """``z = A_b z + c_b`` with ``||A_b||_2 = rho_b < 1``; ``z* = (I - A_b)^{-1} c_b``."""

    def __init__(self, batch=4, dim=6, rho=(0.3, 0.6, 0.8, 0.9), seed=0, dtype=F64):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(batch, dim, dim, generator=gen, dtype=dtype)
        rho = torch.as_tensor(rho, dtype=dtype).expand(batch)
        self.A = a * (rho / torch.linalg.matrix_norm(a, ord=2))[:, None, None]
        self.c = torch.randn(batch, dim, generator=gen, dtype=dtype)
        self.z_star = torch.linalg.solve(torch.eye(dim, dtype=dtype) - self.A, self.c)
        self.z0 = torch.zeros(batch, dim, dtype=dtype)

    def f_for(self, idx):
        A, c = self.A[idx], self.c[idx]
        return lambda z: (A @ z[:, :, None]).squeeze(2) + c

    @property
    def f(self):
        return self.f_for(slice(None))


class TanhNet:
    """``z = tanh(W_b z + u_b)``, ``||W_b||_2 = rho_b``: a nonlinear contraction."""

    def __init__(self, batch=4, dim=6, rho=(0.2, 0.5, 0.8, 0.95), seed=1, dtype=F64):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(batch, dim, dim, generator=gen, dtype=dtype)
        rho = torch.as_tensor(rho, dtype=dtype).expand(batch)
        self.W = w * (rho / torch.linalg.matrix_norm(w, ord=2))[:, None, None]
        self.u = torch.randn(batch, dim, generator=gen, dtype=dtype)
        self.z0 = torch.zeros(batch, dim, dtype=dtype)

    def f_for(self, idx):
        W, u = self.W[idx], self.u[idx]
        return lambda z: torch.tanh((W @ z[:, :, None]).squeeze(2) + u)

    @property
    def f(self):
        return self.f_for(slice(None))


class SPDRoot:
    """Root of ``g(z) = b - A z - nonlin * tanh(z)`` written as the fixed point of ``z + g(z)``.

    ``A`` is SPD with eigenvalues ``0.5 .. top``, so ``g`` is strongly monotone
    (unique root) while the Jacobian of ``z + g(z)`` is ``I - A - nonlin *
    diag(sech^2 z)`` with spectral radius ``top - 1 (+ nonlin) > 1``: the plain
    iteration diverges, a root-finder must not.
    """

    def __init__(self, batch=3, dim=8, top=3.0, nonlin=0.0, seed=2, dtype=F64):
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=dtype))
        eig = torch.linspace(0.5, top, dim, dtype=dtype)
        self.A = q @ torch.diag_embed(eig.expand(batch, dim)) @ q.transpose(1, 2)
        self.b = 2 * torch.randn(batch, dim, generator=gen, dtype=dtype)
        self.nonlin = nonlin
        self.z0 = torch.zeros(batch, dim, dtype=dtype)

    def g(self, z, idx=slice(None)):
        return self.b[idx] - (self.A[idx] @ z[:, :, None]).squeeze(2) - self.nonlin * torch.tanh(z)

    def f_for(self, idx):
        return lambda z: z + self.g(z, idx)

    @property
    def f(self):
        return self.f_for(slice(None))

    def root(self) -> torch.Tensor:
        """Newton's method with the exact Jacobian (quadratic convergence, float64)."""
        z = torch.linalg.solve(self.A, self.b)
        for _ in range(50):
            jac = -self.A - self.nonlin * torch.diag_embed(1 - torch.tanh(z) ** 2)
            z = z - torch.linalg.solve(jac, self.g(z))
        return z


class Counting:
    """Wraps f; counts calls and records the inputs it was given."""

    def __init__(self, f):
        self.f, self.calls, self.inputs = f, 0, []

    def __call__(self, z):
        self.calls += 1
        self.inputs.append(z.clone() if isinstance(z, torch.Tensor) else tuple(t.clone() for t in z))
        return self.f(z)


def state_tensors(state) -> list[torch.Tensor]:
    """The tensors a solver state holds (dataclass fields, recursively; views excluded)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for v in state for t in state_tensors(v)]
    if dataclasses.is_dataclass(state):
        return [t for fld in dataclasses.fields(state) if fld.init for t in state_tensors(getattr(state, fld.name))]
    return []


class Spy(Solver):
    """Delegates to a solver and records what the loop hands it (dtypes, state shapes)."""

    name = "spy"

    def __init__(self, inner: Solver):
        self.inner, self.dtypes, self.state_shapes, self.steps = inner, set(), set(), 0

    def _record(self, state, z):
        self.dtypes.add(z.dtype)
        tensors = state_tensors(state)
        self.state_shapes.add(tuple(tuple(t.shape) for t in tensors))
        self.state_bytes = sum(t.numel() * t.element_size() for t in tensors)

    def init(self, it):
        state = self.inner.init(it)
        self._record(state, it.z)
        return state

    def step(self, state, it, active, evaluate):
        self.steps += 1
        state, z, fz, g = self.inner.step(state, it, active, evaluate)
        self._record(state, z)
        return state, z, fz, g


# ----------------------------------------------------------------------------
# Closed forms.

@solver_param
def test_affine_contraction_matches_linear_solve(solver):
    prob = Affine()
    res = solve(prob.f, prob.z0, solver=solver, tol=1e-11, max_iter=400)
    assert res.converged.all(), res.residual
    torch.testing.assert_close(res.z, prob.z_star, rtol=0, atol=1e-9)
    # The reported residual is that of the returned z.
    torch.testing.assert_close(res.residual, residual(res.z, prob.f(res.z), "rel"), rtol=1e-12, atol=0)
    assert (res.residual <= 1e-11).all()


@solver_param
def test_cos_fixed_point(solver):
    z0 = torch.tensor([[0.0], [1.0], [-2.0]], dtype=F64)
    res = solve(torch.cos, z0, solver=solver, tol=1e-12, max_iter=200)
    assert res.converged.all()
    torch.testing.assert_close(res.z, torch.full_like(z0, COS_FIXED_POINT), rtol=0, atol=1e-11)


@solver_param
def test_abs_stop_mode(solver):
    prob = Affine()
    res = solve(prob.f, prob.z0, solver=solver, tol=1e-10, max_iter=400, stop_mode="abs")
    assert res.stop_mode == "abs" and res.converged.all()
    fz = prob.f(res.z)
    torch.testing.assert_close(res.residual, torch.linalg.vector_norm(fz - res.z, dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.z, prob.z_star, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------
# SciPy on the same problems: compare fixed points, not step counts.

def _scipy_solution(method: str, f_np, x0: np.ndarray) -> np.ndarray:
    if method == "iteration":
        return scipy.optimize.fixed_point(f_np, x0, method="iteration", xtol=1e-13, maxiter=5000)
    sol = scipy.optimize.root(lambda x: f_np(x) - x, x0, method=method,
                              options={"fatol": 1e-13, "maxiter": 2000})
    assert sol.success, sol.message
    return sol.x


@pytest.mark.parametrize("solver,method", [("anderson", "anderson"), ("broyden", "broyden1"),
                                           (Broyden(line_search=True), "broyden1"),
                                           ("fixed_point", "iteration")], ids=_id)
@pytest.mark.parametrize("problem", [Affine, TanhNet])
def test_matches_scipy(solver, method, problem):
    prob = problem()
    res = solve(prob.f, prob.z0, solver=solver, tol=1e-12, max_iter=500)
    assert res.converged.all()
    for b in range(prob.z0.shape[0]):
        f_b = prob.f_for([b])

        def f_np(x, f_b=f_b):
            return f_b(torch.from_numpy(np.asarray(x, dtype=np.float64))[None])[0].numpy()

        ref = _scipy_solution(method, f_np, prob.z0[b].numpy())
        np.testing.assert_allclose(res.z[b].numpy(), ref, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------
# The per-sample contract, over every solver.

def _solve_each(prob, solver, **budget) -> list[SolverResult]:
    return [solve(prob.f_for([b]), prob.z0[b:b + 1], solver=solver, **budget)
            for b in range(prob.z0.shape[0])]


@solver_param
@pytest.mark.parametrize("problem", [TanhNet, lambda: SPDRoot(batch=4, top=4.0, nonlin=1.0)],
                         ids=["contraction", "root"])
def test_batch_equals_each_sample_alone(solver, problem):
    prob = problem()
    # max_iter is short enough that some samples stop unconverged.
    budget = dict(tol=1e-10, max_iter=25)
    batch = solve(prob.f, prob.z0, solver=solver, **budget)
    alone = _solve_each(prob, solver, **budget)
    assert torch.equal(batch.nstep, torch.cat([r.nstep for r in alone]))
    assert torch.equal(batch.converged, torch.cat([r.converged for r in alone]))
    assert torch.equal(batch.best_step, torch.cat([r.best_step for r in alone]))
    torch.testing.assert_close(batch.z, torch.cat([r.z for r in alone]), rtol=0, atol=1e-12)
    torch.testing.assert_close(batch.residual, torch.cat([r.residual for r in alone]), rtol=1e-9, atol=1e-15)
    assert batch.trace.shape == (batch.n_iter, prob.z0.shape[0])


def test_batch_test_is_not_vacuous():
    """The problems above give samples that stop at different steps, some unconverged."""
    for prob in (TanhNet(), SPDRoot(batch=4, top=4.0, nonlin=1.0)):
        res = solve(prob.f, prob.z0, solver="fixed_point", tol=1e-10, max_iter=25)
        assert len(set(res.nstep.tolist())) > 1 or not res.converged.all()
    res = solve(TanhNet().f, TanhNet().z0, solver="anderson", tol=1e-10, max_iter=25)
    assert len(set(res.nstep.tolist())) > 1


@solver_param
def test_nstep_counts_every_call_of_f(solver):
    # A root problem on which Broyden's full step often fails the Armijo test,
    # so the line search really spends extra calls (see the next test).
    prob = SPDRoot(batch=3, top=6.0, nonlin=2.0)
    for b in range(3):
        counting = Counting(prob.f_for([b]))
        res = solve(counting, prob.z0[b:b + 1], solver=solver, tol=1e-10, max_iter=40)
        assert res.nstep.tolist() == [counting.calls]
        assert res.nstep.dtype == torch.int64


def test_line_search_backtracks_on_the_counting_problem():
    """The counting test above does exercise the line search: trials are rejected and halved."""

    class TrialSpy(Spy):
        def step(self, state, it, active, evaluate):
            state, z, fz, g = super().step(state, it, active, evaluate)
            self.max_trials = max(getattr(self, "max_trials", 0), int(state.search.trials.max()))
            return state, z, fz, g

    prob = SPDRoot(batch=3, top=6.0, nonlin=2.0)
    spy = TrialSpy(Broyden(line_search=True))
    res = solve(prob.f, prob.z0, solver=spy, tol=1e-10, max_iter=100)
    assert spy.max_trials > 1
    assert res.converged.all()


@solver_param
def test_converged_sample_stops_changing(solver):
    prob = TanhNet(rho=(0.1, 0.9, 0.9, 0.95))
    counting = Counting(prob.f)
    res = solve(counting, prob.z0, solver=solver, tol=1e-8, max_iter=200)
    assert res.converged.all()
    assert int(res.nstep.max()) == counting.calls == res.n_iter  # the last sample is charged every call
    first = int(res.nstep[0])
    assert first < int(res.nstep.max()), "sample 0 must converge before the others"
    # Sample 0 is charged nstep[0] calls; every later call sees the same z, the one returned.
    later = [z[0] for z in counting.inputs[first - 1:]]
    assert len(later) > 1
    for z in later:
        assert torch.equal(z, later[0])
    assert torch.equal(res.z[0], later[0])


@solver_param
def test_returns_best_iterate(solver):
    """No iterate passes the test: the one with the smallest ||f(z) - z|| is returned, and its residual."""
    # Divergent plain iteration: FixedPoint's best iterate is z0 itself.
    prob = SPDRoot(top=3.0)
    calls = Counting(prob.f)
    res = solve(calls, prob.z0, solver=solver, tol=1e-14, max_iter=6)
    fz = prob.f(res.z)
    torch.testing.assert_close(res.residual, residual(res.z, fz, "rel"), rtol=1e-12, atol=0)
    iterates = torch.stack(calls.inputs)  # (n_iter, B, D): every point f was called at
    abs_res = torch.stack([residual(z, prob.f(z), "abs") for z in calls.inputs])
    assert torch.equal(res.best_step, abs_res.argmin(dim=0))
    for b in range(3):
        assert torch.equal(res.z[b], iterates[res.best_step[b], b])
    assert (res.best_step < res.n_iter).all() and not res.converged.any()
    if get_solver(solver).name == "fixed_point" and get_solver(solver).damping == 1.0:
        assert torch.equal(res.best_step, torch.zeros(3, dtype=torch.int64))
        assert torch.equal(res.z, prob.z0)
        assert res.trace[-1].min() > res.trace[0].max()  # the last iterate is worse


@pytest.mark.parametrize("solver", ["fixed_point", FixedPoint(damping=0.7)], ids=_id)
def test_diverging_rel_solve_never_returns_its_most_diverged_iterate(solver):
    """f(z) = 1.5 z + x: the relative residual of the run-away iterate falls towards 1/3 while
    ||f(z) - z|| grows; ordering by the relative residual would return the last (worst) iterate."""
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25]], dtype=F64)
    res = solve(lambda z: 1.5 * z + x, torch.zeros(2, 2, dtype=F64), solver=solver, tol=1e-6, max_iter=50)
    assert not res.converged.any()
    assert res.trace[-1].max() < res.trace[0].min()  # the relative residual did fall...
    assert torch.equal(res.best_step, torch.zeros(2, dtype=torch.int64))  # ...but z0 is returned
    assert torch.equal(res.z, torch.zeros(2, 2, dtype=F64))
    torch.testing.assert_close(res.residual, torch.ones(2, dtype=F64))  # ||x|| / ||x||: honest


@solver_param
def test_tuple_state_with_different_trailing_shapes(solver):
    gen = torch.Generator().manual_seed(3)
    batch = 3
    h0 = torch.zeros(batch, 2, 3, dtype=F64)
    c0 = torch.zeros(batch, 5, dtype=F64)
    W = 0.4 * torch.randn(11, 11, generator=gen, dtype=F64) / math.sqrt(11)
    u = torch.randn(batch, 11, generator=gen, dtype=F64)

    def f(state):
        h, c = state
        flat = torch.cat([h.reshape(batch, 6), c], dim=1)
        out = torch.tanh(flat @ W.T + u)
        return out[:, :6].reshape(batch, 2, 3), out[:, 6:]

    res = solve(f, (h0, c0), solver=solver, tol=1e-12, max_iter=300)
    assert isinstance(res.z, tuple) and len(res.z) == 2
    assert res.z[0].shape == (batch, 2, 3) and res.z[1].shape == (batch, 5)
    assert res.converged.all()

    def flat_f(z):
        return torch.tanh(z @ W.T + u)

    ref = solve(flat_f, torch.zeros(batch, 11, dtype=F64), solver=solver, tol=1e-12, max_iter=300)
    torch.testing.assert_close(torch.cat([res.z[0].reshape(batch, 6), res.z[1]], dim=1), ref.z,
                               rtol=0, atol=1e-12)
    assert torch.equal(res.nstep, ref.nstep)


@solver_param
def test_bf16_f_keeps_float32_state(solver):
    prob = TanhNet(batch=3, dim=16, rho=0.5, seed=4)
    W, u = prob.W.to(torch.bfloat16), prob.u.to(torch.bfloat16)

    def f_bf16(z):
        assert z.dtype == torch.bfloat16
        return torch.tanh((W @ z[:, :, None]).squeeze(2) + u)

    exact = solve(prob.f, prob.z0, solver="anderson", tol=1e-13, max_iter=200).z
    spy = Spy(get_solver(solver))
    res = solve(f_bf16, prob.z0.to(torch.bfloat16), solver=spy, tol=1e-3, max_iter=40)
    assert res.z.dtype == torch.bfloat16
    assert spy.dtypes == {torch.float32}
    assert res.residual.dtype == torch.float32 and res.trace.dtype == torch.float32
    # As accurate as bf16 allows: f itself rounds to bf16 (half an ulp), and a
    # contraction of rate 0.5 at most doubles that; allow a few ulps in all.
    eps = torch.finfo(torch.bfloat16).eps
    err = (res.z.double() - exact).abs().max()
    assert err <= 4 * eps * exact.abs().max(), err
    # The residual reported is that of the returned (bf16) z.
    fz = f_bf16(res.z).float()
    torch.testing.assert_close(res.residual, residual(res.z.float(), fz, "rel"), rtol=1e-5, atol=0)


def test_float32_z0_stays_float32():
    prob = Affine(dtype=torch.float32)
    res = solve(prob.f, prob.z0, tol=1e-5)
    assert res.z.dtype == torch.float32 and res.residual.dtype == torch.float32


# ----------------------------------------------------------------------------
# The relative residual's guard at ||f(z)|| = 0.

@solver_param
def test_rel_guard_never_calls_a_non_fixed_point_converged(solver):
    zero = lambda z: torch.zeros_like(z)  # noqa: E731 - the one fixed point is z = 0
    # f(z0) = 0 at a tiny z0 != 0: an epsilon in the denominator would call this converged.
    z0 = torch.full((2, 3), 1e-12, dtype=F64)
    res = solve(zero, z0, solver=solver, tol=0.5, max_iter=1)
    assert not res.converged.any()
    assert torch.isinf(res.residual).all()
    res = solve(zero, z0, solver=solver, tol=1e-6, max_iter=5)
    algo = get_solver(solver)
    if getattr(algo, "damping", 1.0) == 1.0 and getattr(algo, "beta", 1.0) == 1.0:
        # A full first step lands on the true fixed point 0, which is reported.
        assert res.converged.all()
        assert torch.equal(res.z, torch.zeros_like(z0))
        assert torch.equal(res.residual, torch.zeros(2, dtype=F64))
    else:
        # Damped steps shrink z geometrically but never reach 0: never converged.
        assert not res.converged.any() and (res.z != 0).all()
        assert torch.isinf(res.trace).all()


@solver_param
def test_rel_guard_zero_is_a_fixed_point(solver):
    res = solve(lambda z: torch.zeros_like(z), torch.zeros(2, 3, dtype=F64), solver=solver, tol=1e-6)
    assert res.converged.all()
    assert res.nstep.tolist() == [1, 1] and res.n_iter == 1
    assert torch.equal(res.residual, torch.zeros(2, dtype=F64))


def test_residual_definition():
    z = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [1e-150, 0.0], [1.0, 2.0], [1.0, 2.0]], dtype=F64)
    fz = torch.tensor([[0.0, 4.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, math.inf], [math.nan, 2.0]],
                      dtype=F64)
    absolute = residual(z, fz, "abs")
    torch.testing.assert_close(absolute[:4], torch.tensor([3.0, 1.0, 0.0, 1e-150], dtype=F64))
    assert absolute[4] == math.inf and math.isnan(absolute[5])
    rel = residual(z, fz, "rel")
    assert rel[0] == 0.75 and rel[1] == math.inf and rel[2] == 0 and rel[3] == math.inf
    assert math.isnan(rel[4]) and math.isnan(rel[5])  # non-finite f(z) is NaN, never the guard's inf


# ----------------------------------------------------------------------------
# Root-finding where the plain iteration diverges.

@pytest.mark.parametrize("nonlin", [0.0, 1.0], ids=["linear", "nonlinear"])
def test_accelerated_solvers_find_roots_plain_iteration_cannot(nonlin):
    prob = SPDRoot(batch=3, top=3.0, nonlin=nonlin)
    # The plain iteration's Jacobian I - A - nonlin*diag(sech^2) has spectral radius > 1.
    jac = torch.eye(8, dtype=F64) - prob.A
    assert torch.linalg.eigvals(jac).abs().max() > 1.9
    root = prob.root()
    for solver in ACCELERATED:
        res = solve(prob.f, prob.z0, solver=solver, tol=1e-10, max_iter=100)
        assert res.converged.all(), (solver, res.residual)
        torch.testing.assert_close(res.z, root, rtol=0, atol=1e-8)
    res = solve(prob.f, prob.z0, solver="fixed_point", tol=1e-10, max_iter=100)
    assert not res.converged.any()


# ----------------------------------------------------------------------------
# Anderson's least-squares system when it is singular or ill-conditioned.

@pytest.mark.parametrize("lam", [1e-4, 0.0])
def test_anderson_constant_residual_zero_gram(lam):
    """f(z) = z + c has no fixed point; g is constant, every dG is 0 (zero Gram matrix)."""
    c = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=F64)
    res = solve(lambda z: z + c, torch.zeros(2, 2, dtype=F64), solver=Anderson(m=3, lam=lam), tol=1e-8,
                max_iter=12)
    assert not res.converged.any()
    assert torch.isfinite(res.z).all() and torch.isfinite(res.trace).all()


@pytest.mark.parametrize("lam", [1e-4, 0.0])
def test_anderson_rank_one_history(lam):
    """In one dimension every history column is parallel: the Gram matrix has rank one."""
    z0 = torch.tensor([[0.0], [2.0]], dtype=F64)
    res = solve(torch.cos, z0, solver=Anderson(m=5, lam=lam), tol=1e-12, max_iter=100)
    assert res.converged.all()
    torch.testing.assert_close(res.z, torch.full_like(z0, COS_FIXED_POINT), rtol=0, atol=1e-11)


def test_anderson_is_scale_invariant():
    """The ridge is relative: one problem at scales 1e-100, 1 and 1e100 takes the same steps.

    An absolute ridge would swamp the Gram matrix of the 1e-100 copy (plain
    mixing, many more steps) and vanish for the 1e100 copy.
    """
    prob = Affine(batch=1, rho=0.9)
    scales = torch.tensor([1e-100, 1.0, 1e100], dtype=F64)[:, None]
    A, c = prob.A[0], prob.c[0]

    def f(z):
        return (z / scales) @ A.T * scales + c * scales

    res = solve(f, torch.zeros(3, 6, dtype=F64), solver=Anderson(lam=1e-4), tol=1e-10, max_iter=100)
    assert res.converged.all()
    assert len(set(res.nstep.tolist())) == 1
    torch.testing.assert_close(res.z / scales, prob.z_star.expand(3, 6), rtol=0, atol=1e-9)


def test_anderson_falls_back_when_the_solve_fails(monkeypatch):
    prob = Affine()
    normal = solve(prob.f, prob.z0, solver="anderson", tol=1e-10, max_iter=300)
    real = torch.linalg.solve_ex
    calls = []

    def failing(A, B, *args, **kwargs):
        x, info = real(A, B, *args, **kwargs)
        calls.append(1)
        info = info.clone()
        info[1] = 2  # "singular" (LAPACK's U(i,i) = 0)
        x = x.clone()
        x[2] = float("nan")  # a non-finite gamma
        return x, info

    monkeypatch.setattr(torch.linalg, "solve_ex", failing)
    res = solve(prob.f, prob.z0, solver="anderson", tol=1e-10, max_iter=300)
    assert calls, "the test must reach the least-squares solve"
    # Samples 1 and 2 fall back to plain mixing steps: still a contraction, still converged.
    assert res.converged.all()
    torch.testing.assert_close(res.z, prob.z_star, rtol=0, atol=1e-9)
    assert (res.nstep[1:3] > normal.nstep[1:3]).all()
    # Other samples are untouched by their neighbours' failures.
    for b in (0, 3):
        assert res.nstep[b] == normal.nstep[b]
        torch.testing.assert_close(res.z[b], normal.z[b], rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------
# Broyden: fixed-size memory.

def test_broyden_memory_does_not_grow_with_max_iter():
    prob = TanhNet(batch=2, dim=6, rho=0.99)
    sizes = {}
    for max_iter in (10, 1000):
        spy = Spy(Broyden(memory=4))
        # tol unreachably small so the longer run runs long.
        solve(prob.f, prob.z0, solver=spy, tol=1e-300, max_iter=max_iter, stop_mode="abs")
        sizes[max_iter] = (spy.state_shapes, spy.state_bytes, spy.steps)
    assert sizes[10][2] < sizes[1000][2]
    assert sizes[10][0] == sizes[1000][0] and sizes[10][1] == sizes[1000][1]
    # Broyden's docstring: (2 memory + 11) B D + 6 memory B float64 numbers (terms, work vectors, mask).
    batch, dim, memory = 2, 6, 4
    assert sizes[10][1] == ((2 * memory + 11) * batch * dim + 6 * memory * batch) * 8


def test_broyden_restarts_when_memory_is_full():
    """Memory wraps many times on a hard contraction and Broyden still converges fast.

    Overwriting only the oldest rank-one term (a ring) breaks the secant
    equations of the others; that version stalls here at a residual ~1e-2.
    """
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(40, 40, generator=gen, dtype=F64)
    W = (a + a.T) / 2
    W = W * (0.99 / torch.linalg.eigvalsh(W).abs().max())
    u = 0.05 * torch.randn(3, 40, generator=gen, dtype=F64)
    f = lambda z: torch.tanh(z @ W + u)  # noqa: E731
    z0 = torch.zeros(3, 40, dtype=F64)
    plain = solve(f, z0, solver="fixed_point", tol=1e-8, max_iter=2000)
    res = solve(f, z0, solver=Broyden(memory=5), tol=1e-8, max_iter=2000)
    assert plain.converged.all() and res.converged.all()
    assert res.n_iter > 4 * 5  # the memory filled and restarted several times
    assert (4 * res.nstep < plain.nstep).all()
    torch.testing.assert_close(res.z, plain.z, rtol=0, atol=1e-6)  # error <= residual / (1 - 0.99)


def test_broyden_line_search_with_one_trial_is_plain_broyden():
    """max_ls_iter=1 accepts every step: the line-search bookkeeping must reduce to plain Broyden."""
    prob = TanhNet(rho=(0.5, 0.8, 0.9, 0.95))
    plain = solve(prob.f, prob.z0, solver=Broyden(memory=4), tol=1e-11, max_iter=100)
    one = solve(prob.f, prob.z0, solver=Broyden(memory=4, line_search=True, max_ls_iter=1), tol=1e-11,
                max_iter=100)
    assert plain.converged.all() and one.converged.all()
    assert torch.equal(plain.nstep, one.nstep)
    torch.testing.assert_close(one.z, plain.z, rtol=0, atol=1e-10)


def test_broyden_linear_finite_termination():
    """On a linear g, Broyden's good method needs at most 2n steps (Gay, 1979) with enough memory."""
    prob = SPDRoot(batch=3, dim=8, top=3.0)
    res = solve(prob.f, prob.z0, solver=Broyden(memory=20), tol=1e-10, max_iter=100)
    assert res.converged.all()
    assert res.n_iter <= 2 * 8 + 2  # f(z0) plus 2n steps, one spare for rounding


# ----------------------------------------------------------------------------
# One host sync per iteration (the stop test), none hidden in the solvers.

@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden", Broyden(memory=2),
                                    Broyden(line_search=True), FixedPoint(damping=0.5)], ids=_id)
def test_one_host_sync_per_iteration(solver, monkeypatch):
    prob = TanhNet()
    syncs = []
    for method in ("__bool__", "item", "tolist", "__int__", "__float__"):
        real = getattr(torch.Tensor, method)

        def counted(self, *args, _real=real, _name=method, **kwargs):
            syncs.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    # Sample 0 has no fixed point (f(z) = z + 1), so the loop runs all 30 iterations.
    def f(z):
        return torch.cat([z[:1] + 1, prob.f_for(slice(1, None))(z[1:])])

    res = solve(f, prob.z0, solver=solver, tol=1e-8, max_iter=30)
    monkeypatch.undo()
    assert res.n_iter == 30
    assert len(syncs) <= res.n_iter + 1, syncs


# ----------------------------------------------------------------------------
# Errors.

def test_non_finite_f_z0():
    def f(z):
        out = torch.cos(z)
        out[1, 0] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match=r"step 0 .*samples \[1\]") as err:
        solve(f, torch.zeros(3, 2, dtype=F64))
    assert err.value.step == 0 and err.value.samples == [1] and err.value.stage == "forward"
    assert err.value.result is None


@solver_param
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_later_keeps_best_finite_iterate(solver, bad):
    prob = TanhNet(rho=0.9)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = prob.f(z)
        if calls[0] >= 5:  # from step 4 on, for sample 2
            out[2] = bad
        return out

    with pytest.raises(NonFiniteError, match=r"step \d+ for samples \[2\]") as err:
        solve(f, prob.z0, solver=solver, tol=1e-14, max_iter=50)
    e = err.value
    assert e.samples == [2] and e.stage == "forward"
    partial = e.result
    assert isinstance(partial, SolverResult)
    assert torch.isfinite(partial.z).all() and torch.isfinite(partial.residual).all()
    assert e.step == partial.n_iter - 1 == 4
    # Sample 2 keeps its best iterate from before the bad step; the others
    # include the (finite) step at which sample 2 failed.
    before = solve(prob.f, prob.z0, solver=solver, tol=1e-14, max_iter=e.step)
    upto = solve(prob.f, prob.z0, solver=solver, tol=1e-14, max_iter=e.step + 1)
    for b, ref in ((0, upto), (1, upto), (2, before), (3, upto)):
        assert torch.equal(partial.z[b], ref.z[b])
        assert partial.residual[b] == ref.residual[b] and partial.best_step[b] == ref.best_step[b]


class _Overflowing(Solver):
    """Plain iteration whose iterate overflows to inf for sample 1 at step 2."""

    name = "overflowing"

    def init(self, it):
        return 0

    def step(self, state, it, active, evaluate):
        z_new = it.fz.clone()
        if state == 1:
            z_new[1] = math.inf
        fz = evaluate(z_new, active)
        return state + 1, z_new, fz, fz - z_new


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_non_finite_iterate_with_finite_f_is_an_error(stop_mode):
    """tanh(inf) = 1 is finite: the check must look at z too, or the best iterate is poisoned."""
    z0 = torch.full((3, 4), 0.5, dtype=F64)
    with pytest.raises(NonFiniteError, match=r"step 2 for samples \[1\]") as err:
        solve(torch.tanh, z0, solver=_Overflowing(), tol=1e-12, max_iter=10, stop_mode=stop_mode)
    assert torch.isfinite(err.value.result.z).all()
    assert err.value.result.best_step.tolist() == [2, 1, 2]


def test_non_finite_names_the_stage():
    with pytest.raises(NonFiniteError, match="backward") as err:
        solve(lambda z: z * float("inf"), torch.ones(1, 1), stage="backward")
    assert err.value.stage == "backward"


@pytest.mark.parametrize("f,shape", [
    (lambda z: z[:, :-1], r"\(3, 3\)"),
    (lambda z: z.transpose(1, 2), r"\(3, 4, 2\)"),  # same numel, other shape
    (lambda z: z.reshape(3, -1), r"\(3, 8\)"),
])
def test_wrong_shape_from_f(f, shape):
    z0 = torch.zeros(3, 2, 4) if "3, 4, 2" in shape or "3, 8" in shape else torch.zeros(3, 4)
    want = r"\(3, 2, 4\)" if z0.dim() == 3 else r"\(3, 4\)"
    with pytest.raises(ValueError, match=f"{shape}.*{want}"):
        solve(f, z0)


def test_wrong_dtype_from_f():
    with pytest.raises(ValueError, match=r"float32.*\(2, 3\).*float64.*\(2, 3\)"):
        solve(lambda z: z.float(), torch.zeros(2, 3, dtype=F64))


def test_wrong_structure_from_f():
    z0 = (torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"tuple of 2 tensors.*\(2, 3\), \(2, 4\)"):
        solve(lambda z: z[0], z0)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), \(2, 3\) but z0 has shape \(2, 3\), \(2, 4\)"):
        solve(lambda z: (z[0], z[0]), z0)


def test_shape_checked_on_every_call():
    calls = [0]

    def f(z):
        calls[0] += 1
        return z[:, :2] if calls[0] == 3 else torch.cos(z)

    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        solve(f, torch.zeros(2, 3, dtype=F64), solver="fixed_point", tol=1e-12)


def test_unknown_solver_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="andersen.*anderson, broyden, fixed_point"):
        solve(torch.cos, torch.zeros(1, 1), solver="andersen")
    with pytest.raises(TypeError):
        solve(torch.cos, torch.zeros(1, 1), solver=3)


def test_registry():
    assert set(solver_names()) >= {"anderson", "broyden", "fixed_point"}
    assert get_solver("anderson") == Anderson()
    assert get_solver("broyden") == Broyden() and get_solver("fixed_point") == FixedPoint()
    solver = Anderson(m=3)
    assert get_solver(solver) is solver
    assert deq.solve is solve and deq.Anderson is Anderson


@pytest.mark.parametrize("build", [
    lambda: Anderson(mm=5), lambda: Broyden(memroy=5), lambda: FixedPoint(dampnig=0.5),
    lambda: solve(torch.cos, torch.zeros(1, 1), tols=1e-3),
    lambda: solve(torch.cos, torch.zeros(1, 1), max_iters=3),
    lambda: solve(torch.cos, torch.zeros(1, 1), "anderson"),  # options are keyword-only
])
def test_misspelt_options_are_type_errors(build):
    with pytest.raises(TypeError):
        build()


@pytest.mark.parametrize("build,match", [
    (lambda: Anderson(m=0), "m must"), (lambda: Anderson(m=2.5), "m must"),
    (lambda: Anderson(lam=-1.0), "lam must"), (lambda: Anderson(beta=0.0), "beta must"),
    (lambda: FixedPoint(damping=0.0), "damping"), (lambda: FixedPoint(damping=1.5), "damping"),
    (lambda: FixedPoint(damping=float("nan")), "damping"),
    (lambda: Broyden(memory=0), "memory"), (lambda: Broyden(max_ls_iter=0), "max_ls_iter"),
    (lambda: solve(torch.cos, torch.zeros(1, 1), tol=0.0), "tol"),
    (lambda: solve(torch.cos, torch.zeros(1, 1), tol=-1e-3), "tol"),
    (lambda: solve(torch.cos, torch.zeros(1, 1), tol=float("nan")), "tol"),
    (lambda: solve(torch.cos, torch.zeros(1, 1), max_iter=0), "max_iter"),
    (lambda: solve(torch.cos, torch.zeros(1, 1), max_iter=2.0), "max_iter"),
    (lambda: solve(torch.cos, torch.zeros(1, 1), stop_mode="max"), "stop_mode.*abs, rel"),
    (lambda: solve(torch.cos, (torch.zeros(2, 1), torch.zeros(3, 1))), "batch dimension"),
])
def test_invalid_values_are_value_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_non_convergence_is_not_an_error(recwarn):
    prob = SPDRoot()
    res = solve(prob.f, prob.z0, solver="fixed_point", tol=1e-8, max_iter=5)
    assert not res.converged.any() and res.nstep.tolist() == [5, 5, 5] and res.n_iter == 5
    assert len(recwarn) == 0


def test_result_is_frozen_and_summarises():
    res = solve(torch.cos, torch.zeros(2, 1, dtype=F64), tol=1e-8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.z = None
    stats = res.summary()
    assert stats["converged_frac"] == 1.0 and stats["nstep_max"] == res.nstep.max().item()
    assert res.solver == "anderson" and res.tol == 1e-8 and res.backward is None


def test_z0_is_not_modified_and_result_does_not_alias_it():
    z0 = torch.zeros(2, 3, dtype=F64)
    res = solve(torch.cos, z0, max_iter=1)
    assert torch.equal(z0, torch.zeros(2, 3, dtype=F64))
    res.z.add_(1.0)
    assert torch.equal(z0, torch.zeros(2, 3, dtype=F64))


def test_anderson_restarts_instead_of_cycling_on_a_transformer_block():
    """Undamped Anderson used to cycle at a relative residual of ~4e-2 on one sample of
    this tiny DEQ-Transformer at init (plain iteration and Broyden converge); with
    restarts on stagnation every sample reaches the tolerance."""
    from deq.data import CopyMemory
    from deq.models.transformer import DEQTransformerLM

    torch.manual_seed(0)
    model = DEQTransformerLM(n_token=10, d_model=16, n_head=2, d_head=8, d_inner=32, init_std=0.02).double()
    x, y = CopyMemory(blank_len=3, n_symbols_to_copy=2, batch_size=4, n_batches=1, seed=0).batch(0)
    model.deq.solver, model.deq.tol, model.deq.max_iter = deq.Anderson(m=5), 1e-11, 200
    model.deq.on_nonconvergence = "raise"
    with torch.no_grad():
        model(x, y)
    assert model.deq.last_result.converged.all()


# ----------------------------------------------------------------------------
# The stop test ||f(z) - z|| <= atol + rtol ||f(z)||.

def _scipy_F(z):
    """SciPy's nonlin test problem F (test_nonlin.py): root x = 0 of -d x - c (x.x) x."""
    d = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5], dtype=z.dtype)
    return -d * z - 0.01 * (z * z).sum(dim=1, keepdim=True) * z


def _scipy_F2(z):
    """SciPy's nonlin test problem F2: root x = 0 of x."""
    return z


@pytest.mark.parametrize("problem,x0", [(_scipy_F, [1.0] * 5), (_scipy_F2, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])],
                         ids=["F", "F2"])
@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_root_at_zero_converges_with_atol_and_in_abs_mode(problem, x0, solver):
    """z* = 0: ||f(z)|| -> ||f(z*)|| = 0 with ||g||, so the plain relative test has no scale to reach."""
    z0 = torch.tensor([x0], dtype=F64)
    f = lambda z: z + problem(z)  # noqa: E731 - the root of problem() as a fixed point
    absolute = solve(f, z0, solver=solver, tol=1e-9, max_iter=200, stop_mode="abs")
    mixed = solve(f, z0, solver=solver, tol=1e-6, atol=1e-9, max_iter=200, stop_mode="rel")
    for res in (absolute, mixed):
        assert res.converged.all() and res.n_iter < 60, (res.n_iter, res.residual)
        assert float(torch.linalg.vector_norm(problem(res.z))) <= 1e-9
    assert mixed.atol == 1e-9 and absolute.atol == 0.0
    plain = solve(f, z0, solver=solver, tol=1e-6, max_iter=200, stop_mode="rel")
    if not plain.converged.all():  # the ill-posed case the atol term is for
        assert plain.n_iter == 200


@pytest.mark.parametrize("atol", [0.0, 0.05])
def test_each_sample_stops_at_the_first_iterate_that_passes_the_test(atol):
    prob = TanhNet(rho=(0.3, 0.6, 0.9, 0.95))
    calls = Counting(prob.f)
    tol = 1e-3
    res = solve(calls, prob.z0, solver="fixed_point", tol=tol, atol=atol, max_iter=300)
    for b in range(4):
        passed = [float(torch.linalg.vector_norm(prob.f(z)[b] - z[b])) <=
                  atol + tol * float(torch.linalg.vector_norm(prob.f(z)[b])) for z in calls.inputs]
        first = passed.index(True)
        assert res.nstep[b] == first + 1 and res.best_step[b] == first and res.converged[b]
    plain = solve(prob.f, prob.z0, solver="fixed_point", tol=tol, max_iter=300)
    if atol:
        assert (res.nstep < plain.nstep).any()  # the atol term stops some samples earlier
    else:
        assert torch.equal(res.nstep, plain.nstep)


def test_converged_with_atol_may_report_a_relative_residual_above_tol():
    """Reported: the relative residual; converged: the atol + rtol test. Both are honest."""
    res = solve(lambda z: 0.5 * z, torch.ones(1, 3, dtype=F64), solver="fixed_point", tol=1e-3, atol=1e-4,
                max_iter=100)
    assert res.converged.all()
    assert float(res.residual) == 1.0  # ||0.5 z - z|| / ||0.5 z|| = 1 at every z != 0
    z = res.z
    assert float(torch.linalg.vector_norm(0.5 * z - z)) <= 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(atol=-1e-3), "atol"), (dict(atol=float("nan")), "atol"), (dict(atol=float("inf")), "atol"),
    (dict(atol=1e-6, stop_mode="abs"), "atol.*stop_mode='rel'"),
])
def test_invalid_atol(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve(torch.cos, torch.zeros(1, 1), **kwargs)


# ----------------------------------------------------------------------------
# Shapes, layouts and magnitudes that used to break the loop.

@solver_param
def test_empty_batch_returns_an_empty_result_without_calling_f(solver):
    calls = Counting(torch.cos)
    for z0 in (torch.zeros(0, 3, dtype=F64), (torch.zeros(0, 2, 2, dtype=F64), torch.zeros(0, 5, dtype=F64))):
        res = solve(calls, z0, solver=solver)
        assert calls.calls == 0
        parts = res.z if isinstance(res.z, tuple) else (res.z,)
        assert [p.shape for p in parts] == [p.shape for p in (z0 if isinstance(z0, tuple) else (z0,))]
        assert res.nstep.shape == res.residual.shape == res.converged.shape == (0,) and res.n_iter == 0
        assert res.summary()["converged_frac"] != res.summary()["converged_frac"]  # NaN: no samples


@solver_param
def test_tuple_parts_reach_f_contiguous(solver):
    """f may .view() its parts, as it could view the contiguous parts of z0."""
    def f(state):
        h, c = state
        return torch.tanh(0.5 * h.view(h.shape[0], -1)).view(h.shape), torch.cos(c.view(-1)).view(c.shape)

    z0 = (torch.zeros(3, 2, 4, dtype=F64), torch.zeros(3, 5, dtype=F64))
    res = solve(f, z0, solver=solver, tol=1e-10, max_iter=100)
    assert res.converged.all() and all(p.is_contiguous() for p in res.z)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_channels_last_z0_stays_channels_last(solver):
    seen = []
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    torch.nn.init.normal_(conv.weight, std=0.05)

    def f(z):
        seen.append(z.is_contiguous(memory_format=torch.channels_last))
        with torch.no_grad():
            return torch.tanh(conv(z) + 0.3)

    z0 = torch.zeros(2, 3, 5, 4, dtype=F64).to(memory_format=torch.channels_last)
    res = solve(f, z0, solver=solver, tol=1e-10, max_iter=100)
    assert res.converged.all() and all(seen)
    assert res.z.is_contiguous(memory_format=torch.channels_last)
    plain = solve(f, z0.contiguous(), solver=solver, tol=1e-10, max_iter=100)
    torch.testing.assert_close(res.z, plain.z, rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
def test_large_finite_float32_states_are_not_reported_non_finite(solver, stop_mode):
    """Entries near 1e30: their squares overflow float32 (3.4e38), their norms do not.

    (Broyden forms inner products of the state itself; see its docstring for the limit.)"""
    scale = 1e30
    c = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]]) * scale
    tol = 1e-5 if stop_mode == "rel" else 1e-5 * scale
    res = solve(lambda z: 0.5 * z + c, torch.zeros(2, 3), solver=solver, tol=tol, max_iter=200,
                stop_mode=stop_mode)
    assert res.converged.all() and torch.isfinite(res.residual).all()
    torch.testing.assert_close(res.z, 2 * c, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------
# Mixed precision: the solver under autocast keeps float32 state.

@solver_param
def test_solvers_under_cpu_bf16_autocast_keep_float32_state(solver):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
    x = torch.randn(3, 16)
    dtypes = set()

    def f(z):
        dtypes.add(z.dtype)
        return torch.tanh(lin(z) + x)  # lin(z) is bf16 under autocast; + x promotes to float32

    def f_bf16(z):
        return lin(z)  # stays bf16

    spy = Spy(get_solver(solver))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = solve(f, torch.zeros(3, 16), solver=spy, tol=1e-2, max_iter=60)
        res_bf16 = solve(f_bf16, torch.zeros(3, 16), solver=solver, tol=1e-2, max_iter=60)
    assert spy.dtypes == {torch.float32} and dtypes == {torch.float32}
    assert res.z.dtype == torch.float32 and res.residual.dtype == torch.float32
    assert res.converged.all() and torch.isfinite(res.z).all()
    assert res_bf16.z.dtype == torch.float32 and torch.isfinite(res_bf16.z).all()
    exact = solve(f, torch.zeros(3, 16), solver="fixed_point", tol=1e-6, max_iter=200).z
    assert float((res.z - exact).abs().max()) < 0.05  # bf16 f: about 3 significant digits


def test_f_returning_another_dtype_is_still_an_error_without_autocast():
    with pytest.raises(ValueError, match="bfloat16"):
        solve(lambda z: z.to(torch.bfloat16), torch.zeros(2, 3))


# ----------------------------------------------------------------------------
# Active set (compact=...): f runs only on the rows still iterating.

def _rowwise(prob):
    """prob's f in the compact calling convention f(z, rows)."""
    return lambda z, rows: prob.f_for(slice(None) if rows is None else rows)(z)


def _assert_same_result(a: SolverResult, b: SolverResult, atol=1e-12):
    torch.testing.assert_close(a.z, b.z, rtol=0, atol=atol)
    assert torch.equal(a.nstep, b.nstep) and torch.equal(a.converged, b.converged)
    assert torch.equal(a.best_step, b.best_step)
    torch.testing.assert_close(a.residual, b.residual, rtol=1e-8, atol=1e-15)


@solver_param
@pytest.mark.parametrize("compact", [True, 1.0, 0.5])
def test_compact_equals_the_full_batch(solver, compact):
    prob = TanhNet(batch=6, rho=(0.1, 0.3, 0.6, 0.8, 0.9, 0.97), seed=3)
    full = solve(prob.f, prob.z0, solver=solver, tol=1e-9, max_iter=300)
    res = solve(_rowwise(prob), prob.z0, solver=solver, tol=1e-9, max_iter=300, compact=compact)
    _assert_same_result(res, full)
    torch.testing.assert_close(res.trace, full.trace, rtol=1e-8, atol=1e-15)
    assert full.rows == full.n_iter * 6
    assert res.rows < full.rows or (compact == 0.5 and res.rows == full.rows)  # 0.5 may never be reached


@solver_param
def test_compact_at_threshold_one_processes_exactly_the_rows_needed_alone(solver):
    prob = TanhNet(batch=6, rho=(0.1, 0.3, 0.6, 0.8, 0.9, 0.97), seed=3)
    alone = sum(int(r.nstep) for r in _solve_each(prob, solver, tol=1e-9, max_iter=300))
    res = solve(_rowwise(prob), prob.z0, solver=solver, tol=1e-9, max_iter=300, compact=1.0)
    assert res.rows == int(res.nstep.sum()) == alone


def test_compact_hands_f_the_batch_indices_of_its_rows():
    prob = Affine(batch=4, rho=(0.2, 0.9, 0.5, 0.95))
    seen = []

    def f(z, rows):
        seen.append(None if rows is None else rows.tolist())
        return prob.f_for(slice(None) if rows is None else rows)(z)

    res = solve(f, prob.z0, solver="fixed_point", tol=1e-10, max_iter=500, compact=1.0)
    torch.testing.assert_close(res.z, prob.z_star, rtol=0, atol=1e-8)
    assert seen[0] is None
    shrinking = [r for r in seen if r is not None]
    assert shrinking[-1] == [3] and all(r == sorted(r) for r in shrinking)
    assert all(set(b) <= set(a) for a, b in zip(shrinking, shrinking[1:]))


@solver_param
def test_compact_with_tuple_state_and_bf16(solver):
    gen = torch.Generator().manual_seed(4)
    W = 0.5 * torch.randn(4, 7, 7, generator=gen, dtype=F64) / math.sqrt(7)
    W[0] *= 0.1
    u = torch.randn(4, 7, generator=gen, dtype=F64)

    def f(z, rows=None):
        h, c = z
        sel = slice(None) if rows is None else rows
        flat = torch.cat([h.reshape(h.shape[0], 4), c], dim=1).double()
        out = torch.tanh((W[sel] @ flat[:, :, None]).squeeze(2) + u[sel])
        return out[:, :4].reshape(h.shape).to(h.dtype), out[:, 4:].to(c.dtype)

    for dtype in (F64, torch.bfloat16):
        z0 = (torch.zeros(4, 2, 2, dtype=dtype), torch.zeros(4, 3, dtype=dtype))
        tol = 1e-10 if dtype == F64 else 1e-2
        full = solve(lambda z: f(z), z0, solver=solver, tol=tol, max_iter=200)
        res = solve(f, z0, solver=solver, tol=tol, max_iter=200, compact=1.0)
        for a, b in zip(res.z, full.z):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9 if dtype == F64 else 0)
        assert torch.equal(res.nstep, full.nstep) and res.rows < full.rows


def test_compact_non_finite_names_the_batch_index_and_keeps_the_others_results():
    prob = TanhNet(batch=4, rho=(0.1, 0.2, 0.3, 0.97))
    calls = [0]

    def f(z, rows):
        calls[0] += 1
        out = prob.f_for(slice(None) if rows is None else rows)(z)
        if calls[0] == 20:  # samples 0-2 stop after 11-14 calls: only sample 3 is left
            out[-1] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match=r"samples \[3\]") as err:
        solve(f, prob.z0, solver="fixed_point", tol=1e-12, max_iter=300, compact=1.0)
    partial = err.value.result
    alone = solve(prob.f, prob.z0, solver="fixed_point", tol=1e-12, max_iter=300)
    assert err.value.samples == [3] and err.value.step == 19
    assert partial.converged[:3].all() and not partial.converged[3]
    torch.testing.assert_close(partial.z[:3], alone.z[:3], rtol=0, atol=1e-14)
    assert torch.isfinite(partial.z).all()


@pytest.mark.parametrize("compact", [0.0, -0.5, 1.5, "yes", None])
def test_invalid_compact(compact):
    with pytest.raises(ValueError, match="compact"):
        solve(lambda z, rows: torch.cos(z), torch.zeros(2, 1), compact=compact)


def test_compact_needs_a_selectable_solver_state():
    class DictState(Solver):
        name = "dict_state"

        def init(self, it):
            return {"prev": it.z}

        def step(self, state, it, active, evaluate):
            z = it.z.lerp(it.fz, active.to(it.z.dtype)[:, None])
            fz = evaluate(z, active)
            return state, z, fz, fz - z

    prob = TanhNet()
    with pytest.raises(TypeError, match="dataclass"):
        solve(_rowwise(prob), prob.z0, solver=DictState(), tol=1e-8, max_iter=200, compact=1.0)


# ----------------------------------------------------------------------------
# check_every=k: fewer host syncs, the same per-sample results.

def _count_syncs(monkeypatch) -> list[str]:
    syncs = []
    for method in ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero"):
        real = getattr(torch.Tensor, method)

        def counted(self, *args, _real=real, _name=method, **kwargs):
            syncs.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return syncs


@solver_param
@pytest.mark.parametrize("every", [2, 3, 7])
@pytest.mark.parametrize("compact", [False, 1.0])
def test_check_every_k_gives_the_same_per_sample_results(solver, every, compact, monkeypatch):
    prob = TanhNet(batch=6, rho=(0.1, 0.3, 0.6, 0.8, 0.9, 0.97), seed=3)
    f = _rowwise(prob) if compact else prob.f
    one = solve(f, prob.z0, solver=solver, tol=1e-9, max_iter=300, compact=compact)
    syncs = _count_syncs(monkeypatch)
    res = solve(f, prob.z0, solver=solver, tol=1e-9, max_iter=300, compact=compact, check_every=every)
    monkeypatch.undo()
    _assert_same_result(res, one, atol=0)
    assert one.n_iter <= res.n_iter < one.n_iter + every
    torch.testing.assert_close(res.trace[:one.n_iter], one.trace, rtol=0, atol=0)
    # One sync per check (two more at the end), plus what compaction needs at a check.
    checks = -(-res.n_iter // every) + 1
    assert len(syncs) <= (3 if compact else 1) * checks + 2, (len(syncs), res.n_iter, syncs)


def test_check_every_k_finds_a_non_finite_value_and_names_its_step():
    prob = TanhNet(rho=0.9)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = prob.f(z)
        if calls[0] >= 5:
            out[2] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match=r"step 4 for samples \[2\]") as err:
        solve(f, prob.z0, solver="anderson", tol=1e-14, max_iter=50, check_every=4)
    assert torch.isfinite(err.value.result.z).all()


@pytest.mark.parametrize("every", [0, -1, 1.5, "sometimes", True])
def test_invalid_check_every(every):
    with pytest.raises(ValueError, match="check_every"):
        solve(torch.cos, torch.zeros(2, 1), check_every=every)


@solver_param
@pytest.mark.parametrize("compact", [False, 1.0])
def test_adaptive_checks_give_the_same_results_with_fewer_syncs(solver, compact, monkeypatch):
    prob = TanhNet(batch=6, rho=(0.1, 0.3, 0.6, 0.8, 0.9, 0.97), seed=3)
    f = _rowwise(prob) if compact else prob.f
    one = solve(f, prob.z0, solver=solver, tol=1e-9, max_iter=300, compact=compact)
    syncs = _count_syncs(monkeypatch)
    res = solve(f, prob.z0, solver=solver, tol=1e-9, max_iter=300, compact=compact, check_every="adaptive")
    monkeypatch.undo()
    _assert_same_result(res, one, atol=0)
    assert one.n_iter <= res.n_iter <= one.n_iter + 8
    checks = len(syncs) if not compact else len([s for s in syncs if s == "tolist"])
    assert checks < 0.7 * one.n_iter, (checks, one.n_iter, res.n_iter)


def test_adaptive_schedule_predicts_from_the_decay_of_the_worst_ratio():
    from deq.solvers._loop import _Schedule

    sched = _Schedule(None)
    sched.plan(1, 1000.0)
    assert sched.next == 2  # one point: no rate yet
    sched.plan(2, 500.0)  # halves per iteration: 1 + log2(500) ~ 9 left -> check in half of them, capped at 8
    assert sched.next == 2 + 4
    sched.plan(6, 500.0 / 16)  # still halving: ~5 left -> 2
    assert sched.next == 8
    sched.plan(8, 40.0)  # grew: check every iteration
    assert sched.next == 9
    fixed = _Schedule(3)
    fixed.plan(1)
    assert fixed.next == 3
    fixed.plan(3)
    assert fixed.next == 6
