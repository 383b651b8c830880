"""Tests for deq.data: corpora, vocabulary, cache, batching, copy memory, download (offline)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import zipfile
from pathlib import Path

import pytest
import torch

import deq.data.corpus as corpus_mod
import deq.data.download as dl
from deq.data import (CORPORA, CopyMemory, Corpus, Segments, Vocab, batchify, copy_memory_batch,
                      download_command, load_corpus, perplexity, recall_accuracy)
from deq.data.corpus import CACHE_NAME

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _ptb(root: Path, train: str = "a b a\nc a b\n", valid: str = "b c\n", test: str = "a\n") -> Path:
    d = root / "ptb"
    _write(d / "ptb.train.txt", train)
    _write(d / "ptb.valid.txt", valid)
    _write(d / "ptb.test.txt", test)
    return d


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the shared test data is missing: {SHARED_DATA}")
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the file names the tokeniser reads."""
    reads: list[str] = []
    real = corpus_mod._read_ids

    def spy(path, index):
        reads.append(Path(path).name)
        return real(path, index)

    monkeypatch.setattr(corpus_mod, "_read_ids", spy)
    return reads


# ---------------------------------------------------------------- vocabulary and corpora


def test_ptb_ids_vocab_order_and_eos(tmp_path: Path) -> None:
    _ptb(tmp_path)
    c = load_corpus("ptb", tmp_path)
    # counts on train: a 3, b 2, <eos> 2, c 1; the b/<eos> tie goes to first appearance (b).
    assert c.vocab.itos == ("a", "b", "<eos>", "c")
    assert c.vocab.counts == (3, 2, 2, 1)
    assert c.vocab.eos_id == 2 and c.vocab.unk_id is None
    assert c.train.tolist() == [0, 1, 0, 2, 3, 0, 1, 2]
    assert c.valid.tolist() == [1, 3, 2]
    assert c.test.tolist() == [0, 2]
    assert c.train.dtype == torch.long and c.name == "ptb"
    assert "vocab_size=4" in repr(c)


def test_wikitext_empty_lines_case_and_last_line(tmp_path: Path) -> None:
    d = tmp_path / "wikitext-2"
    # An empty line and a blank line each give one <eos>; case is kept; a last line without
    # a newline still ends with <eos>.
    _write(d / "wiki.train.tokens", " \n = Title = \n\n The the THE\n <unk> x")
    _write(d / "wiki.valid.tokens", "\nthe\n")
    _write(d / "wiki.test.tokens", "x")
    c = load_corpus("wikitext-2", tmp_path)
    v = c.vocab
    assert v.itos[0] == "<eos>" and v.counts[0] == 5
    assert c.vocab.decode(c.train) == ["<eos>", "=", "Title", "=", "<eos>", "<eos>", "The", "the", "THE",
                                       "<eos>", "<unk>", "x", "<eos>"]
    assert v.decode(c.valid) == ["<eos>", "the", "<eos>"]
    assert v.decode(c.test) == ["x", "<eos>"]
    assert v.itos == ("<eos>", "=", "Title", "The", "the", "THE", "<unk>", "x")


def test_splits_argument(tmp_path: Path) -> None:
    _ptb(tmp_path)
    c = load_corpus("ptb", tmp_path, splits=["valid"])
    assert c.train is None and c.test is None
    assert c.valid.tolist() == [1, 3, 2]  # vocabulary still counted on train
    with pytest.raises(ValueError, match="no split 'dev'.*train, valid, test"):
        load_corpus("ptb", tmp_path, splits=["dev"])
    with pytest.raises(TypeError, match="sequence of split names"):
        load_corpus("ptb", tmp_path, splits="valid")


def test_unknown_corpus_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corpus 'ptb2'.*wikitext-103"):
        load_corpus("ptb2", tmp_path)
    assert set(CORPORA) == {"ptb", "wikitext-2", "wikitext-103", "ptb-sample", "wikitext-2-sample"}


@pytest.mark.parametrize("name", ["ptb", "wikitext-2", "wikitext-103"])
def test_missing_files_error_names_dir_files_and_command(tmp_path: Path, name: str) -> None:
    cmd = f"python -m deq.data.download {name} --root {tmp_path}"
    assert download_command(name, tmp_path) == cmd
    with pytest.raises(FileNotFoundError, match=re.escape(cmd)) as info:
        load_corpus(name, tmp_path)
    msg = str(info.value)
    assert str(tmp_path / name) in msg
    for f in corpus_mod._SPECS[name].files.values():
        assert f in msg


