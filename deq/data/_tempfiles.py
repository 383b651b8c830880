"""Temporary files of deq's data writers, and the removal of those a dead process left.

The downloader stages its files in ``ROOT/.<name>-download-<tag>-XXXXXXXX/`` and
the corpus cache writer writes ``.deq-corpus-cache.pt.<tag>.<uuid>.tmp`` next to
the cache. ``<tag>`` is :func:`owner_tag`, ``<pid>@<host>`` of the writer. Both
are removed by their writer on every normal exit and on exceptions, Ctrl-C
included; only a hard kill (``kill -9``, a crash, a power cut) leaves one behind.

Each writer also holds an exclusive ``flock`` on its file or folder while it
works. The kernel drops that lock when the process ends, however it ends.

:func:`remove_stale` removes a leftover only when it is provably stale. All
three conditions must hold:

1. its name matches the writer's pattern (a user's file never matches);
2. nobody holds its lock (checked with a non-blocking ``flock``);
3. either its tag names this host and a pid that is not running here, or
   nothing in it has been modified for ``max_age`` seconds (24 h by default).
   The age rule covers leftovers from another machine that shares the file
   system, and names from before the tag existed. A live writer modifies its
   file every few seconds.

So a writer running in another process, in another container or on another
machine keeps its file. The lock rules out a reused pid number, or a process
that another pid namespace hides from us. The pid test covers the instant
between a writer creating its file and taking the lock.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import stat
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid and age rules still apply
    fcntl = None  # type: ignore[assignment]

MAX_AGE_S = 24 * 3600.0

_log = logging.getLogger("deq.data")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "unknown"


def owner_tag() -> str:
    """``<pid>@<host>`` of this process, for the names of its temporary files."""
    return f"{os.getpid()}@{_host()}"


def hold_lock(fd: int) -> None:
    """Take an exclusive ``flock`` on ``fd`` (best effort); it lasts until ``fd`` is closed.

    A file system without locks (or Windows) leaves the pid and age rules to
    protect the file.
    """
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass


def _pid_running(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: assume it runs
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _locked(path: Path, is_dir: bool) -> bool | None:
    """True when another open file holds ``path``'s flock, False when free, None when unknown."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        return True if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # also releases the lock we may have taken
    return False


def _newest_mtime(path: Path, is_dir: bool) -> float:
    newest = path.lstat().st_mtime
    if is_dir:
        for parent, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
                except OSError:
                    pass
    return newest


def _why_stale(path: Path, match: re.Match, is_dir: bool, max_age: float, now: float) -> str | None:
    """A short reason when ``path`` is provably stale, else None."""
    if _locked(path, is_dir):
        return None
    pid, host = match.group("pid"), match.group("host")
    if pid is not None and host == _host() and not _pid_running(int(pid)):
        return f"left by process {pid}, which is no longer running"
    age = now - _newest_mtime(path, is_dir)
    if age >= max_age:
        return f"untouched for {age / 3600:.0f} h"
    return None


def remove_stale(directory: str | os.PathLike[str], pattern: re.Pattern[str], *, is_dir: bool,
                 max_age: float = MAX_AGE_S) -> list[tuple[Path, str]]:
    """Remove the stale temporary files (or folders) in ``directory`` whose names match ``pattern``.

    Args:
        directory: where the writer puts its temporary files; a missing or
            unreadable directory holds nothing to remove.
        pattern: the writer's name pattern, with the named groups ``pid`` and
            ``host`` (either may match nothing, for names without a tag).
        is_dir: the writer's temporary is a folder (else a regular file);
            entries of the other kind are never touched.
        max_age: seconds without modification after which a leftover whose
            owner cannot be checked here counts as stale.

    Returns:
        ``(path, reason)`` for each entry removed. An entry that cannot be
        removed gives a ``RuntimeWarning`` and is left.
    """
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    now, removed = time.time(), []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        path = Path(entry.path)
        try:
            mode = path.lstat().st_mode
            if not (stat.S_ISDIR(mode) if is_dir else stat.S_ISREG(mode)):
                continue
            reason = _why_stale(path, match, is_dir, max_age, now)
            if reason is None:
                continue
            if is_dir:
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # its writer finished in the meantime
            continue
        except OSError as err:
            warnings.warn(f"could not remove the stale temporary {path}: {err}", RuntimeWarning, stacklevel=2)
            continue
        _log.info("removed stale temporary %s (%s)", path, reason)
        removed.append((path, reason))
    return removed
