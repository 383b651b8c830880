"""The shared solver loop: flattening, per-sample stopping, best iterate, counting.

Every root-finder in :mod:`deq.solvers` implements two methods, ``init`` and
``step``, on a flat ``(B, D)`` view of the state. Everything else lives here,
once: calling ``f`` and checking what it returns, counting f-calls per sample,
the residual and the stopping rule, freezing converged samples, keeping the best
iterate, the residual trace and the non-finite check.

Residual (one definition for the whole library), per sample ``b``::

    abs:  r_b = ||f(z)_b - z_b||_2
    rel:  r_b = ||f(z)_b - z_b||_2 / ||f(z)_b||_2

For ``rel`` the quotient is guarded where ``||f(z)_b|| = 0``: the residual is 0
when ``z_b`` is also a fixed point there (``||f(z)_b - z_b|| = 0``) and ``+inf``
otherwise, so a point that is not a fixed point is never reported as converged.
No epsilon is added to the denominator: an epsilon would let a tiny ``z`` with
``f(z) = 0`` pass for a fixed point. Norms are taken in the working dtype: a
state whose entries are all below about ``1e-19`` (float32) or ``1e-154``
(float64) has squares that underflow, and there the test is only as good as
the norm.

A non-finite ``f(z)_b`` (or ``z_b``) makes ``r_b`` NaN (``rel``) or NaN/inf
(``abs``); the loop turns that into :class:`NonFiniteError`.

When ``f`` works in a narrower dtype than the solver (bf16/fp16 ``z0``), the
residual is that of the iterate as ``f`` saw it, rounded to ``z0``'s dtype: the
residual reported is the residual of the ``z`` that is returned.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, Union

import torch
from torch import Tensor

from .._registry import Registry

State = Union[Tensor, tuple[Tensor, ...]]

STOP_MODES = ("abs", "rel")


class NonFiniteError(FloatingPointError):
    """``f`` (or the backward solve) produced NaN or inf.

    Attributes:
        stage: "forward", "backward" or another name given by the caller.
        step: the iteration at which it happened (0 is the call ``f(z0)``).
        samples: batch indices of the samples whose values are not finite.
        result: the :class:`SolverResult` of the best finite iterates found before
            the failure, or ``None`` when it happened in ``f(z0)``.
    """

    def __init__(self, message: str, *, stage: str, step: int, samples: list[int],
                 result: "SolverResult | None" = None):
        super().__init__(message)
        self.stage = stage
        self.step = step
        self.samples = samples
        self.result = result


@dataclass(frozen=True)
class SolverResult:
    """What one call of :func:`solve` found, batch first.

    Attributes:
        z: the best (lowest-residual) iterate of each sample, with the structure,
            shapes and dtypes of ``z0``.
        nstep: ``(B,)`` int64, calls of ``f`` charged to each sample (line-search
            calls included; calls made after a sample converged are not charged).
        residual: ``(B,)`` residual of the returned ``z`` in ``stop_mode``.
        converged: ``(B,)`` bool, ``residual <= tol``.
        trace: ``(n_iter, B)`` residual of the current iterate at each iteration
            (a converged sample repeats its last value).
        best_step: ``(B,)`` int64, the iteration at which the returned ``z`` was
            found (0 is ``z0`` itself).
        n_iter: iterations the loop ran (the largest ``best_step`` is below it).
        solver: the solver's name, e.g. ``"anderson"``.
        stop_mode: ``"abs"`` or ``"rel"``.
        tol: the tolerance the solve was run at.
        backward: for a :class:`deq.DEQLayer` call, the result of the backward
            (adjoint) solve once ``backward()`` has run; ``None`` otherwise.
    """

    z: State
    nstep: Tensor
    residual: Tensor
    converged: Tensor
    trace: Tensor
    best_step: Tensor
    n_iter: int
    solver: str
    stop_mode: str
    tol: float
    backward: "SolverResult | None" = None

    def detach(self) -> "SolverResult":
        """This result with every tensor detached from autograd."""
        z = tuple(t.detach() for t in self.z) if isinstance(self.z, tuple) else self.z.detach()
        return dataclasses.replace(self, z=z)

    def summary(self) -> dict[str, float]:
        """Batch statistics as plain floats, for logs (one host sync)."""
        nstep = self.nstep.double()
        res = self.residual.double()
        stats = torch.stack([nstep.mean(), nstep.max(), res.mean(), res.max(),
                             self.converged.double().mean()]).tolist()
        keys = ("nstep_mean", "nstep_max", "residual_mean", "residual_max", "converged_frac")
        return dict(zip(keys, stats))

    def __repr__(self) -> str:
        """One line (not the tensors): iterations, nstep, worst residual, converged, and the backward's."""
        batch = self.residual.numel()
        head = f"{self.solver}, batch {batch}, n_iter {self.n_iter}"
        if batch:
            s = self.summary()
            head += (f", nstep mean {s['nstep_mean']:.3g} max {int(s['nstep_max'])}, max residual "
                     f"{s['residual_max']:.3g} (tol {self.tol:g}, {self.stop_mode}), converged "
                     f"{int(self.converged.sum())}/{batch}")
        tail = "" if self.backward is None else f", backward={self.backward!r}"
        return f"SolverResult({head}{tail})"


