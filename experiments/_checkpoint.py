"""Checkpoints for experiments/train.py: one file, written atomically, resumed bit-exactly.

A checkpoint is one ``torch.save`` file holding everything the next step
depends on: the model, the optimizer, the learning-rate schedule, the step, the
data position (epoch, next segment, the carried memory of every rank), the RNG
states (torch CPU, CUDA when used, numpy, Python ``random``, per rank), the
counters of the non-finite-step guard and the resolved config.

It is written to a temporary file in the target's directory, flushed and
fsync'ed, then moved over the target with ``os.replace`` (atomic on POSIX and
Windows within one file system). A crash or a kill during the write leaves the
previous checkpoint untouched and no temporary file behind (the ``finally``
removes it; only a hard kill between write and cleanup can leave a
``.checkpoint.pt.<pid>.tmp``, never a damaged checkpoint).

Everything stored is a tensor or a plain Python container of numbers and
strings, so the file loads with ``torch.load(weights_only=True)``: the numpy
and Python RNG states are converted to tensors and lists for that reason.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file and ``os.replace``.

    Args:
        obj: anything ``torch.save`` accepts.
        path: the destination; its directory is created if needed.

    Raises:
        Whatever ``torch.save`` or the file system raises; the previous file at
        ``path`` (if any) is then unchanged and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)  # looked up on the module at call time (tests patch it)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str]) -> dict:
    """Load a checkpoint written by :func:`save_atomic` (tensors to CPU, ``weights_only``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deq training checkpoint (format {FORMAT})")
    return state


def rng_state(device: torch.device) -> dict:
    """The RNG states the training step draws from, as checkpoint-safe values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        # uint32 keys as int64: loadable with weights_only on every torch version.
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "cuda": None,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def to_cpu(obj: Any) -> Any:
    """Tensors (in tuples, lists, dicts) moved to the CPU; named tuples become plain tuples."""
    if isinstance(obj, torch.Tensor):
        # clone: a view (e.g. the last mem_len positions) would otherwise save its whole storage
        return obj.detach().cpu().clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_cpu(o) for o in obj) if type(obj) in (tuple, list) else tuple(to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Inverse of :func:`to_cpu` for the carried memory."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