def test_missing_file_lists_only_missing(tmp_path: Path) -> None:
    _ptb(tmp_path)
    (tmp_path / "ptb" / "ptb.test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing ptb\.test\.txt in") as info:
        load_corpus("ptb", tmp_path)
    assert "ptb.train.txt" not in str(info.value)
    assert load_corpus("ptb", tmp_path, splits=["train", "valid"]).test is None


def test_missing_sample_points_to_shared_data(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ptb.test.txt, ptb.valid.txt.*shared/data") as info:
        load_corpus("ptb-sample", tmp_path)
    assert "deq.data.download" not in str(info.value)


def test_oov_maps_to_unk(tmp_path: Path) -> None:
    _ptb(tmp_path, train="a <unk> a\n", valid="a zebra\n")
    c = load_corpus("ptb", tmp_path)
    assert c.vocab.decode(c.valid) == ["a", "<unk>", "<eos>"]


def test_oov_without_unk_raises_naming_token_and_file(tmp_path: Path) -> None:
    _ptb(tmp_path, train="a b\n", valid="b a\n", test="a zebra\n")
    with pytest.raises(ValueError, match=r"'zebra' in .*ptb\.test\.txt"):
        load_corpus("ptb", tmp_path)


def test_vocab_object() -> None:
    v = Vocab(["the", "<eos>", "<unk>"], counts=[5, 2, 1])
    assert len(v) == 3 and "the" in v and "cat" not in v
    assert v.encode(["the", "cat"]).tolist() == [0, 2]
    assert v.decode(torch.tensor([1, 0])) == ["<eos>", "the"]
    assert v.token_to_id("the") == 0 and v.id_to_token(2) == "<unk>"
    assert v == Vocab(["the", "<eos>", "<unk>"], counts=[5, 2, 1])
    assert v.stoi == {"the": 0, "<eos>": 1, "<unk>": 2}
    with pytest.raises(KeyError, match="'cat'"):
        Vocab(["the"]).token_to_id("cat")
    with pytest.raises(ValueError, match="'a' appears more than once"):
        Vocab(["a", "b", "a"])
    with pytest.raises(ValueError, match="2 counts for 3 tokens"):
        Vocab(["a", "b", "c"], counts=[1, 2])


# ---------------------------------------------------------------- cache


def test_cache_reused_then_invalidated_by_change(tmp_path: Path, count_reads: list[str]) -> None:
    d = _ptb(tmp_path)
    first = load_corpus("ptb", tmp_path)
    assert sorted(count_reads) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    assert (d / CACHE_NAME).is_file()
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]

    count_reads.clear()
    second = load_corpus("ptb", tmp_path)
    assert count_reads == []  # everything from the cache
    assert second.vocab == first.vocab
    for s in ("train", "valid", "test"):
        assert torch.equal(getattr(second, s), getattr(first, s))

    # A changed valid file re-tokenises valid only; the vocabulary is untouched.
    _write(d / "ptb.valid.txt", "c c a\n")
    third = load_corpus("ptb", tmp_path)
    assert count_reads == ["ptb.valid.txt"]
    assert third.valid.tolist() == [3, 3, 0, 2]

    # A changed train file (same size, new mtime) rebuilds everything.
    count_reads.clear()
    train = d / "ptb.train.txt"
    _write(train, "b b a\nc a b\n")
    st = train.stat()
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fourth = load_corpus("ptb", tmp_path)
    assert sorted(count_reads) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    assert fourth.vocab.itos == ("b", "a", "<eos>", "c")

    count_reads.clear()
    load_corpus("ptb", tmp_path)
    assert count_reads == []


def test_cache_partial_splits_are_added(tmp_path: Path, count_reads: list[str]) -> None:
    _ptb(tmp_path)
    load_corpus("ptb", tmp_path, splits=["train"])
    assert count_reads == ["ptb.train.txt"]
    count_reads.clear()
    c = load_corpus("ptb", tmp_path, splits=["valid", "test"])
    assert sorted(count_reads) == ["ptb.test.txt", "ptb.valid.txt"]
    count_reads.clear()
    load_corpus("ptb", tmp_path)
    assert count_reads == []
    assert c.valid.tolist() == [1, 3, 2]


def test_cache_disabled_writes_nothing(tmp_path: Path) -> None:
    d = _ptb(tmp_path)
    load_corpus("ptb", tmp_path, cache=False)
    assert not (d / CACHE_NAME).exists()


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    d = _ptb(tmp_path)
    (d / CACHE_NAME).write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="unreadable corpus cache"):
        c = load_corpus("ptb", tmp_path)
    assert c.train.tolist() == [0, 1, 0, 2, 3, 0, 1, 2]
    load_corpus("ptb", tmp_path)  # the rewritten cache loads without a warning