class Solver:
    """Base class of the root-finders: ``init`` and ``step`` on flat states.

    Subclasses are frozen dataclasses holding the algorithm's options; they keep
    no per-solve data on ``self`` (one object may serve many solves).

    The loop calls ``state = init(z, fz)`` once with ``fz = f(z0)``, then
    ``state, z, fz = step(state, z, fz, active, evaluate)`` per iteration.
    ``z``/``fz`` are ``(B, D)`` in the working dtype (float32 or wider).
    ``step`` must return ``z`` unchanged for samples where ``active`` is False
    and must obtain ``fz`` only through ``evaluate(z, charge)``, which calls
    ``f`` and charges one call to each sample where ``charge`` is True. It may
    keep references to the ``z``/``fz`` it is given (the loop never modifies
    them) and must not modify them in place itself; it returns a new ``z``.
    Its own buffers it may update in place.
    """

    name: ClassVar[str] = ""

    def init(self, z: Tensor, fz: Tensor) -> Any:
        raise NotImplementedError  # abstract

    def step(self, state: Any, z: Tensor, fz: Tensor, active: Tensor,
             evaluate: Callable[[Tensor, Tensor], Tensor]) -> tuple[Any, Tensor, Tensor]:
        raise NotImplementedError  # abstract


_SOLVERS: Registry[Solver] = Registry("solver", Solver, plural="solvers")
register = _SOLVERS.register


def solver_names() -> list[str]:
    """The names accepted by ``solver=`` (sorted)."""
    return _SOLVERS.names()


def get_solver(solver: "Solver | str") -> Solver:
    """A solver object from an object or a registered name (``ValueError`` lists the names)."""
    return _SOLVERS.get(solver)


# ----------------------------------------------------------------------------
# Flattening a tensor or a tuple of tensors to (B, D) and back.

@dataclass(frozen=True)
class _Spec:
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    sizes: tuple[int, ...]
    is_tuple: bool
    work_dtype: torch.dtype


def working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 or wider: the dtype solver state is kept in for f's ``dtypes``."""
    out = torch.float32
    for dt in dtypes:
        if not dt.is_floating_point:
            raise TypeError(f"z0 must be floating point, got {dt}")
        out = torch.promote_types(out, dt)
    return out


def _spec_of(z: State) -> _Spec:
    parts = z if isinstance(z, tuple) else (z,)
    if len(parts) == 0 or not all(isinstance(t, Tensor) for t in parts):
        raise TypeError("z0 must be a tensor or a non-empty tuple of tensors")
    batch = parts[0].shape[0] if parts[0].dim() > 0 else None
    for t in parts:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError("every tensor of z0 needs the same leading batch dimension; got shapes "
                             + ", ".join(str(tuple(p.shape)) for p in parts))
    return _Spec(shapes=tuple(t.shape for t in parts), dtypes=tuple(t.dtype for t in parts),
                 sizes=tuple(t[0].numel() for t in parts), is_tuple=isinstance(z, tuple),
                 work_dtype=working_dtype(*(t.dtype for t in parts)))


def _flatten(z: State, spec: _Spec) -> Tensor:
    parts = z if spec.is_tuple else (z,)
    # ``.to`` only where the dtype differs: on small problems every dispatch counts.
    flat = [t.reshape(t.shape[0], -1) for t in parts]
    flat = [t if t.dtype == spec.work_dtype else t.to(spec.work_dtype) for t in flat]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _unflatten(flat: Tensor, spec: _Spec) -> State:
    pieces = flat.split(list(spec.sizes), dim=1) if len(spec.sizes) > 1 else (flat,)
    parts = tuple(p.reshape(shape) if dt == p.dtype else p.reshape(shape).to(dt)
                  for p, shape, dt in zip(pieces, spec.shapes, spec.dtypes))
    return parts if spec.is_tuple else parts[0]


