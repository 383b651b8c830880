"""Word-level corpora: Penn Treebank, WikiText-2, WikiText-103 and two CPU samples.

Layouts (``ROOT`` is the ``root`` argument of :func:`load_corpus`, the same
directory the download command is given with ``--root``)::

    ROOT/ptb/ptb.{train,valid,test}.txt                 Mikolov's PTB (10k words)
    ROOT/wikitext-2/wiki.{train,valid,test}.tokens      WikiText-2 (tokenised, v1)
    ROOT/wikitext-103/wiki.{train,valid,test}.tokens    WikiText-103 (tokenised, v1)
    ROOT/ptb-sample/ptb.{valid,test}.txt                CPU sample, shipped in shared/data
    ROOT/wikitext-2-sample/{valid,test}.txt             CPU sample, shipped in shared/data

Tokenisation is the one every published PTB/WikiText number uses: each line is
split on whitespace (``str.split()``, case kept) and ``<eos>`` is appended at
the end of every line, so an empty line contributes exactly one ``<eos>``.
Both corpora already map rare words to ``<unk>``; no other special token is
added. Files are read as UTF-8. A file that is not UTF-8 text (Latin-1, or a
binary file: one with a NUL byte in its first 8000 bytes, git's test) and a
split without a single word are errors that name the corpus, the split and
the file.

The vocabulary is counted on the training split only. Its order is fixed:
descending count, ties broken by first appearance in the counted files (read
in split order). Frequent words get small ids, which adaptive softmax cutoffs
rely on. A valid/test token outside the vocabulary becomes ``<unk>`` when the
vocabulary has ``<unk>``; otherwise it is a ``ValueError`` naming the token
and the file. (PTB and WikiText have no such tokens by construction.)

The two samples (``ptb-sample``, ``wikitext-2-sample``) hold only the public
validation and test splits. They train on the test file and validate on the
validation file, with the vocabulary counted on both (train file first) so
that there is no OOV token. They exist for CPU smoke runs and tests: a number
measured on them is not a reportable PTB/WikiText result, and they have no
``test`` split.

Tokenised corpora are cached as ``deq-corpus-cache.pt`` in the corpus
directory, keyed on the name, size and mtime of every source file; a changed
file invalidates what was built from it. The cache is written atomically
(temporary file, then ``os.replace``) and skipped silently when the directory
is read-only (no write permission, or no write bit at all). Loaders running
at the same time (e.g. one per DDP rank) are safe: each writes its own
temporary file and the last rename wins. A temporary file that a killed loader
left (``.deq-corpus-cache.pt.<pid>@<host>.<uuid>.tmp``) is removed by the next
load once it is provably stale (see :mod:`deq.data._tempfiles`); a loader
still writing keeps its own. The samples are never cached: they tokenise in a
fraction of a second.
"""

from __future__ import annotations

import array
import codecs
import os
import re
import stat
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ._tempfiles import hold_lock, owner_tag, remove_stale

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
CACHE_NAME = "deq-corpus-cache.pt"
# Bump when the tokenisation or the cache layout changes: old caches are then rebuilt.
_CACHE_FORMAT = 1
# The cache writer's temporary files; names without "@host" come from earlier versions.
CACHE_TMP_PATTERN = re.compile(r"\." + re.escape(CACHE_NAME) + r"\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9.-]+))?"
                               r"\.[0-9a-f]{32}\.tmp")
_BINARY_PROBE = 8000  # bytes searched for a NUL, as git does to call a file binary


@dataclass(frozen=True)
class _Spec:
    """Where a corpus lives and how its vocabulary is built."""

    files: dict[str, str]  # split -> file name inside ROOT/<name>
    vocab_from: tuple[str, ...]  # splits whose tokens are counted for the vocabulary
    downloadable: bool
    cached: bool = True  # the samples are tiny (0.1 s) and live in a shared read-only directory
    note: str = ""


