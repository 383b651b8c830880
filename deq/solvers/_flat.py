"""Flattening a state (a tensor or a tuple of tensors) to the solvers' ``(B, D)`` view and back.

One row per sample; in causal mode one row per (sample, position). Parts
keep their dtypes and memory formats on the way back, and reach ``f``
contiguous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .contract import State

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
    for piece, shape, dtype in zip(pieces, spec.shapes_for(samples), spec.dtypes):
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