def test_read_only_directory_is_not_cached(tmp_path: Path) -> None:
    d = _ptb(tmp_path)
    mode = d.stat().st_mode
    d.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        c = load_corpus("ptb", tmp_path)
        assert not any(p.name not in {"ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"} for p in d.iterdir())
    finally:
        d.chmod(mode)
    assert c.test.tolist() == [0, 2]


# ---------------------------------------------------------------- batching


def test_batchify_rows_are_contiguous_streams() -> None:
    out = batchify(torch.arange(11), 3)
    assert out.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert out.is_contiguous()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        batchify(torch.arange(4), 0)
    with pytest.raises(ValueError, match="cannot make 5 rows from 4 tokens"):
        batchify(torch.arange(4), 5)
    with pytest.raises(ValueError, match="1-D"):
        batchify(torch.zeros(2, 2, dtype=torch.long), 1)


def test_segments_exact_targets_and_last_shorter() -> None:
    data = batchify(torch.arange(20), 2)  # rows 0..9 and 10..19, T = 10, 9 target columns
    segs = Segments(data, tgt_len=4)
    assert len(segs) == segs.n_segments == 3
    pairs = list(segs)
    assert pairs[0][0].tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert pairs[0][1].tolist() == [[1, 2, 3, 4], [11, 12, 13, 14]]
    assert pairs[1][0].tolist() == [[4, 5, 6, 7], [14, 15, 16, 17]]
    assert pairs[2][0].tolist() == [[8], [18]]
    assert pairs[2][1].tolist() == [[9], [19]]
    # Every target position exactly once, in order.
    targets = torch.cat([y for _, y in pairs], dim=1)
    assert torch.equal(targets, data[:, 1:])
    for x, y in pairs:
        assert torch.equal(y, x + 1)
    assert segs.n_tokens == 18 == sum(y.numel() for _, y in pairs)


def test_segments_start_resumes_exactly() -> None:
    data = batchify(torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0)), 4)
    full = list(Segments(data, tgt_len=7))
    for k in (0, 1, 17, len(full) - 1, len(full)):
        resumed = Segments(data, tgt_len=7, start=k)
        assert len(resumed) == len(full) - k
        rest = list(resumed)
        assert len(rest) == len(full) - k
        for (x, y), (xf, yf) in zip(rest, full[k:]):
            assert torch.equal(x, xf) and torch.equal(y, yf)
        assert resumed.n_tokens == sum(y.numel() for _, y in rest)
    with pytest.raises(ValueError, match=r"start must be an int in \[0, 36\]"):
        Segments(data, tgt_len=7, start=37)
    with pytest.raises(ValueError, match="tgt_len must be an int >= 1"):
        Segments(data, tgt_len=0)
    with pytest.raises(ValueError, match="T >= 2"):
        Segments(data[:, :1], tgt_len=3)
    with pytest.raises(IndexError):
        Segments(data, tgt_len=7).segment(36)


def test_perplexity() -> None:
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(7.0), 10) == pytest.approx(7.0)
    assert perplexity(torch.tensor(3 * math.log(2.0)), 3) == pytest.approx(2.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="at least one target token"):
        perplexity(1.0, 0)


# ---------------------------------------------------------------- copy memory


def test_copy_memory_layout_exact_for_seed() -> None:
    data = CopyMemory(blank_len=5, batch_size=2, n_batches=3, n_symbols_to_copy=3, seed=0)
    x, y = data.batch(0)
    assert x.tolist() == [[5, 3, 2, 0, 0, 0, 0, 9, 0, 0, 0], [2, 1, 7, 0, 0, 0, 0, 9, 0, 0, 0]]
    assert y.tolist() == [[0, 0, 0, 0, 0, 0, 0, 0, 5, 3, 2], [0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 7]]
    assert x.dtype == y.dtype == torch.long