_SPECS: dict[str, _Spec] = {
    "ptb": _Spec(
        files={"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
        vocab_from=("train",), downloadable=True),
    "wikitext-2": _Spec(
        files={s: f"wiki.{s}.tokens" for s in SPLITS}, vocab_from=("train",), downloadable=True),
    "wikitext-103": _Spec(
        files={s: f"wiki.{s}.tokens" for s in SPLITS}, vocab_from=("train",), downloadable=True),
    "ptb-sample": _Spec(
        files={"train": "ptb.test.txt", "valid": "ptb.valid.txt"}, vocab_from=("train", "valid"),
        downloadable=False, cached=False,
        note="The samples are not downloaded: they ship in the repository's shared/data directory "
             "(pass that directory as root)."),
    "wikitext-2-sample": _Spec(
        files={"train": "test.txt", "valid": "valid.txt"}, vocab_from=("train", "valid"),
        downloadable=False, cached=False,
        note="The samples are not downloaded: they ship in the repository's shared/data directory "
             "(pass that directory as root)."),
}

CORPORA = tuple(_SPECS)


def download_command(name: str, root: str | os.PathLike[str]) -> str:
    """The shell command that fetches corpus ``name`` into ``root``."""
    return f"python -m deq.data.download {name} --root {root}"


class Vocab:
    """A fixed token <-> id map.

    Ids are ``0 .. len(vocab) - 1`` in the order of ``itos``. Vocabularies built
    by :func:`load_corpus` are ordered by descending count, ties broken by first
    appearance.

    Args:
        itos: the tokens, id ``i`` is ``itos[i]``; no duplicates.
        counts: optional occurrence count of each token in the files the
            vocabulary was built from (same order as ``itos``).

    Raises:
        ValueError: duplicate tokens, or ``counts`` of the wrong length.

    Example:
        >>> v = Vocab(["the", "<eos>", "cat"])
        >>> v.encode(["the", "cat"]).tolist(), v.decode([2, 1])
        ([0, 2], ['cat', '<eos>'])
    """

    def __init__(self, itos: Sequence[str], *, counts: Sequence[int] | None = None) -> None:
        self._itos = tuple(itos)
        self._stoi = {tok: i for i, tok in enumerate(self._itos)}
        if len(self._stoi) != len(self._itos):
            dup = next(t for i, t in enumerate(self._itos) if self._stoi[t] != i)
            raise ValueError(f"Vocab: token {dup!r} appears more than once in itos")
        if counts is not None and len(counts) != len(self._itos):
            raise ValueError(f"Vocab: {len(counts)} counts for {len(self._itos)} tokens")
        self._counts = None if counts is None else tuple(int(c) for c in counts)

    @property
    def itos(self) -> tuple[str, ...]:
        """Tokens in id order."""
        return self._itos

    @property
    def stoi(self) -> dict[str, int]:
        """Token -> id (a copy; the vocabulary is immutable)."""
        return dict(self._stoi)

    @property
    def counts(self) -> tuple[int, ...] | None:
        """Occurrence counts in id order, or ``None`` when not known."""
        return self._counts

    @property
    def eos_id(self) -> int | None:
        """Id of ``<eos>``, or ``None`` when the vocabulary has none."""
        return self._stoi.get(EOS)

    @property
    def unk_id(self) -> int | None:
        """Id of ``<unk>``, or ``None`` when the vocabulary has none."""
        return self._stoi.get(UNK)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self._itos == other._itos and self._counts == other._counts

    def __hash__(self) -> int:
        return hash(self._itos)

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self._itos[:5])
        return f"Vocab(size={len(self)}, first=[{head}{', ...' if len(self) > 5 else ''}])"

    def token_to_id(self, token: str) -> int:
        """Id of ``token``; ``<unk>``'s id when unknown and the vocabulary has ``<unk>``.

        Raises:
            KeyError: ``token`` is unknown and there is no ``<unk>``.
        """
        i = self._stoi.get(token)
        if i is None:
            i = self.unk_id
            if i is None:
                raise KeyError(f"token {token!r} is not in the vocabulary and it has no {UNK!r}")
        return i

    def id_to_token(self, index: int) -> str:
        """Token of id ``index``."""
        return self._itos[index]

    def encode(self, tokens: Iterable[str]) -> Tensor:
        """Ids of ``tokens`` as a 1-D LongTensor (unknown tokens as in :meth:`token_to_id`)."""
        return torch.tensor([self.token_to_id(t) for t in tokens], dtype=torch.long)

    def decode(self, ids: Tensor | Iterable[int]) -> list[str]:
        """Tokens of a 1-D sequence of ids."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        return [self._itos[int(i)] for i in ids]


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus: a vocabulary and one 1-D LongTensor of ids per split.

    Attributes:
        name: the corpus name given to :func:`load_corpus`.
        vocab: the :class:`Vocab` (counted on the training split).
        train, valid, test: ``(N,)`` int64 ids of the whole split, lines
            concatenated in file order with ``<eos>`` after each; ``None`` for a
            split that was not requested or that the corpus does not have.
        files: split -> the file it was read from, for every split returned
            (for error messages downstream, e.g. ``batchify(..., name=...)``).
    """

    name: str
    vocab: Vocab
    train: Tensor | None = None
    valid: Tensor | None = None
    test: Tensor | None = None
    files: Mapping[str, Path] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={None if getattr(self, s) is None else getattr(self, s).numel()}"
                          for s in SPLITS)
        return f"Corpus(name={self.name!r}, vocab_size={len(self.vocab)}, {sizes})"


