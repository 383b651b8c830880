"""The shared solver loop: flattening, the stop test, per-sample stopping, best iterate, counting.

Every root-finder in :mod:`deq.solvers` implements two methods, ``init`` and
``step``, on a flat ``(B, D)`` view of the state. Everything else lives here,
once: calling ``f`` and checking what it returns, counting f-calls per sample,
the stop test, freezing converged samples, keeping the best iterate, the
residual trace and the non-finite check.

**Stop test** (one definition for the whole library), per sample ``b``, with
``g = f(z) - z``::

    converged_b  <=>  ||g_b||_2 <= atol + rtol * ||f(z)_b||_2

the form of NumPy's ``allclose`` and Optimistix, valid at ``z* = 0`` once
``atol > 0``. The two stop modes are its special cases: ``stop_mode="abs"`` is
``atol = tol, rtol = 0``; ``stop_mode="rel"`` is ``rtol = tol`` with the
``atol`` argument (default 0, the plain relative test, which never calls a
point with ``f(z) = 0 != z`` converged but which an iterate tending to
``z* = 0`` may never pass: give ``atol`` there).

**Residual reported** (``SolverResult.residual`` and ``.trace``) in the stop
mode's units::

    abs:  r_b = ||g_b||
    rel:  r_b = ||g_b|| / ||f(z)_b||      (0 where g_b = 0; +inf where f(z)_b = 0 != g_b)

No epsilon is added to the denominator. With ``atol > 0`` a sample may be
``converged`` with ``r_b > tol`` (it passed through ``atol``).

**Best iterate.** The iterate that passed the stop test when there is one
(the sample stops there); otherwise the one with the smallest ``||g||``.
Ordering by ``||g||``, not by ``r_b``, matters for a diverging solve in
``rel`` mode: there the relative residual of a growing iterate falls towards
``(a - 1) / a`` while it runs away, so "lowest relative residual" would
return the most diverged iterate.

**Norms** are taken in the working dtype. Where a norm overflows although the
vector is finite (float32 entries above about ``1.8e19``), the loop switches to
a scaled norm (``max |v| * ||v / max |v|||``) for the rest of the solve; a
vector with NaN/inf entries raises :class:`NonFiniteError` (checked with the
stop test: no extra host sync).

When ``f`` works in a narrower dtype than the solver (bf16/fp16 ``z0``), the
residual is that of the iterate as ``f`` saw it, rounded to ``z0``'s dtype: the
residual reported is the residual of the ``z`` that is returned.

**Mixed precision.** Under ``torch.autocast`` the solver's own arithmetic runs
with autocast disabled, in its float32 (or wider) working dtype, and ``f`` is
called with the caller's autocast state. There ``f`` may return a
lower-precision floating dtype than ``z0`` (what autocast produced); it is cast
to the working dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Sequence, Union

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
        z: the best iterate of each sample (see the module docstring), with the
            structure, shapes, dtypes and memory formats of ``z0``.
        nstep: ``(B,)`` int64, calls of ``f`` charged to each sample (line-search
            calls included; calls made after a sample converged are not charged).
        residual: ``(B,)`` residual of the returned ``z`` in ``stop_mode``.
        converged: ``(B,)`` bool, the stop test at the returned ``z``.
        trace: ``(n_iter, B)`` residual of the current iterate at each iteration
            (a converged sample repeats its last value).
        best_step: ``(B,)`` int64, the iteration at which the returned ``z`` was
            found (0 is ``z0`` itself).
        n_iter: iterations the loop ran (the largest ``best_step`` is below it).
        solver: the solver's name, e.g. ``"anderson"``.
        stop_mode: ``"abs"`` or ``"rel"``.
        tol: the tolerance the solve was run at.
        atol: the absolute tolerance added in ``rel`` mode (0 in ``abs`` mode,
            where ``tol`` is the absolute tolerance).
        rows: the rows ``f`` processed over the solve (each call adds its
            batch size): the honest cost of the batch, where ``nstep`` is that
            of each sample. Without ``compact`` it is ``n_iter * B``; ``None``
            where not counted (the unrolled layer).
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
    atol: float = 0.0
    rows: int | None = None

    def detach(self) -> "SolverResult":
        """This result with every tensor detached from autograd."""
        z = tuple(t.detach() for t in self.z) if isinstance(self.z, tuple) else self.z.detach()
        return dataclasses.replace(self, z=z)

    def summary(self) -> dict[str, float]:
        """Batch statistics as plain floats, for logs (one host sync)."""
        nstep = self.nstep.double()
        res = self.residual.double()
        if nstep.numel() == 0:
            return dict.fromkeys(("nstep_mean", "nstep_max", "residual_mean", "residual_max", "converged_frac"),
                                 math.nan)
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
            tol = f"tol {self.tol:g}" + (f", atol {self.atol:g}" if self.atol else "")
            head += (f", nstep mean {s['nstep_mean']:.3g} max {int(s['nstep_max'])}, max residual "
                     f"{s['residual_max']:.3g} ({tol}, {self.stop_mode}), converged "
                     f"{round(s['converged_frac'] * batch)}/{batch}")
        if self.rows is not None:
            head += f", rows {self.rows}"
        tail = "" if self.backward is None else f", backward={self.backward!r}"
        return f"SolverResult({head}{tail})"


class Iterate(NamedTuple):
    """The current iterate as the loop hands it to :meth:`Solver.step`, flat ``(B, D)``.

    Attributes:
        z: the iterate.
        fz: ``f(z)``.
        g: ``f(z) - z``, computed once per iteration and shared by the loop
            (the stop test) and the solver.
        gn: ``(B,)`` ``||g||`` per sample, of the iterate as ``f`` saw it.
    """

    z: Tensor
    fz: Tensor
    g: Tensor
    gn: Tensor


Evaluate = Callable[[Tensor, Tensor], Tensor]


class Solver:
    """Base class of the root-finders: ``init`` and ``step`` on flat states.

    Subclasses are frozen dataclasses holding the algorithm's options; they keep
    no per-solve data on ``self`` (one object may serve many solves).

    The loop calls ``state = init(it)`` once with the :class:`Iterate` of
    ``z0``, then ``state, z, fz, g = step(state, it, active, evaluate)`` per
    iteration. Tensors are ``(B, D)`` in the working dtype (float32 or wider).
    ``step`` must return ``z`` unchanged for samples where ``active`` is False,
    must obtain ``fz = f(z)`` only through ``evaluate(z, charge)``, which calls
    ``f`` and charges one call to each sample where ``charge`` is True, and
    returns ``g = fz - z`` of the new iterate (computed where it suits the
    solver, e.g. into its own buffer). It may keep references to the tensors
    of ``it`` (the loop never modifies them) and must not modify them in
    place; it returns a new ``z``. Its own buffers it may update in place.
    """

    name: ClassVar[str] = ""

    def init(self, it: Iterate) -> Any:
        raise NotImplementedError  # abstract

    def step(self, state: Any, it: Iterate, active: Tensor,
             evaluate: Evaluate) -> tuple[Any, Tensor, Tensor, Tensor]:
        raise NotImplementedError  # abstract

    def causal(self, length: int) -> "Solver":
        """This solver for causal mode, or ``TypeError`` if it has none.

        In causal mode (``solve(..., time_dim=...)``) the flat state has one
        row per (sample, position), each sample's ``length`` rows consecutive
        and in time order, and ``it.gn`` holds each row's prefix norm
        ``||g_{<= t}||``. Row ``t`` of the new iterate may depend on rows
        ``<= t`` of its own sample only. A solver whose algebra is row by row
        returns itself.
        """
        raise TypeError(f"solver {self.name or type(self).__name__!r} has no causal mode (time_dim=...)")


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

_CHANNELS_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


@dataclass(frozen=True)
class _Spec:
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    sizes: tuple[int, ...]
    # Per part, the dim order in which it is laid out in memory (identity, or
    # channels-last): flattening in that order is a view, and unflattening
    # gives f a tensor with z0's memory format.
    perms: tuple[tuple[int, ...] | None, ...]
    is_tuple: bool
    work_dtype: torch.dtype
    # One (B, D) tensor in the working dtype: flattening is the identity (no op at all).
    plain: bool = False
    # Causal mode: the time dim of every part and its length L. The flat state
    # is then (B L, C): one row per (sample, position), sizes are per position.
    time_dim: int | None = None
    length: int = 1

    @property
    def batch(self) -> int:
        return self.shapes[0][0]

    def samples(self, rows: int) -> int:
        """Samples in a flat state of ``rows`` rows."""
        return rows // self.length

    def shapes_for(self, rows: int) -> tuple[torch.Size, ...]:
        """The part shapes for ``rows`` samples (the working set of an active-set solve)."""
        if rows == self.batch:
            return self.shapes
        return tuple(torch.Size((rows, *shape[1:])) for shape in self.shapes)


def working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 or wider: the dtype solver state is kept in for f's ``dtypes``."""
    out = torch.float32
    for dt in dtypes:
        if not dt.is_floating_point:
            raise TypeError(f"z0 must be floating point, got {dt}")
        out = torch.promote_types(out, dt)
    return out