@pytest.mark.parametrize("repeat_delimiter", [False, True])
def test_copy_memory_layout_general(repeat_delimiter: bool) -> None:
    t, n, b = 30, 10, 64
    x, y = copy_memory_batch(b, blank_len=t, n_symbols_to_copy=n, repeat_delimiter=repeat_delimiter,
                             generator=torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (b, t + 2 * n)
    symbols = x[:, :n]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert (x[:, n:n + t - 1] == 0).all()
    assert (x[:, n + t - 1] == 9).all()
    assert (x[:, n + t:] == (9 if repeat_delimiter else 0)).all()
    assert (y[:, :t + n] == 0).all()
    assert torch.equal(y[:, t + n:], symbols)
    assert set(symbols.unique().tolist()) == set(range(1, 9))


def test_copy_memory_deterministic_and_resumable() -> None:
    a = CopyMemory(blank_len=20, batch_size=4, n_batches=5, seed=7)
    b = CopyMemory(blank_len=20, batch_size=4, n_batches=5, seed=7)
    other = CopyMemory(blank_len=20, batch_size=4, n_batches=5, seed=8)
    full = list(a)
    assert len(a) == 5 and a.seq_len == 40 and a.vocab_size == 10
    for (x, y), (x2, y2) in zip(full, b):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(full[0][0], other.batch(0)[0])
    assert not torch.equal(full[0][0], full[1][0])
    resumed = CopyMemory(blank_len=20, batch_size=4, n_batches=5, seed=7, start=3)
    assert len(resumed) == 2
    for (x, y), (xf, yf) in zip(resumed, full[3:]):
        assert torch.equal(x, xf) and torch.equal(y, yf)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        CopyMemory(blank_len=20, batch_size=4, n_batches=5, seed=-1)
    with pytest.raises(ValueError, match="blank_len must be an int >= 1"):
        CopyMemory(blank_len=0, batch_size=4, n_batches=5)
    with pytest.raises(ValueError, match=r"start must be an int in \[0, 5\]"):
        CopyMemory(blank_len=3, batch_size=4, n_batches=5, start=6)
    with pytest.raises(IndexError):
        a.batch(5)


def test_recall_accuracy_counts_only_recall_positions() -> None:
    x, y = copy_memory_batch(8, blank_len=10, n_symbols_to_copy=4, generator=torch.Generator().manual_seed(1))
    assert recall_accuracy(y, y, n_symbols_to_copy=4) == 1.0
    assert recall_accuracy(torch.zeros_like(y), y, n_symbols_to_copy=4) == 0.0  # blanks score nothing
    logits = torch.nn.functional.one_hot(y, 10).double()
    assert recall_accuracy(logits, y, n_symbols_to_copy=4) == 1.0
    half = y.clone()
    half[:, -2:] = 0
    assert recall_accuracy(half, y, n_symbols_to_copy=4) == 0.5
    with pytest.raises(ValueError, match="must both be"):
        recall_accuracy(y[:, 1:], y, n_symbols_to_copy=4)


# ---------------------------------------------------------------- download (offline)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tiny_wikitext_zip(path: Path, *, drop: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for s in ("train", "valid", "test"):
            if s != drop:
                zf.writestr(f"wikitext-2/wiki.{s}.tokens", f" = {s} = \n\n the cat <unk>\n")
        zf.writestr("wikitext-2/README", "ignored")
    return path


def _use_zip(monkeypatch: pytest.MonkeyPatch, archive: Path, *, md5: str | None, urls=None) -> None:
    src = dl.Source("wikitext-2-v1.zip", tuple(urls or [archive.as_uri()]), md5,
                    members=tuple(f"wikitext-2/wiki.{s}.tokens" for s in ("train", "valid", "test")))
    monkeypatch.setitem(dl.SOURCES, "wikitext-2", (src,))


def test_download_zip_unpacks_atomically_and_is_rerun_safe(tmp_path: Path, monkeypatch, capsys) -> None:
    archive = _tiny_wikitext_zip(tmp_path / "src.zip")
    root = tmp_path / "data"
    _use_zip(monkeypatch, archive, md5=_md5(archive), urls=[(tmp_path / "absent.zip").as_uri(), archive.as_uri()])
    target = dl.download_corpus("wikitext-2", root=root)
    assert target == root / "wikitext-2"
    assert sorted(p.name for p in target.iterdir()) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]
    assert sorted(p.name for p in root.iterdir()) == ["wikitext-2"]  # no temp leftovers
    assert str(target.resolve()) in capsys.readouterr().out
    c = load_corpus("wikitext-2", root)
    assert c.vocab.decode(c.valid[:4]) == ["=", "<unk>", "=", "<eos>"]  # 'valid' is not a train word

    def no_network(*args, **kwargs):
        raise AssertionError("fetched although the files are present")

    monkeypatch.setattr(dl, "_fetch", no_network)
    assert dl.main(["wikitext-2", "--root", str(root)]) == 0
    assert "already present" in capsys.readouterr().out