class _FirstSeen(dict):
    """token -> index in order of first appearance; a lookup of a new token inserts it.

    ``map(index.__getitem__, tokens)`` then runs at C speed for known tokens.
    """

    def __missing__(self, token: str) -> int:
        i = self[token] = len(self)
        return i


class _Lookup(dict):
    """token -> final id for a fixed vocabulary; unknown tokens go to ``<unk>`` or raise."""

    def __init__(self, stoi: dict[str, int], *, path: Path, vocab_files: Sequence[Path]) -> None:
        super().__init__(stoi)
        self.unk_id = stoi.get(UNK)
        self.path = path
        self.vocab_files = vocab_files

    def __missing__(self, token: str) -> int:
        if self.unk_id is None:
            names = ", ".join(str(p) for p in self.vocab_files)
            raise ValueError(f"token {token!r} in {self.path} is not in the vocabulary (built from {names}) "
                             f"and the vocabulary has no {UNK!r} to map it to")
        return self.unk_id


def _first_bad_utf8(path: Path) -> tuple[int, int, int]:
    """(byte offset, line number, byte value) of the first byte of ``path`` that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                return offset + err.start, lines + chunk.count(b"\n", 0, err.start), chunk[err.start]
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return offset, lines, -1


def _check_text(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(_BINARY_PROBE)
    nul = head.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{path} is a binary file, not a text corpus (a NUL byte at offset {nul}); "
                         f"check that it is the right file")


def _tokenise(path: Path, index: dict[str, int], what: str) -> np.ndarray:
    """:func:`_read_ids`, with ``what`` (e.g. ``"ptb train split"``) in front of its error messages."""
    try:
        return _read_ids(path, index)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err


def _read_ids(path: Path, index: dict[str, int]) -> np.ndarray:
    """Token ids of ``path`` through ``index`` (``<eos>`` after every line), as int32.

    Raises:
        ValueError: ``path`` is binary, is not UTF-8, holds no word, or has a
            token ``index`` refuses; the message names the file.
    """
    _check_text(path)
    ids = array.array("i")
    if ids.itemsize != 4:  # C int is 4 bytes on every platform torch supports; keep the dtype honest
        ids = array.array("l")
    extend, append, get = ids.extend, ids.append, index.__getitem__
    lines = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lines, line in enumerate(f, 1):
                extend(map(get, line.split()))
                append(get(EOS))
    except UnicodeDecodeError as err:
        offset, line_no, byte = _first_bad_utf8(path)
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{byte:02x} at offset {offset} (line {line_no}) "
                         f"is not valid UTF-8. Corpora are read as UTF-8; convert the file (e.g. "
                         f"iconv -f latin1 -t utf-8) or check that it is the right file") from err
    if len(ids) == lines:  # nothing but the <eos> of each line
        size = path.stat().st_size
        raise ValueError(f"{path} holds no word ({size} bytes, {lines} lines); a split cannot be empty")
    if ids.itemsize == 4:
        return np.frombuffer(ids, dtype=np.int32)  # no copy: the array keeps the buffer alive
    return np.frombuffer(ids, dtype=np.int64).astype(np.int32)


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (path.name, st.st_size, st.st_mtime_ns)


def _load_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated or foreign file: rebuild rather than fail
        warnings.warn(f"ignoring unreadable corpus cache {path}: {err}", RuntimeWarning, stacklevel=3)
        return None
    if not isinstance(cache, dict) or cache.get("format") != _CACHE_FORMAT:
        return None
    return cache


def _writable(directory: Path) -> bool:
    # A directory without write bits is read-only by intent, even for root (who passes os.access).
    return os.access(directory, os.W_OK) and bool(stat.S_IMODE(directory.stat().st_mode) & 0o222)


def _save_cache(path: Path, cache: dict) -> None:
    directory = path.parent
    if not _writable(directory):
        return
    # A unique name in the same directory (so os.replace is atomic), created with mode 0o666 so the
    # cache gets the user's umask like any other file, unlike tempfile.mkstemp's 0o600.
    tmp = directory / f".{CACHE_NAME}.{owner_tag()}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        hold_lock(fd)  # until the file is closed: a concurrent loader's clean-up leaves it alone
        with os.fdopen(fd, "wb") as f:
            torch.save(cache, f)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write corpus cache {path}: {err}", RuntimeWarning, stacklevel=3)
    finally:
        if tmp.exists():
            tmp.unlink()


def _build_vocab(paths: Sequence[Path], whats: Sequence[str]) -> tuple[Vocab, list[np.ndarray]]:
    """Count ``paths`` into a vocabulary ordered by (-count, first appearance); also return their ids."""
    first_seen = _FirstSeen()
    raw = [_tokenise(p, first_seen, what) for p, what in zip(paths, whats)]
    n = len(first_seen)
    counts = np.zeros(n, dtype=np.int64)
    for r in raw:  # per file: no concatenated copy of a 100M-token train split
        counts += np.bincount(r, minlength=n)
    order = np.lexsort((np.arange(n), -counts))  # last key is primary: count desc, then first index
    remap = np.empty(n, dtype=np.int32)
    remap[order] = np.arange(n, dtype=np.int32)
    tokens = list(first_seen)
    vocab = Vocab([tokens[i] for i in order], counts=counts[order].tolist())
    return vocab, [remap[r] for r in raw]


def load_corpus(name: str, root: str | os.PathLike[str], *, splits: Sequence[str] | None = None,
                cache: bool = True) -> Corpus:
    """Load (tokenise, or read from the cache) corpus ``name`` from ``root/name``.

    Args:
        name: one of ``"ptb"``, ``"wikitext-2"``, ``"wikitext-103"``,
            ``"ptb-sample"``, ``"wikitext-2-sample"``.
        root: directory holding one folder per corpus, as laid out by
            ``python -m deq.data.download NAME --root ROOT`` (the samples:
            the repository's ``shared/data``).
        splits: which of ``"train"``, ``"valid"``, ``"test"`` to return; the
            others are ``None`` in the result. Default: every split the corpus
            has. The vocabulary always comes from the training split (both
            files for a sample), whatever is requested.
        cache: read and write ``root/name/deq-corpus-cache.pt``, and remove
            the stale temporary files of killed cache writers there (ignored
            for the samples, which are never cached).

    Returns:
        A :class:`Corpus` with int64 id tensors and the file of each split.

    Raises:
        ValueError: unknown ``name`` or split (the message lists the known
            ones); or a file that is not UTF-8 text, is binary, holds no word,
            or has an out-of-vocabulary token with no ``<unk>`` to map it to
            (these name the corpus, the split and the file).
        FileNotFoundError: a needed file is missing; the message names the
            directory, the missing files, their splits and the download command.

    Example:
        >>> corpus = load_corpus("ptb", "data")          # doctest: +SKIP
        >>> len(corpus.vocab), corpus.train.shape          # doctest: +SKIP
        (10000, torch.Size([929589]))
    """
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    wanted = _wanted_splits(name, spec, splits)
    directory = Path(root) / name
    needed = tuple(dict.fromkeys(spec.vocab_from + wanted))
    _check_present(name, spec, root, needed)
    paths = {s: directory / spec.files[s] for s in needed}
    whats = {s: f"{name} {s} split" for s in needed}
    keys = {s: _file_key(paths[s]) for s in needed}
    vocab_key = [keys[s] for s in spec.vocab_from]
    cache_path = directory / CACHE_NAME

    cache = cache and spec.cached
    if cache and _writable(directory):
        remove_stale(directory, CACHE_TMP_PATTERN, is_dir=False)
    stored = _load_cache(cache_path) if cache else None
    if stored is not None and (stored.get("name") != name or stored.get("vocab_key") != vocab_key):
        stored = None  # the vocabulary's sources changed: nothing built from them is valid
    dirty = stored is None
    if stored is None:
        vocab, vocab_ids = _build_vocab([paths[s] for s in spec.vocab_from], [whats[s] for s in spec.vocab_from])
        stored = {"format": _CACHE_FORMAT, "name": name, "vocab_key": vocab_key, "itos": list(vocab.itos),
                  "counts": list(vocab.counts or ()), "splits": {}}
        for s, ids in zip(spec.vocab_from, vocab_ids):
            stored["splits"][s] = {"key": keys[s], "ids": torch.from_numpy(ids)}
    else:
        vocab = Vocab(stored["itos"], counts=stored["counts"])

    out: dict[str, Tensor] = {}
    for s in wanted:
        entry = stored["splits"].get(s)
        if entry is None or tuple(entry["key"]) != keys[s]:
            lookup = _Lookup(vocab.stoi, path=paths[s], vocab_files=[paths[v] for v in spec.vocab_from])
            entry = {"key": keys[s], "ids": torch.from_numpy(_tokenise(paths[s], lookup, whats[s]))}
            stored["splits"][s] = entry
            dirty = True
        out[s] = entry["ids"].long()
    if cache and dirty:
        _save_cache(cache_path, stored)
    return Corpus(name=name, vocab=vocab, **out, files={s: paths[s] for s in wanted})


def _wanted_splits(name: str, spec: _Spec, splits: Sequence[str] | None) -> tuple[str, ...]:
    if splits is None:
        return tuple(spec.files)
    if isinstance(splits, str):
        raise TypeError(f"splits must be a sequence of split names, not the string {splits!r}")
    wanted = tuple(dict.fromkeys(splits))
    bad = [s for s in wanted if s not in spec.files]
    if bad:
        raise ValueError(f"corpus {name!r} has no split {bad[0]!r}; its splits: {', '.join(spec.files)}")
    return wanted


def _check_present(name: str, spec: _Spec, root: str | os.PathLike[str], needed: Sequence[str]) -> None:
    directory = Path(root) / name
    missing = [s for s in needed if not (directory / spec.files[s]).is_file()]
    if not missing:
        return
    msg = (f"{name}: missing {', '.join(spec.files[s] for s in missing)} in {directory} "
           f"(the {', '.join(missing)} split{'s' if len(missing) > 1 else ''}).")
    if spec.downloadable:
        msg += f" Download it with: {download_command(name, root)}"
    else:
        msg += f" {spec.note}"
    raise FileNotFoundError(msg)