def _memory_order(t: Tensor) -> tuple[int, ...] | None:
    """The channels-last dim order of ``t`` when it is stored that way (and not also plainly contiguous)."""
    perm = _CHANNELS_LAST.get(t.dim())
    if perm is None or t.is_contiguous():
        return None
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return perm if t.is_contiguous(memory_format=fmt) else None


def _spec_of(z: State, time_dim: int | None = None) -> _Spec:
    parts = z if isinstance(z, tuple) else (z,)
    if len(parts) == 0 or not all(isinstance(t, Tensor) for t in parts):
        raise TypeError("z0 must be a tensor or a non-empty tuple of tensors")
    batch = parts[0].shape[0] if parts[0].dim() > 0 else None
    for t in parts:
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError("every tensor of z0 needs the same leading batch dimension; got shapes "
                             + ", ".join(str(tuple(p.shape)) for p in parts))
    work = working_dtype(*(t.dtype for t in parts))
    if time_dim is not None:
        return _causal_spec(parts, time_dim, work, isinstance(z, tuple))
    return _Spec(shapes=tuple(t.shape for t in parts), dtypes=tuple(t.dtype for t in parts),
                 sizes=tuple(math.prod(t.shape[1:]) for t in parts), perms=tuple(_memory_order(t) for t in parts),
                 is_tuple=isinstance(z, tuple), work_dtype=work,
                 plain=not isinstance(z, tuple) and z.dim() == 2 and z.dtype == work)