def test_download_bad_checksum_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    archive = _tiny_wikitext_zip(tmp_path / "src.zip")
    root = tmp_path / "data"
    _use_zip(monkeypatch, archive, md5="0" * 32)
    with pytest.raises(dl.DownloadError, match="md5 .* != expected 0{32}"):
        dl.download_corpus("wikitext-2", root=root, quiet=True)
    assert list(root.iterdir()) == []
    assert dl.main(["wikitext-2", "--root", str(root), "--quiet"]) == 1
    assert "error: could not fetch wikitext-2-v1.zip" in capsys.readouterr().err


def test_download_archive_missing_member(tmp_path: Path, monkeypatch) -> None:
    archive = _tiny_wikitext_zip(tmp_path / "src.zip", drop="test")
    root = tmp_path / "data"
    _use_zip(monkeypatch, archive, md5=None)
    with pytest.raises(dl.DownloadError, match="lacks wikitext-2/wiki.test.tokens"):
        dl.download_corpus("wikitext-2", root=root, quiet=True)
    assert list(root.iterdir()) == []


def test_download_not_a_zip(tmp_path: Path, monkeypatch) -> None:
    bogus = tmp_path / "src.zip"
    bogus.write_text("<html>rate limited</html>")
    _use_zip(monkeypatch, bogus, md5=None)
    with pytest.raises(dl.DownloadError, match="not a valid zip"):
        dl.download_corpus("wikitext-2", root=tmp_path / "data", quiet=True)


def test_download_plain_files_fill_partial_directory(tmp_path: Path, monkeypatch) -> None:
    src = _ptb(tmp_path / "mirror")
    monkeypatch.setitem(dl.SOURCES, "ptb", tuple(
        dl.Source(f, ((src / f).as_uri(),), _md5(src / f)) for f in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")))
    root = tmp_path / "data"
    _write(root / "ptb" / "ptb.valid.txt", "b c\n")  # a user's partial copy: kept, not overwritten
    before = (root / "ptb" / "ptb.valid.txt").stat().st_mtime_ns
    dl.download_corpus("ptb", root=root, quiet=True)
    assert (root / "ptb" / "ptb.valid.txt").stat().st_mtime_ns == before
    assert sorted(p.name for p in root.iterdir()) == ["ptb"]
    assert load_corpus("ptb", root).train.tolist() == [0, 1, 0, 2, 3, 0, 1, 2]


def test_download_table_matches_corpus_layout() -> None:
    for name, sources in dl.SOURCES.items():
        produced = {Path(m).name for s in sources for m in s.members} or {s.filename for s in sources}
        assert produced == set(dl.expected_files(name))
        for s in sources:
            assert s.urls and all(u.startswith("https://") for u in s.urls)
            assert s.md5 is None or re.fullmatch(r"[0-9a-f]{32}", s.md5)
    with pytest.raises(ValueError, match="downloadable: ptb, wikitext-2, wikitext-103"):
        dl.download_corpus("ptb-sample", root="unused")


# ---------------------------------------------------------------- the real samples


def test_ptb_sample_counts(shared_data: Path) -> None:
    c = load_corpus("ptb-sample", shared_data)
    assert isinstance(c, Corpus) and c.test is None
    assert c.valid.numel() == 73_760 and c.train.numel() == 82_430  # README: valid and test tokens
    assert len(c.vocab) <= 10_000
    assert c.vocab.itos[:3] == ("the", "<unk>", "<eos>")
    eos = c.vocab.eos_id
    assert int((c.valid == eos).sum()) == 3370 and int(c.valid[-1]) == eos
    assert not (shared_data / "ptb-sample" / CACHE_NAME).exists()  # samples are never cached
    # The download table checks the same bytes that the samples are.
    ptb = {s.filename: s.md5 for s in dl.SOURCES["ptb"]}
    for f in ("ptb.valid.txt", "ptb.test.txt"):
        assert _md5(shared_data / "ptb-sample" / f) == ptb[f]


def test_wikitext2_sample_counts(shared_data: Path) -> None:
    c = load_corpus("wikitext-2-sample", shared_data)
    assert c.valid.numel() == 217_646 and c.train.numel() == 245_569
    assert c.vocab.decode(c.valid[:1]) == ["<eos>"]  # the file opens with a blank line
    assert c.vocab.unk_id is not None
    with pytest.raises(ValueError, match="no split 'test'"):
        load_corpus("wikitext-2-sample", shared_data, splits=["test"])