def _describe(spec_shapes: Sequence[torch.Size]) -> str:
    return ", ".join(str(tuple(s)) for s in spec_shapes)


def _check_output(out: Any, spec: _Spec) -> None:
    """f(z) must have the structure, shapes and dtypes of z0."""
    if (not spec.is_tuple and isinstance(out, Tensor) and out.shape == spec.shapes[0]
            and out.dtype == spec.dtypes[0]):
        return
    parts = out if isinstance(out, tuple) else (out,)
    if isinstance(out, tuple) != spec.is_tuple or len(parts) != len(spec.shapes) or not all(
            isinstance(t, Tensor) for t in parts):
        kind = f"a tuple of {len(spec.shapes)} tensors" if spec.is_tuple else "a tensor"
        raise ValueError(f"f must return {kind} like z0 (shapes {_describe(spec.shapes)}), got "
                         f"{type(out).__name__}" + (f" of length {len(parts)}" if isinstance(out, tuple) else ""))
    shapes = tuple(t.shape for t in parts)
    if shapes != spec.shapes:
        raise ValueError(f"f returned shape {_describe(shapes)} but z0 has shape {_describe(spec.shapes)}; "
                         "f(z) must have the shape of z")
    dtypes = tuple(t.dtype for t in parts)
    if dtypes != spec.dtypes:
        raise ValueError(f"f returned dtype {', '.join(map(str, dtypes))} (shape {_describe(shapes)}) but z0 has "
                         f"dtype {', '.join(map(str, spec.dtypes))} (shape {_describe(spec.shapes)})")


def residual(z: Tensor, fz: Tensor, stop_mode: str) -> Tensor:
    """Per-sample residual of flat ``(B, D)`` states, as defined in the module docstring."""
    diff = torch.linalg.vector_norm(fz - z, dim=1)
    if stop_mode == "abs":
        return diff
    # The guard without a branch: x / 0 = inf, and 0 / 0 = NaN is set to 0.
    # Adding diff - diff (0, or NaN where diff is not finite) makes a non-finite
    # f(z) or z NaN, never the guard's inf, even when ||f(z)|| is finite.
    rel = (diff / torch.linalg.vector_norm(fz, dim=1)).add_(diff - diff)
    return rel.masked_fill_(diff == 0, 0.0)


def _stop_test(res: Tensor, tol: float, stop_mode: str) -> tuple[bool, bool]:
    """(any sample non-finite, any sample above tol) from one reduction and one host sync.

    ``max`` propagates NaN; stopped samples carry a residual ``<= tol``, so the
    batch goes on exactly when the largest residual is above ``tol``.
    """
    worst = res.max().item()
    bad = math.isnan(worst) or (stop_mode == "abs" and math.isinf(worst))
    return bad, worst > tol


def _non_finite(res: Tensor, stop_mode: str) -> Tensor:
    """Samples whose f(z) was not finite, read off the residual (+inf is the rel guard's value)."""
    return torch.isnan(res) if stop_mode == "rel" else ~torch.isfinite(res)


def _check_budget(tol: float, max_iter: int, stop_mode: str) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; known: {', '.join(STOP_MODES)}")


def _sample_list(mask: Tensor, limit: int = 10) -> tuple[list[int], str]:
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:limit])) + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")
    return idx, shown


