"""The bookkeeping of one solve: the stop test, the best iterate, counts, traces, the active set.

:func:`deq.solve` (:mod:`deq.solvers.base`) drives it; the semantics are
described there. Everything here is private to the solvers package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ._flat import _Spec, _check_output, _flatten, _unflatten
from .contract import Iterate, NonFiniteError, Solver, SolverResult, State

def residual(z: Tensor, fz: Tensor, stop_mode: str) -> Tensor:
    """Per-sample residual of flat ``(B, D)`` states, as defined in the module docstring.

    A non-finite ``f(z)`` or ``z`` gives NaN (``rel``) or NaN/inf (``abs``), never the guard's inf.
    """
    diff = torch.linalg.vector_norm(fz - z, dim=1)
    if stop_mode == "abs":
        return diff
    return _relative(diff, torch.linalg.vector_norm(fz, dim=1).add_(diff - diff))


def _relative(gn: Tensor, fn: Tensor) -> Tensor:
    """``gn / fn`` with the guard: 0 where ``gn = 0``, +inf where ``fn = 0 < gn``."""
    return (gn / fn).masked_fill_(gn == 0, 0.0)


def _scaled_norm(v: Tensor) -> Tensor:
    """Per-row 2-norm that cannot overflow for finite entries: ``max |v| * ||v / max |v|||``."""
    top = v.abs().amax(dim=1, keepdim=True)
    scale = torch.where(top > 0, top, 1.0)
    return torch.linalg.vector_norm(v / scale, dim=1).mul_(scale.squeeze(1))


@dataclass(frozen=True)
class _StopTest:
    """``||g|| <= atol + rtol ||f(z)||`` (module docstring), and the residual in stop-mode units."""

    stop_mode: str
    tol: float
    atol: float

    @property
    def rtol(self) -> float:
        return self.tol if self.stop_mode == "rel" else 0.0

    @property
    def floor(self) -> float:
        return self.tol if self.stop_mode == "abs" else self.atol

    def norms(self, g: Tensor, fz: Tensor, scaled: bool) -> tuple[Tensor, Tensor | None]:
        """``(||g||, ||f(z)||)`` per sample; ``||f(z)||`` only in ``rel`` mode."""
        norm = _scaled_norm if scaled else (lambda v: torch.linalg.vector_norm(v, dim=1))
        return norm(g), (norm(fz) if self.stop_mode == "rel" else None)

    def excess(self, gn: Tensor, fn: Tensor | None) -> Tensor:
        """``||g|| - (atol + rtol ||f(z)||)``: converged where ``<= 0``; NaN or +inf where not finite.

        An infinite ``||f(z)||`` (non-finite f, or an overflowed norm) would make
        the threshold infinite and pass any ``||g||``: it is mapped to +inf, so
        the sample is not converged and the check looks at it.
        """
        if fn is None:
            return gn - self.floor
        out = torch.sub(gn, fn, alpha=self.rtol)
        if self.floor:
            out.sub_(self.floor)
        return out.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=math.inf)

    def residual(self, gn: Tensor, fn: Tensor | None) -> Tensor:
        return gn if fn is None else _relative(gn, fn)


def _sample_list(mask: Tensor, limit: int = 10) -> tuple[list[int], str]:
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:limit])) + (f", ... ({len(idx)} in all)" if len(idx) > limit else "")
    return idx, shown


# ----------------------------------------------------------------------------
# Mixed precision: the solver's arithmetic outside autocast, f inside it.

@dataclass(frozen=True)
class _Autocast:
    device_type: str
    enabled: bool
    dtype: torch.dtype | None

    @staticmethod
    def capture(device: torch.device) -> "_Autocast":
        kind = device.type
        if kind not in ("cpu", "cuda", "xpu", "mps", "hpu") or not torch.is_autocast_enabled(kind):
            return _Autocast(kind, False, None)
        return _Autocast(kind, True, torch.get_autocast_dtype(kind))

    def outside(self) -> contextlib.AbstractContextManager:
        """Autocast off (for the solver's own ops), when it was on."""
        return torch.autocast(self.device_type, enabled=False) if self.enabled else contextlib.nullcontext()

    def inside(self) -> contextlib.AbstractContextManager:
        """The caller's autocast again (for f), when it was on."""
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else contextlib.nullcontext()


# ----------------------------------------------------------------------------
# The loop.

def _select(state: Any, keep: Tensor) -> Any:
    """``state`` restricted to the rows ``keep``: every per-row tensor field of a dataclass state.

    A field is per-row unless its metadata says ``shared``; tuples of per-row
    tensors are indexed element by element, dataclass fields recursively;
    other values are kept. ``None`` (a stateless solver) stays ``None``.
    Fields with ``init=False`` (views of the others) are rebuilt by the
    state's ``__post_init__``.
    """
    if state is None:
        return None
    if not dataclasses.is_dataclass(state):
        raise TypeError(f"compact=True needs the solver state to be a dataclass (or None) so that its rows can be "
                        f"selected; got {type(state).__name__}")
    changes = {}
    for fld in dataclasses.fields(state):
        value = getattr(state, fld.name)
        if not fld.init or fld.metadata.get("shared"):
            continue
        if isinstance(value, Tensor):
            changes[fld.name] = value.index_select(0, keep)
        elif isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
            changes[fld.name] = tuple(v.index_select(0, keep) for v in value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[fld.name] = _select(value, keep)
    return dataclasses.replace(state, **changes)


class _Rows:
    """The batch rows still in the solve (all of them until the first compaction) and what left it.

    With ``compact``, rows that have stopped are dropped from every working
    tensor once the active share of the working set falls below the
    threshold; their results are written to full-batch outputs here.
    """

    def __init__(self, batch: int, work_dtype: torch.dtype, dim: int, device: torch.device):
        self.batch, self.idx = batch, None  # idx: working row -> batch row (None: all, in order)
        self.epochs: list[tuple[int, Tensor | None]] = [(0, None)]  # (first iteration, idx) per working set
        self._out = dict(dtype=work_dtype, device=device)
        self.dim = dim
        self.z = self.nstep = None  # full-batch outputs, made at the first compaction

    def batch_rows(self, rows: Tensor) -> Tensor:
        return rows if self.idx is None else self.idx.index_select(0, rows)

    def write(self, rows: Tensor, z: Tensor, nstep: Tensor) -> None:
        """Store the best iterates and counts of working rows ``rows`` in the full-batch outputs."""
        if self.z is None:
            self.z = torch.zeros(self.batch, self.dim, **self._out)
            self.nstep = torch.zeros(self.batch, dtype=torch.int64, device=self._out["device"])
        at = self.batch_rows(rows)
        self.z.index_copy_(0, at, z.index_select(0, rows))
        self.nstep.index_copy_(0, at, nstep.index_select(0, rows))

    def trace(self, values: list[Tensor]) -> Tensor:
        """``(n_iter, B)`` from per-iteration working-set vectors (+inf after a row left)."""
        if self.idx is None and len(self.epochs) == 1:
            return torch.stack(values)
        full = torch.full((len(values), self.batch), math.inf, **self._out)
        bounds = [start for start, _ in self.epochs[1:]] + [len(values)]
        for (start, idx), end in zip(self.epochs, bounds):
            if end > start:
                block = torch.stack(values[start:end])
                full[start:end] = block if idx is None else full[start:end].index_copy(1, idx, block)
        return full


class _Schedule:
    """When the loop checks (its one host sync): every ``every`` iterations, or adaptively (``every=None``).

    Adaptive: from the worst ratio ``q = ||g|| / (atol + rtol ||f(z)||)`` over
    the samples still iterating (a sample stops at ``q <= 1``) at two checks,
    the rate ``q`` falls at per iteration predicts the iterations left; the
    next check comes after half of them (at least 1, at most :attr:`MAX_GAP`),
    so a sync is rarely wasted and the loop rarely runs far past the last
    sample's stop. A stalled or growing ``q`` checks every iteration.
    """

    MAX_GAP = 8

    def __init__(self, every: int | None):
        self.every, self.next, self.last, self.seen = every, 1, 0, None

    @property
    def adaptive(self) -> bool:
        return self.every is None

    def due(self, n_iter: int) -> bool:
        return n_iter >= self.next

    def plan(self, n_iter: int, ratio: float | None = None) -> None:
        """Record a check at ``n_iter`` (with the worst ratio, when adaptive) and set the next one."""
        self.last = n_iter
        if self.every is not None:
            self.next = (n_iter // self.every + 1) * self.every
            return
        gap = 1
        if self.seen is not None and ratio is not None and math.isfinite(ratio) and ratio > 1:
            before, was = self.seen
            if was > ratio and n_iter > before:
                rate = (ratio / was) ** (1.0 / (n_iter - before))
                gap = int(min(self.MAX_GAP, max(1.0, 0.5 * math.log(ratio) / -math.log(rate))))
        self.seen = (n_iter, ratio)
        self.next = n_iter + gap


class _Loop:
    """One solve's bookkeeping: the stop test, the best iterate, counts, the raw trace, the active set.

    Per iteration (:meth:`record`) about ten small tensor ops; when the
    :class:`_Schedule` says so, one host sync (:meth:`check`), which also
    compacts the working set in active-set mode.
    """

    def __init__(self, f: Callable, spec: _Spec, test: _StopTest, algo: Solver, stage: str, device: torch.device,
                 amp: _Autocast, *, compact: float | None, check_every: int | None):
        self.f, self.spec, self.test, self.algo, self.stage, self.amp = f, spec, test, algo, stage, amp
        self.compact, self.schedule = compact, _Schedule(check_every)
        self.nstep = torch.zeros(spec.batch, dtype=torch.int64, device=device)
        # With a bf16/fp16 f the state is wider than what f sees; the residual (and
        # the best iterate) are taken at the iterate as f saw it, rounded, because
        # that is the z returned.
        self.narrow = any(dt != spec.work_dtype for dt in spec.dtypes)
        self.scaled = False
        self.gns: list[Tensor] = []
        self.fns: list[Tensor | None] = []
        self.rows = _Rows(spec.batch, spec.work_dtype, sum(spec.sizes), device)
        self.charges: list[Tensor] = []  # per iteration, summed into nstep when needed (no op per call)
        self.minus_one = torch.tensor(-1.0, dtype=spec.work_dtype, device=device)
        self.rows_processed = 0
        self.keep_going = True
        self.state: Any = None

    @property
    def n_iter(self) -> int:
        return len(self.gns)

    def evaluate(self, z: Tensor, charge: Tensor) -> Tensor:
        with self.amp.inside():
            state = _unflatten(z, self.spec)
            out = self.f(state, self.rows.idx) if self.compact is not None else self.f(state)
        _check_output(out, self.spec, self.amp.enabled, self.spec.samples(z.shape[0]))
        self.charges.append(charge)
        self.rows_processed += self.spec.samples(z.shape[0])
        return _flatten(out, self.spec)

    def _seen(self, z: Tensor) -> Tensor:
        return _flatten(_unflatten(z, self.spec), self.spec) if self.narrow else z

    def start(self, z: Tensor) -> None:
        """Evaluate ``f(z0)``, start the best iterate and the active set, check, init the solver."""
        fz = self.evaluate(z, torch.ones(z.shape[0], dtype=torch.bool, device=z.device))
        g = fz - z
        gn, fn = self.test.norms(g, fz, self.scaled)
        self.best_z, self.best_gn = z.clone(), gn
        self.excess = self.test.excess(gn, fn)
        self.active = ~(self.excess <= 0)  # True for NaN, until the check raises
        self.improved = None
        self.gns.append(gn)
        self.fns.append(fn)
        self.it, self.fn = Iterate(z, fz, g, gn), fn
        self.check()
        self.state = self.algo.init(self.it)

    def record(self, state: Any, z: Tensor, fz: Tensor, g: Tensor) -> None:
        """Bookkeeping for the iterate a step produced, then the check when one is due."""
        self.state = state
        seen = self._seen(z)
        gn, fn = self.test.norms(fz - seen if self.narrow else g, fz, self.scaled)
        self.excess = self.test.excess(gn, fn)
        conv = self.excess <= 0
        # The converged iterate wins (the sample stops there); before it, the
        # smallest ||g|| (strictly: the first of equals; False for NaN). A
        # stopped sample is re-evaluated at its frozen (best) iterate, so
        # "improving" it changes nothing: no need to mask it out.
        improved = conv | (gn < self.best_gn)
        self.best_gn = torch.where(improved, gn, self.best_gn)
        self.improved = improved
        self.active = torch.gt(self.active, conv)  # active and not converged, in one op
        self.gns.append(gn)
        self.fns.append(fn)
        self.it, self.fn, self.seen = Iterate(z, fz, g, gn), fn, seen
        if self.schedule.due(self.n_iter):
            self.check()
        else:
            # Unchecked rows may be NaN: where() keeps them out of the best iterate.
            self.best_z = torch.where(improved[:, None], seen, self.best_z)
            self.improved = None

    def check(self, *, final: bool = False) -> None:
        """The host sync: whether any sample goes on; raises on non-finite values; compacts (not when final)."""
        masked = torch.where(self.active, self.excess, self.minus_one)
        wanted = [masked.max()]
        if self.compact is not None:
            units = self._units()
            wanted.append(units.sum().to(masked.dtype))
        if self.schedule.adaptive:  # the worst ||g|| / threshold, from ||g|| and the excess ||g|| - threshold
            gn = self.it.gn
            wanted.append(torch.where(self.active, gn / (gn - self.excess), 0.0).max())
        stats = torch.stack(wanted).tolist() if len(wanted) > 1 else [wanted[0].item()]
        worst = stats[0]
        n_active = stats[1] if self.compact is not None else None
        self.schedule.plan(self.n_iter, stats[-1] if self.schedule.adaptive else None)
        if not math.isfinite(worst):
            self._non_finite()
            worst = torch.where(self.active, self.excess, self.minus_one).max().item()
        elif self.improved is not None:
            # Every row is finite here, so lerp with weights 0/1 is an exact row
            # select (x + 0*(y-x) = x, y - (y-x)*0 = y), several times cheaper
            # than torch.where on CPU.
            self.best_z.lerp_(self.seen, self.improved.to(self.best_z.dtype)[:, None])
        self.improved = None
        self.keep_going = worst > 0
        if n_active is None or final or not self.keep_going:
            return
        working = units.shape[0]
        if n_active < working and n_active <= self.compact * working:
            self._compact()

    def _units(self) -> Tensor:
        """Per working sample: still iterating (what compaction counts and drops)."""
        return self.active

    def _compact(self) -> None:
        """Drop the rows that stopped from every working tensor (they keep their results)."""
        keep, leave = self.active.nonzero().squeeze(1), (~self.active).nonzero().squeeze(1)
        self._count()
        self.rows.write(leave, self.best_z, self.nstep)
        self.rows.idx = self.rows.batch_rows(keep)
        self.rows.epochs.append((self.n_iter, self.rows.idx))
        pick = lambda t: None if t is None else t.index_select(0, keep)  # noqa: E731
        self.best_z, self.best_gn = pick(self.best_z), pick(self.best_gn)
        self.nstep, self.active, self.excess = pick(self.nstep), pick(self.active), pick(self.excess)
        self.it = Iterate(*(pick(t) for t in self.it))
        self.fn = pick(self.fn)
        self.state = _select(self.state, keep)

    def _non_finite(self) -> None:
        """A norm came out NaN/inf: raise for non-finite vectors; rescale an overflowed norm."""
        step = self.n_iter - 1
        z, fz, g = (self.seen if step else self.it.z), self.it.fz, self.it.g
        bad = self.active & ~(torch.isfinite(g).all(dim=1) & torch.isfinite(fz).all(dim=1))
        if self.improved is not None:
            # Rows that are not finite are never improved; where() keeps them out.
            self.best_z = torch.where(self.improved[:, None], z, self.best_z)
            self.improved = None
        if bool(bad.any()):
            idx, shown = _sample_list(self._batch_mask(bad))
            # With check_every > 1 the values may have turned non-finite before this check.
            step = next(t for t in range(self.n_iter) if not bool(torch.isfinite(self._at(t, bad)).all()))
            if step == 0:
                raise NonFiniteError(f"{self.stage} solve: f(z0) returned non-finite values (NaN or inf) at step 0 "
                                     f"for samples [{shown}]", stage=self.stage, step=0, samples=idx)
            raise NonFiniteError(
                f"{self.stage} solve ({self.algo.name}): f returned non-finite values (NaN or inf), or the iterate "
                f"did, at step {step} for samples [{shown}]; the best finite iterates are in this error's .result",
                stage=self.stage, step=step, samples=idx, result=self.result())
        # Finite vectors whose squared entries overflow: redo this iteration's
        # norms scaled, and keep scaling from now on.
        self.scaled = True
        gn, fn = self.test.norms(fz - z if self.narrow else g, fz, True)
        self.gns[-1], self.fns[-1] = gn, fn
        self.excess = self.test.excess(gn, fn)
        conv = self.excess <= 0
        improved = self.active & (conv | (gn < self.best_gn) | ~torch.isfinite(self.best_gn))
        self.best_gn = torch.where(improved, gn, self.best_gn)
        self.best_z = torch.where(improved[:, None], z, self.best_z)
        self.active = self.active & ~conv

    def _count(self) -> None:
        """Add the pending per-iteration charges to ``nstep``."""
        if self.charges:
            self.nstep += torch.stack(self.charges).sum(dim=0)
            self.charges = []

    def _at(self, t: int, mask: Tensor) -> Tensor:
        """The raw ||g|| of iteration ``t`` for the current working rows in ``mask`` (t within this working set)."""
        start = self.rows.epochs[-1][0]
        return self.gns[t][mask] if t >= start else self.gns[t].new_zeros(0)

    def _batch_mask(self, mask: Tensor) -> Tensor:
        """A working-set mask as a mask over the whole batch."""
        if self.rows.idx is None:
            return mask
        full = torch.zeros(self.spec.batch, dtype=torch.bool, device=mask.device)
        return full.index_fill_(0, self.rows.idx[mask], True)

    def result(self) -> SolverResult:
        test, rows = self.test, self.rows
        self._count()
        best_z, nstep = self.best_z, self.nstep
        if rows.z is not None:  # compacted: the rows still working join those that left
            rows.write(torch.arange(best_z.shape[0], device=best_z.device), best_z, nstep)
            best_z, nstep = rows.z, rows.nstep
        gn = rows.trace(self.gns)
        fn = None if self.fns[0] is None else rows.trace(self.fns)
        # Each sample's raw rows after the iteration it stopped at are
        # re-evaluations of a frozen iterate (or absent, once compacted away):
        # the trace repeats its last value.
        conv = test.excess(gn, fn) <= 0
        steps = torch.arange(gn.shape[0], device=gn.device)[:, None]
        stop = torch.where(conv, steps, gn.shape[0] - 1).amin(dim=0)
        frozen = steps > stop
        trace = test.residual(gn, fn)
        trace = torch.where(frozen, trace.gather(0, stop[None]), trace)
        ordered = torch.where(frozen, gn.gather(0, stop[None]), gn).nan_to_num(nan=math.inf)
        # The rule the loop applied: the first iterate that passed, else the first smallest ||g||.
        best_step = torch.where(conv.any(dim=0), stop, ordered.argmin(dim=0))
        at_best = best_step[None]
        best_gn = gn.gather(0, at_best)[0]
        best_fn = None if fn is None else fn.gather(0, at_best)[0]
        return SolverResult(z=_unflatten(best_z, self.spec), nstep=nstep, residual=trace.gather(0, at_best)[0],
                            converged=test.excess(best_gn, best_fn) <= 0, trace=trace, best_step=best_step,
                            n_iter=gn.shape[0], solver=self.algo.name, stop_mode=test.stop_mode, tol=test.tol,
                            atol=test.atol, rows=self.rows_processed)


class _CausalLoop(_Loop):
    """Causal mode: one row per (sample, position); the stop test runs on prefixes of positions.

    Per row ``t`` the test is taken on the prefix norms ``||g_{<= t}||`` and
    ``||f(z)_{<= t}||`` (positions ``<= t`` of its sample), so the prefix of the
    whole sequence is the sample's usual test. Position ``t`` is frozen once
    every prefix ``<= t'``, ``t' <= t``, has passed: the frozen positions of a
    sample are a prefix that only grows, and with a causal ``f`` they no
    longer change. The returned iterate is the last one (its frozen positions
    hold the values at which they passed): a best iterate chosen per
    position would mix iterates whose residual was never evaluated, and one
    chosen per sample would let later positions decide for earlier ones.
    Every decision at position ``t`` uses rows ``<= t`` only.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.length = self.spec.length
        self.nstep = torch.zeros(self.spec.batch * self.length, dtype=torch.int64, device=self.nstep.device)
        self.out: tuple[Tensor, Tensor, Tensor] | None = None  # last z, nstep, active per row, once compacted

    def _units(self) -> Tensor:
        return self.active.view(-1, self.length).any(dim=1)

    def _row_index(self, samples: Tensor) -> Tensor:
        """The rows of ``samples`` (each sample's ``length`` consecutive rows)."""
        return (samples[:, None] * self.length + torch.arange(self.length, device=samples.device)).flatten()

    def _write(self, samples: Tensor) -> None:
        """Store the last iterate, counts and active flags of working ``samples`` in full-batch outputs."""
        if self.out is None:
            rows, dim = self.spec.batch * self.length, self.it.z.shape[1]
            self.out = (self.it.z.new_zeros(rows, dim), self.nstep.new_zeros(rows),
                        self.active.new_zeros(rows))
        src, dst = self._row_index(samples), self._row_index(self.rows.batch_rows(samples))
        for out, value in zip(self.out, (self.it.z, self.nstep, self.active)):
            out.index_copy_(0, dst, value.index_select(0, src))

    def _compact(self) -> None:
        """Drop the samples whose every position has stopped (f is then called on the others only)."""
        units = self._units()
        keep, leave = units.nonzero().squeeze(1), (~units).nonzero().squeeze(1)
        self._count()
        self._write(leave)
        rows = self._row_index(keep)
        self.rows.idx = self.rows.batch_rows(keep)
        self.rows.epochs.append((self.n_iter, self.rows.idx))
        pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
        self.nstep, self.active, self.excess = pick(self.nstep), pick(self.active), pick(self.excess)
        self.it = Iterate(*(pick(t) for t in self.it))
        self.state = _select(self.state, rows)

    def _prefix(self, norms: Tensor | None) -> Tensor | None:
        """Per-row norms -> per-row prefix norms within each sample (sums of squares in float64)."""
        if norms is None:
            return None
        sq = norms.double().square().view(-1, self.length).cumsum(dim=1)
        return sq.sqrt_().view(-1).to(norms.dtype)

    def _measure(self, g: Tensor, fz: Tensor) -> Tensor:
        gn, fn = self.test.norms(g, fz, self.scaled)
        gp, fp = self._prefix(gn), self._prefix(fn)
        self.excess = self.test.excess(gp, fp)
        done = (self.excess <= 0).view(-1, self.length).to(torch.uint8).cummin(dim=1).values.view(-1)
        self.active = torch.gt(self.active, done.bool())
        last = slice(self.length - 1, None, self.length)  # each sample's whole-sequence prefix
        self.gns.append(gp[last])
        self.fns.append(None if fp is None else fp[last])
        return gp

    def start(self, z: Tensor) -> None:
        fz = self.evaluate(z, torch.ones(z.shape[0], dtype=torch.bool, device=z.device))
        g = fz - z
        self.active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        self.improved = None
        self.it = Iterate(z, fz, g, self._measure(g, fz))
        self.check()
        self.state = self.algo.init(self.it)

    def record(self, state: Any, z: Tensor, fz: Tensor, g: Tensor) -> None:
        self.state = state
        self.seen = self._seen(z)
        self.it = Iterate(z, fz, g, self._measure(fz - self.seen if self.narrow else g, fz))
        if self.schedule.due(self.n_iter):
            self.check()

    def _non_finite(self) -> None:
        z, fz, g = self.seen if self.n_iter > 1 else self.it.z, self.it.fz, self.it.g
        bad = self.active & ~(torch.isfinite(g).all(dim=1) & torch.isfinite(fz).all(dim=1))
        if bool(bad.any()):
            samples = bad.view(-1, self.length).any(dim=1)
            idx, shown = _sample_list(self._batch_mask(samples))
            step = next(t for t in range(self.n_iter) if not bool(torch.isfinite(self._at(t, samples)).all()))
            raise NonFiniteError(
                f"{self.stage} solve ({self.algo.name}, causal): f returned non-finite values (NaN or inf), or "
                f"the iterate did, at step {step} for samples [{shown}] (causal mode keeps no best iterate: "
                f"this error's .result is None)", stage=self.stage, step=step, samples=idx)
        self.scaled = True  # finite vectors whose squared entries overflow: rescale, this iteration too
        self.gns.pop()
        self.fns.pop()
        self.it = Iterate(self.it.z, fz, g, self._measure(fz - z if self.narrow else g, fz))

    def result(self) -> SolverResult:
        test = self.test
        self._count()
        z, nstep, active = self.it.z, self.nstep, self.active
        if self.out is not None:  # compacted: the samples still working join those that left
            self._write(torch.arange(self.active.shape[0] // self.length, device=z.device))
            z, nstep, active = self.out
        per_position = nstep.view(-1, self.length)
        gn = self.rows.trace(self.gns)
        fn = None if self.fns[0] is None else self.rows.trace(self.fns)
        converged = ~active.view(-1, self.length)[:, -1]
        best_step = torch.where(converged, per_position[:, -1] - 1, gn.shape[0] - 1)
        trace = test.residual(gn, fn)
        steps = torch.arange(gn.shape[0], device=gn.device)[:, None]
        trace = torch.where(steps > best_step, trace.gather(0, best_step[None]), trace)
        return SolverResult(z=_unflatten(z.clone(), self.spec), nstep=per_position.amax(dim=1),
                            residual=trace.gather(0, best_step[None])[0], converged=converged, trace=trace,
                            best_step=best_step, n_iter=gn.shape[0], solver=self.algo.name,
                            stop_mode=test.stop_mode, tol=test.tol, atol=test.atol, rows=self.rows_processed)


def _empty_result(z0: State, spec: _Spec, test: _StopTest, algo: Solver) -> SolverResult:
    """An empty batch: nothing to solve, ``f`` is not called."""
    device = (z0[0] if spec.is_tuple else z0).device
    none = torch.zeros(0, dtype=torch.int64, device=device)
    res = torch.zeros(0, dtype=spec.work_dtype, device=device)
    z = tuple(t.clone() for t in z0) if spec.is_tuple else z0.clone()
    return SolverResult(z=z, nstep=none, residual=res, converged=res > 0, trace=res.reshape(0, 0), best_step=none,
                        n_iter=0, solver=algo.name, stop_mode=test.stop_mode, tol=test.tol, atol=test.atol, rows=0)