def _causal_spec(parts: tuple[Tensor, ...], time_dim: int, work: torch.dtype, is_tuple: bool) -> _Spec:
    if not isinstance(time_dim, int) or isinstance(time_dim, bool):
        raise ValueError(f"time_dim must be an integer (the time axis of the state), got {time_dim!r}")
    dims = [time_dim % t.dim() if -t.dim() <= time_dim < t.dim() else None for t in parts]
    if any(d is None or d == 0 for d in dims):
        raise ValueError(f"time_dim={time_dim} is not a time axis of z0 (shapes "
                         f"{_describe([t.shape for t in parts])}): it must name a dim after the batch dim")
    lengths = {t.shape[d] for t, d in zip(parts, dims)}
    if len(lengths) != 1 or len(set(dims)) != 1:
        raise ValueError(f"every part of z0 needs the same time axis and length along time_dim={time_dim}; "
                         f"got shapes {_describe([t.shape for t in parts])}")
    length = lengths.pop()
    return _Spec(shapes=tuple(t.shape for t in parts), dtypes=tuple(t.dtype for t in parts),
                 sizes=tuple(math.prod(t.shape[1:]) // max(length, 1) for t in parts),
                 perms=(None,) * len(parts), is_tuple=is_tuple, work_dtype=work, time_dim=dims[0], length=length)


def _flatten(z: State, spec: _Spec) -> Tensor:
    if spec.plain and z.dtype == spec.work_dtype:  # under autocast f may return a narrower dtype
        return z
    parts = z if spec.is_tuple else (z,)
    if spec.time_dim is not None:
        # (B, ..., L, ...) -> (B, L, ...) -> (B L, C): a view where time is already dim 1.
        flat = [t.movedim(spec.time_dim, 1).reshape(-1, size) for t, size in zip(parts, spec.sizes)]
        flat = [t if t.dtype == spec.work_dtype else t.to(spec.work_dtype) for t in flat]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
    flat = [(t if perm is None else t.permute(perm)).reshape(t.shape[0], size)
            for t, perm, size in zip(parts, spec.perms, spec.sizes)]
    # ``.to`` only where the dtype differs: on small problems every dispatch counts.
    flat = [t if t.dtype == spec.work_dtype else t.to(spec.work_dtype) for t in flat]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def _unflatten(flat: Tensor, spec: _Spec) -> State:
    """Parts of z0's shapes, dtypes and memory formats; each part contiguous in that format."""
    if spec.plain:
        return flat
    pieces = flat.split(list(spec.sizes), dim=1) if len(spec.sizes) > 1 else (flat,)
    if spec.time_dim is not None:
        return _unflatten_causal(pieces, spec)
    parts = []
    for piece, shape, dtype, perm in zip(pieces, spec.shapes_for(flat.shape[0]), spec.dtypes, spec.perms):
        part = piece.reshape([shape[d] for d in perm] if perm is not None else shape)
        if part.dtype != dtype:
            part = part.to(dtype)
        elif len(pieces) > 1:
            # A split of the flat state is a strided view; f may .view() its parts.
            part = part.contiguous()
        if perm is not None:
            part = part.permute([perm.index(d) for d in range(len(perm))])
        parts.append(part)
    return tuple(parts) if spec.is_tuple else parts[0]


def _unflatten_causal(pieces: Sequence[Tensor], spec: _Spec) -> State:
    samples, parts = spec.samples(pieces[0].shape[0]), []
    for piece, shape, dtype in zip(pieces, spec.shapes_for(spec.samples(pieces[0].shape[0])), spec.dtypes):
        rest = [n for d, n in enumerate(shape) if d not in (0, spec.time_dim)]
        part = piece.reshape(samples, spec.length, *rest).movedim(1, spec.time_dim)
        part = part.to(dtype, memory_format=torch.contiguous_format) if part.dtype != dtype else part.contiguous()
        parts.append(part)
    return tuple(parts) if spec.is_tuple else parts[0]


def _describe(spec_shapes: Sequence[torch.Size]) -> str:
    return ", ".join(str(tuple(s)) for s in spec_shapes)


def _check_output(out: Any, spec: _Spec, autocast: bool, rows: int) -> None:
    """f(z) must have the structure and shapes of z (``rows`` samples), and z0's dtypes (or, under autocast,
    floating ones)."""
    expected = spec.shapes_for(rows)
    if not spec.is_tuple and isinstance(out, Tensor) and out.shape == expected[0] and out.dtype == spec.dtypes[0]:
        return
    parts = out if isinstance(out, tuple) else (out,)
    if isinstance(out, tuple) != spec.is_tuple or len(parts) != len(spec.shapes) or not all(
            isinstance(t, Tensor) for t in parts):
        kind = f"a tuple of {len(spec.shapes)} tensors" if spec.is_tuple else "a tensor"
        raise ValueError(f"f must return {kind} like z0 (shapes {_describe(spec.shapes)}), got "
                         f"{type(out).__name__}" + (f" of length {len(parts)}" if isinstance(out, tuple) else ""))
    shapes = tuple(t.shape for t in parts)
    if shapes != expected:
        given = "z0 has shape" if expected == spec.shapes else "the rows of z it was given have shape"
        raise ValueError(f"f returned shape {_describe(shapes)} but {given} {_describe(expected)}; "
                         "f(z) must have the shape of z")
    dtypes = tuple(t.dtype for t in parts)
    if dtypes != spec.dtypes and not (autocast and all(dt.is_floating_point for dt in dtypes)):
        raise ValueError(f"f returned dtype {', '.join(map(str, dtypes))} (shape {_describe(shapes)}) but z0 has "
                         f"dtype {', '.join(map(str, spec.dtypes))} (shape {_describe(spec.shapes)})")


# ----------------------------------------------------------------------------
# Norms, the stop test and the residual.

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


def _check_budget(tol: float, max_iter: int, stop_mode: str, atol: float = 0.0) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; known: {', '.join(STOP_MODES)}")
    if not (isinstance(atol, (int, float)) and not isinstance(atol, bool) and atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    if atol and stop_mode == "abs":
        raise ValueError(f"atol={atol!r} applies to stop_mode='rel' (converged when ||f(z) - z|| <= atol + tol "
                         "||f(z)||); with stop_mode='abs', tol itself is the absolute tolerance")


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


class _Loop:
    """One solve's bookkeeping: the stop test, the best iterate, counts, the raw trace, the active set.

    Per iteration (:meth:`record`) about ten small tensor ops; every
    ``check_every`` iterations one host sync (:meth:`check`), which also
    compacts the working set in active-set mode.
    """

    def __init__(self, f: Callable, spec: _Spec, test: _StopTest, algo: Solver, stage: str, device: torch.device,
                 amp: _Autocast, *, compact: float | None, check_every: int):
        self.f, self.spec, self.test, self.algo, self.stage, self.amp = f, spec, test, algo, stage, amp
        self.compact, self.check_every = compact, check_every
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
        if self.n_iter % self.check_every == 0:
            self.check()
        else:
            # Unchecked rows may be NaN: where() keeps them out of the best iterate.
            self.best_z = torch.where(improved[:, None], seen, self.best_z)
            self.improved = None

    def check(self, *, final: bool = False) -> None:
        """The host sync: whether any sample goes on; raises on non-finite values; compacts (not when final)."""
        masked = torch.where(self.active, self.excess, self.minus_one)
        if self.compact is None:
            worst, n_active = masked.max().item(), None
        else:
            units = self._units()
            worst, n_active = torch.stack([masked.max(), units.sum().to(masked.dtype)]).tolist()
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
        if self.n_iter % self.check_every == 0:
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


COMPACT_THRESHOLD = 0.95


def _compact_threshold(compact: bool | float) -> float | None:
    if compact is False:
        return None
    if compact is True:
        return COMPACT_THRESHOLD
    if isinstance(compact, (int, float)) and not isinstance(compact, bool) and 0 < compact <= 1:
        return float(compact)
    raise ValueError(f"compact must be True, False or a threshold in (0, 1], got {compact!r}")


def _check_interval(check_every: int | str, device: torch.device) -> int:
    if check_every == "auto":
        # A host sync costs next to nothing on the CPU; on an accelerator it
        # drains the launch queue, and a few unneeded iterations (frozen, not
        # charged) are cheaper than a stall per iteration.
        return 1 if device.type == "cpu" else 4
    if isinstance(check_every, int) and not isinstance(check_every, bool) and check_every >= 1:
        return check_every
    raise ValueError(f"check_every must be an integer >= 1 or 'auto', got {check_every!r}")


@torch.no_grad()
def solve(f: Callable[..., State], z0: State, *, solver: "Solver | str" = "anderson",
          tol: float = 1e-4, max_iter: int = 50, stop_mode: str = "rel", atol: float = 0.0,
          compact: bool | float = False, check_every: int | str = 1, time_dim: int | None = None,
          stage: str = "forward") -> SolverResult:
    """Find z* = f(z*) for each sample of a batch.

    Solves ``z = f(z)`` (equivalently the root of ``g(z) = f(z) - z``) with a
    registered root-finder, per sample: each sample stops when it passes the
    stop test ``||f(z) - z|| <= atol + rtol ||f(z)||`` (module docstring),
    after which it no longer changes and no more f-calls are charged to it;
    the loop ends when every sample has stopped or after ``max_iter``
    iterations. Runs under ``torch.no_grad``.

    Args:
        f: maps a state to a state of the same structure, shapes and dtypes.
            Batch dimension first: ``(B, ...)`` or a tuple of ``(B, ...)``.
            With ``compact``, called as ``f(z, rows)`` (see there).
        z0: initial guess, a tensor or a tuple of tensors, batch first. Each
            part reaches ``f`` contiguous, in its memory format (channels-last
            stays channels-last).
        solver: a :class:`Solver` object or a name from :func:`solver_names`.
        tol: the tolerance: ``rtol`` in ``rel`` mode, ``atol`` in ``abs`` mode.
        max_iter: iterations at most; each is one call of ``f`` on the batch
            (a line-search trial is an iteration too). The call ``f(z0)`` is
            the first iteration.
        stop_mode: ``"rel"`` or ``"abs"``.
        atol: ``rel`` mode only: the absolute term of the stop test (0: the
            plain relative test). Needed where ``z* = 0``, where the relative
            residual does not tend to 0.
        compact: active-set mode, for a batch-separable ``f`` (no operation
            across samples, e.g. no BatchNorm in training mode). Once the share
            of still-iterating samples in the working set falls to the
            threshold (``True``: 0.95; a float in ``(0, 1]``: that share; 1
            compacts whenever a sample stops), the stopped ones are dropped and
            ``f`` runs on the rest only. ``f`` is then called as
            ``f(z, rows)``: ``rows`` is ``None`` for the whole batch, else the
            ``(b,)`` int64 batch indices (ascending) of the ``b`` rows of
            ``z``; ``f`` must slice whatever per-sample data it closes over
            with it. Results equal those of the full batch (up to the rounding
            of batched kernels); ``SolverResult.rows`` counts the rows ``f``
            processed.
        check_every: host syncs (the stop and finiteness check) every this many
            iterations (``"auto"``: 1 on the CPU, 4 on an accelerator). Per-
            sample results do not depend on it: a sample that stops between two
            checks is frozen and charged nothing more; only ``n_iter`` (and the
            rows of a batch that is already done) may grow by up to
            ``check_every - 1``.
        time_dim: causal mode, for a state with a time axis (the same dim of
            every part) and an ``f`` whose output at position ``t`` depends on
            positions ``<= t`` only: the solve keeps that property exactly, at
            every iteration count and tolerance. Stopping is by prefix
            (position ``t`` freezes once the positions ``<= t`` pass the test;
            a sample stops when all its positions have), the solver works per
            position (Anderson mixes with coefficients fitted on each
            position's prefix; Broyden keeps one low-rank inverse Jacobian
            per position; see :class:`_CausalLoop` for the returned iterate).
            ``nstep``, ``residual``, ``converged`` and ``trace`` are per sample,
            taken on the whole sequence. With ``compact``, a sample leaves the
            working set once all its positions have stopped.
        stage: a name used in error messages (``"forward"``, ``"backward"``).

    Returns:
        A :class:`SolverResult`. Non-convergence is not an error: see
        ``converged`` and ``residual``. An empty batch returns an empty
        result without calling ``f``.

    Raises:
        ValueError: ``f`` returned another structure, shape or dtype than ``z0``,
            unknown solver name or stop mode, invalid ``tol``/``max_iter``/``atol``/
            ``compact``/``check_every``.
        NonFiniteError: ``f`` returned NaN/inf for a sample still iterating (or
            the solver's iterate overflowed); ``err.result`` holds the best
            finite iterates found before.

    Example:
        >>> res = solve(torch.cos, torch.zeros(4, 1), solver="anderson", tol=1e-8)
        >>> round(res.z[0, 0].item(), 6)
        0.739085
    """
    algo = get_solver(solver)
    _check_budget(tol, max_iter, stop_mode, atol)
    spec = _spec_of(z0, time_dim)
    device = (z0[0] if spec.is_tuple else z0).device
    if time_dim is not None:
        algo = algo.causal(spec.length)
    test = _StopTest(stop_mode, tol, float(atol))
    loop_options = dict(compact=_compact_threshold(compact), check_every=_check_interval(check_every, device))
    if spec.batch == 0:
        return _empty_result(z0, spec, test, algo)
    amp = _Autocast.capture(device)
    loop = (_Loop if time_dim is None else _CausalLoop)(f, spec, test, algo, stage, device, amp, **loop_options)
    with amp.outside():
        loop.start(_flatten(z0, spec))
        while loop.keep_going and loop.n_iter < max_iter:
            loop.record(*algo.step(loop.state, loop.it, loop.active, loop.evaluate))
        if loop.improved is not None or loop.n_iter % loop.check_every:
            loop.check(final=True)  # the last iterate's check, when the interval skipped it
        return loop.result()
