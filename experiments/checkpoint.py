"""Checkpoints you can trust: atomic writes, a checksum verified on load, the previous one kept.

A checkpoint file is one header line and a ``torch.save`` payload::

    DEQCKPT <format> <payload bytes> <sha256 of the payload>\\n<payload>

The payload is a dict of tensors and plain Python values (it loads with
``torch.load(weights_only=True)``); :mod:`experiments.loop` puts the training
state, the model, the optimizer, the gradient scaler, the schedule and the
resolved config in it. :func:`load` names the file and what is wrong with it
when it is missing, empty, not a checkpoint, truncated, damaged (checksum), or
holds non-finite parameters.

Every file this package replaces (checkpoints, ``metrics.jsonl`` after a
resume) goes through :func:`atomic_write`: a temporary ``.NAME.<pid>.tmp`` in
the same directory, flushed and fsync'ed, then ``os.replace`` over the target
(atomic on POSIX and Windows within one file system), so a crash or a kill at
any moment leaves either the old file or the new one. Only a hard kill can
leave the temporary file behind; :func:`remove_stale_temporaries` deletes those
of processes that no longer run.

:func:`save` first moves the current checkpoint to ``checkpoint.prev.pt``, and
:func:`load_latest` falls back to it, with a message, when the newest one is
missing or unreadable.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, BinaryIO

import torch

log = logging.getLogger(__name__)

MAGIC = b"DEQCKPT"
FORMAT = 2
_HEADER_MAX = 256  # bytes; the header is about 100


class CheckpointError(RuntimeError):
    """A checkpoint could not be used; the message names the file and the problem."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """There is no checkpoint at the given path (nor a previous one)."""


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save` keeps the previous checkpoint: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any], *,
                 backup: str | os.PathLike[str] | None = None) -> None:
    """Replace ``path`` by what ``write(file)`` writes, atomically.

    Args:
        path: the destination; its directory is created if needed.
        write: called once with the open temporary file (binary).
        backup: if given and ``path`` exists, ``path`` is moved there just
            before the new file takes its place.

    Raises:
        Whatever ``write`` or the file system raises; ``path`` is then
        unchanged and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
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


def save(state: dict, path: str | os.PathLike[str]) -> None:
    """Write ``state`` to ``path`` with its checksum; the file already there becomes :func:`previous_path`.

    Args:
        state: a dict of tensors and plain Python containers (``weights_only``-loadable).
        path: the checkpoint file.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = b"%s %d %d %s\n" % (MAGIC, FORMAT, len(payload), hashlib.sha256(payload).hexdigest().encode())

    def write(f: BinaryIO) -> None:
        f.write(header)
        f.write(payload)

    atomic_write(path, write, backup=previous_path(path))


def load(path: str | os.PathLike[str]) -> dict:
    """Read and verify a checkpoint written by :func:`save` (tensors on the CPU).

    Raises:
        CheckpointMissing: no file at ``path``.
        CheckpointError: the file is empty, not a deq checkpoint, of another
            format, truncated, damaged (checksum mismatch), not loadable, or
            holds non-finite model parameters; the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointMissing(f"no checkpoint at {path}")
    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"{path} is empty (0 bytes): its write never completed")
    payload = _verified_payload(path, data)
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # the checksum matched, so this is a writer/reader mismatch
        raise CheckpointError(f"{path} passed its checksum but could not be loaded: {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} holds no training state (no 'model' entry)")
    bad = [name for name, t in state["model"].items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{path} holds non-finite model parameters: {', '.join(bad[:3])}{more}")
    return state


def _verified_payload(path: Path, data: bytes) -> memoryview:
    """The payload after the header, checked against the header's length and checksum."""
    end = data.find(b"\n", 0, _HEADER_MAX)
    fields = data[:end].split(b" ") if end > 0 else []
    if len(fields) != 4 or fields[0] != MAGIC:
        raise CheckpointError(f"{path} is not a deq training checkpoint (no '{MAGIC.decode()}' header line; "
                              f"its first bytes are {data[:16]!r})")
    try:
        version, length, digest = int(fields[1]), int(fields[2]), fields[3].decode("ascii")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} has a damaged header line {data[:end]!r}") from err
    if version != FORMAT:
        raise CheckpointError(f"{path} is a format-{version} checkpoint; this version reads format {FORMAT}")
    payload = memoryview(data)[end + 1:]
    if len(payload) < length:
        raise CheckpointError(f"{path} is truncated: {len(payload)} of its {length} payload bytes are there")
    if len(payload) > length:
        raise CheckpointError(f"{path} has {len(payload) - length} bytes more than its header says ({length})")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CheckpointError(f"{path} is damaged: its SHA-256 is {actual[:16]}..., the header says "
                              f"{digest[:16]}...")
    return payload


def load_latest(path: str | os.PathLike[str]) -> tuple[dict, Path]:
    """:func:`load` ``path``, or its :func:`previous_path` (logged as a warning) when ``path`` is unusable.

    Returns:
        ``(state, the file it came from)``.

    Raises:
        CheckpointMissing: neither file exists.
        CheckpointError: neither is usable; the message gives both problems.
    """
    path = Path(path)
    prev = previous_path(path)
    try:
        return load(path), path
    except CheckpointError as newest:
        if not prev.is_file():
            if isinstance(newest, CheckpointMissing):
                raise CheckpointMissing(f"no checkpoint at {path} (nor {prev.name})") from None
            raise
        try:
            state = load(prev)
        except CheckpointError as older:
            raise CheckpointError(f"no usable checkpoint: {newest}; and {older}") from None
        log.warning("%s; using the previous checkpoint %s (step %s) instead", newest, prev,
                    state.get("state", {}).get("step", "?"))
        return state, prev


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def remove_stale_temporaries(directory: str | os.PathLike[str], names: tuple[str, ...]) -> list[Path]:
    """Delete ``.NAME.<pid>.tmp`` files left in ``directory`` by killed writers of the given file names.

    A file whose process still runs (another writer) is left alone.

    Returns:
        The files removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for tmp in sorted(directory.iterdir()):
        match = _STALE.match(tmp.name)
        if match is None or match["name"] not in names or not tmp.is_file():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _running(pid):
            continue
        size = tmp.stat().st_size
        tmp.unlink(missing_ok=True)
        log.info("removed %s (%.1f MB), left by an interrupted write", tmp, size / 1e6)
        removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