@torch.no_grad()
def solve(f: Callable[[State], State], z0: State, *, solver: "Solver | str" = "anderson",
          tol: float = 1e-4, max_iter: int = 50, stop_mode: str = "rel",
          stage: str = "forward") -> SolverResult:
    """Find z* = f(z*) for each sample of a batch.

    Solves ``z = f(z)`` (equivalently the root of ``g(z) = f(z) - z``) with a
    registered root-finder, per sample: each sample stops when its own residual
    is ``<= tol``, after which it no longer changes and no more f-calls are
    charged to it; the loop ends when every sample has converged or after
    ``max_iter`` iterations. Runs under ``torch.no_grad``.

    Args:
        f: maps a state to a state of the same structure, shapes and dtypes.
            Batch dimension first: ``(B, ...)`` or a tuple of ``(B, ...)``.
        z0: initial guess, a tensor or a tuple of tensors, batch first.
        solver: a :class:`Solver` object or a name from :func:`solver_names`.
        tol: stopping tolerance on the residual (see module docstring).
        max_iter: iterations at most; each is one call of ``f`` on the batch
            (a line-search trial is an iteration too). The call ``f(z0)`` is
            the first iteration.
        stop_mode: ``"rel"`` or ``"abs"``.
        stage: a name used in error messages (``"forward"``, ``"backward"``).

    Returns:
        A :class:`SolverResult`. Non-convergence is not an error: see
        ``converged`` and ``residual``.

    Raises:
        ValueError: ``f`` returned another structure, shape or dtype than ``z0``,
            unknown solver name or stop mode, invalid ``tol``/``max_iter``.
        NonFiniteError: ``f`` returned NaN/inf for a sample still iterating (or
            the solver's iterate overflowed); ``err.result`` holds the best
            finite iterates found before.

    Example:
        >>> res = solve(torch.cos, torch.zeros(4, 1), solver="anderson", tol=1e-8)
        >>> round(res.z[0, 0].item(), 6)
        0.739085
    """
    algo = get_solver(solver)
    _check_budget(tol, max_iter, stop_mode)
    spec = _spec_of(z0)
    batch = spec.shapes[0][0]
    device = (z0[0] if spec.is_tuple else z0).device
    nstep = torch.zeros(batch, dtype=torch.int64, device=device)

    def evaluate(z: Tensor, charge: Tensor) -> Tensor:
        out = f(_unflatten(z, spec))
        _check_output(out, spec)
        nstep.add_(charge)
        return _flatten(out, spec)

    # With a bf16/fp16 f the state is wider than what f sees; the residual (and
    # the best iterate) are taken at the iterate as f saw it, rounded, because
    # that is the z returned.
    narrow = any(dt != spec.work_dtype for dt in spec.dtypes)

    def result(trace: list[Tensor], n_iter: int) -> SolverResult:
        steps = torch.stack(trace)
        # The first step at which the lowest residual was reached is the step of
        # the best iterate (it is replaced only on strict improvement).
        best_step = steps.nan_to_num(nan=float("inf")).argmin(dim=0)
        return SolverResult(z=_unflatten(best_z, spec), nstep=nstep, residual=best_res,
                            converged=best_res <= tol, trace=steps, best_step=best_step, n_iter=n_iter,
                            solver=algo.name, stop_mode=stop_mode, tol=tol)

    z = _flatten(z0, spec)
    fz = evaluate(z, torch.ones(batch, dtype=torch.bool, device=device))
    res = residual(z, fz, stop_mode)
    active = res > tol  # False for NaN
    any_bad, keep_going = _stop_test(res, tol, stop_mode)
    if any_bad:
        idx, shown = _sample_list(_non_finite(res, stop_mode))
        raise NonFiniteError(f"{stage} solve: f(z0) returned non-finite values (NaN or inf) at step 0 "
                             f"for samples [{shown}]", stage=stage, step=0, samples=idx)

    best_z, best_res = z.clone(), res
    trace = [res]
    state = algo.init(z, fz)
    n_iter = 1
    # Per iteration: one f-call, ~20 small tensor ops and one host sync. On
    # small problems these ops cost as much as f, so each one is counted here.
    for it in range(1, max_iter):
        if not keep_going:
            break
        state, z, fz = algo.step(state, z, fz, active, evaluate)
        n_iter += 1
        seen = _flatten(_unflatten(z, spec), spec) if narrow else z
        # A stopped sample keeps its value (its z and f(z) no longer change),
        # which is <= tol, so ``res > tol`` below also keeps it stopped.
        res = torch.where(active, residual(seen, fz, stop_mode), best_res)
        improved = res < best_res  # False for NaN: a non-finite iterate never becomes the best
        best_res = torch.where(improved, res, best_res)
        active = res > tol
        trace.append(res)
        any_bad, keep_going = _stop_test(res, tol, stop_mode)
        if any_bad:
            # Samples that were finite at this step keep this step's iterate if it is their best.
            best_z = torch.where(improved[:, None], seen, best_z)
            idx, shown = _sample_list(_non_finite(res, stop_mode))
            raise NonFiniteError(
                f"{stage} solve ({algo.name}): f returned non-finite values (NaN or inf), or the iterate did, "
                f"at step {it} for samples [{shown}]; the best finite iterates are in this error's .result",
                stage=stage, step=it, samples=idx, result=result(trace, n_iter))
        # Every row of ``seen`` is finite here, so lerp with weights 0/1 is an
        # exact row select (x + 0*(y-x) = x, y - (y-x)*0 = y), several times
        # cheaper than torch.where on CPU.
        best_z.lerp_(seen, improved.to(best_z.dtype)[:, None])

    return result(trace, n_iter)
