"""The faults of a long run on the data side: bad corpus files, stale temporaries, Ctrl-C, checksums.

No network: fetches are faked with local files or a monkeypatched ``_fetch``.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

import deq.data.corpus as corpus_mod
import deq.data.download as dl
from deq.data import Segments, batchify, load_corpus
from deq.data._tempfiles import _host, _locked, owner_tag, remove_stale
from deq.data.corpus import CACHE_NAME, CACHE_TMP_PATTERN

PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")
OLD = 3 * 24 * 3600  # seconds: older than the 24 h age rule


def _ptb(root: Path, train: bytes = b"a b a\nc a b\n", valid: bytes = b"b c\n", test: bytes = b"a\n") -> Path:
    d = root / "ptb"
    d.mkdir(parents=True, exist_ok=True)
    for name, data in zip(PTB_FILES, (train, valid, test)):
        (d / name).write_bytes(data)
    return d


def _dead_pid() -> int:
    """The pid of a process that has just exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(done.stdout)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    pytest.skip(f"pid {pid} was reused at once")


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything in it ``seconds`` into the past."""
    then = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (then, then))


class Holder:
    """A child process holding an exclusive flock on a file or folder until closed."""

    def __init__(self, path: Path):
        code = textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(path)!r}, os.O_RDONLY if os.path.isdir({str(path)!r}) else os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


needs_flock = pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")


# ---------------------------------------------------------------- corpus files: name the split and the file


def test_latin1_file_names_split_file_offset_and_line(tmp_path: Path) -> None:
    _ptb(tmp_path, valid=b"b c\nb caf\xe9 c\n")
    with pytest.raises(ValueError, match=r"^ptb valid split: .*ptb\.valid\.txt is not UTF-8 text: byte 0xe9 "
                                         r"at offset 9 \(line 2\).*iconv") as info:
        load_corpus("ptb", tmp_path)
    assert isinstance(info.value.__cause__.__cause__, UnicodeDecodeError)


def test_invalid_utf8_past_the_first_read_chunk_has_exact_offset(tmp_path: Path) -> None:
    # The text reader decodes in chunks, so its error offset is relative; ours is from the file start.
    body = b"a b\n" * 50_000 + b"\xff\n"
    _ptb(tmp_path, train=body)
    with pytest.raises(ValueError, match=rf"ptb train split: .*byte 0xff at offset {len(body) - 2} "
                                         rf"\(line 50001\)"):
        load_corpus("ptb", tmp_path)


def test_binary_file_is_named_as_binary(tmp_path: Path) -> None:
    _ptb(tmp_path, test=b"a b\x00\x00\x01\x02")
    with pytest.raises(ValueError, match=r"^ptb test split: .*ptb\.test\.txt is a binary file.*NUL byte at "
                                         r"offset 3"):
        load_corpus("ptb", tmp_path)


def test_empty_train_file_blames_train_not_valid(tmp_path: Path) -> None:
    _ptb(tmp_path, train=b"")
    with pytest.raises(ValueError, match=r"^ptb train split: .*ptb\.train\.txt holds no word \(0 bytes, "
                                         r"0 lines\)") as info:
        load_corpus("ptb", tmp_path)
    assert "ptb.valid.txt" not in str(info.value)


@pytest.mark.parametrize("valid", [b"", b"\n \n\t\n"])
def test_empty_valid_file_names_valid_split(tmp_path: Path, valid: bytes) -> None:
    _ptb(tmp_path, valid=valid)
    with pytest.raises(ValueError, match=r"^ptb valid split: .*ptb\.valid\.txt holds no word"):
        load_corpus("ptb", tmp_path)
    assert load_corpus("ptb", tmp_path, splits=["train", "test"]).test.tolist() == [0, 2]


def test_sample_messages_name_the_split_and_its_own_file(tmp_path: Path) -> None:
    # ptb-sample trains on ptb.test.txt: the message names both, so neither misleads.
    d = tmp_path / "ptb-sample"
    d.mkdir()
    (d / "ptb.test.txt").write_bytes(b"")
    (d / "ptb.valid.txt").write_bytes(b"a b\n")
    with pytest.raises(ValueError, match=r"^ptb-sample train split: .*ptb-sample/ptb\.test\.txt holds no word"):
        load_corpus("ptb-sample", tmp_path)


def test_oov_and_missing_messages_name_the_split(tmp_path: Path) -> None:
    _ptb(tmp_path, train=b"a b\n", valid=b"b a\n", test=b"a zebra\n")
    with pytest.raises(ValueError, match=r"^ptb test split: token 'zebra' in .*ptb\.test\.txt"):
        load_corpus("ptb", tmp_path)
    (tmp_path / "ptb" / "ptb.valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing ptb\.valid\.txt in .* \(the valid split\)"):
        load_corpus("ptb", tmp_path)


def test_corpus_records_the_file_of_each_split(tmp_path: Path) -> None:
    d = _ptb(tmp_path)
    c = load_corpus("ptb", tmp_path, splits=["valid", "train"])
    assert dict(c.files) == {"valid": d / "ptb.valid.txt", "train": d / "ptb.train.txt"}
    c = load_corpus("ptb", tmp_path)  # from the cache: the same files
    assert dict(c.files) == {s: d / f for s, f in zip(("train", "valid", "test"), PTB_FILES)}


def test_batchify_and_segments_name_what_they_were_given() -> None:
    with pytest.raises(ValueError, match=r"^ptb valid split \(v\.txt\): cannot make 16 rows from 3 tokens "
                                         r"\(use a batch size of at most 3"):
        batchify(torch.arange(3), 16, name="ptb valid split (v.txt)")
    with pytest.raises(ValueError, match=r"^cannot make 16 rows from 0 tokens"):  # no name: as before
        batchify(torch.arange(0), 16)
    with pytest.raises(ValueError, match=r"^ptb test split: Segments expects \(B, T\) data with T >= 2"):
        Segments(batchify(torch.arange(3), 3), tgt_len=2, name="ptb test split")
    assert batchify(torch.arange(7), 2, name="x").tolist() == [[0, 1, 2], [3, 4, 5]]


# ---------------------------------------------------------------- stale temporary files of the cache writer


def _cache_tmp(d: Path, tag: str) -> Path:
    p = d / f".{CACHE_NAME}.{tag}.{uuid.uuid4().hex}.tmp"
    p.write_bytes(b"half a cache")
    return p


def test_load_removes_stale_cache_temporaries_only(tmp_path: Path) -> None:
    d = _ptb(tmp_path)
    dead = _dead_pid()
    stale = _cache_tmp(d, f"{dead}@{_host()}")  # this host, process gone
    own = _cache_tmp(d, owner_tag())  # this very process: alive
    other_host = _cache_tmp(d, f"{dead}@elsewhere.example")  # cannot check the pid there
    old_format = _cache_tmp(d, str(dead))  # written before the host was in the name
    aged_other = _cache_tmp(d, f"{dead}@elsewhere.example")
    aged_old = _cache_tmp(d, str(dead))
    _age(aged_other, OLD)
    _age(aged_old, OLD)
    not_ours = [d / "notes.tmp", d / f".{CACHE_NAME}.backup", d / f".{CACHE_NAME}.{dead}.tmp"]
    for p in not_ours:
        p.write_bytes(b"user data")
        _age(p, OLD)
    load_corpus("ptb", tmp_path)
    assert not stale.exists() and not aged_other.exists() and not aged_old.exists()
    assert own.exists() and other_host.exists() and old_format.exists()
    assert all(p.exists() for p in not_ours)
    assert (d / CACHE_NAME).is_file()


def test_cache_disabled_leaves_the_directory_alone(tmp_path: Path) -> None:
    d = _ptb(tmp_path)
    stale = _cache_tmp(d, f"{_dead_pid()}@{_host()}")
    load_corpus("ptb", tmp_path, cache=False)
    assert stale.exists()


@needs_flock
def test_locked_cache_temporary_survives_even_with_a_dead_pid_in_its_name(tmp_path: Path) -> None:
    # A writer in another pid namespace (a container) may carry a pid that is dead here: its lock protects it.
    d = _ptb(tmp_path)
    tmp = _cache_tmp(d, f"{_dead_pid()}@{_host()}")
    holder = Holder(tmp)
    try:
        assert remove_stale(d, CACHE_TMP_PATTERN, is_dir=False) == []
        assert tmp.exists()
    finally:
        holder.close()
    removed = remove_stale(d, CACHE_TMP_PATTERN, is_dir=False)
    assert [p for p, _ in removed] == [tmp] and "no longer running" in removed[0][1]
    assert not tmp.exists()


@needs_flock
def test_cache_writer_holds_its_temporary_against_a_concurrent_clean_up(tmp_path: Path, monkeypatch) -> None:
    d = _ptb(tmp_path)
    seen = []
    real_save = torch.save

    def save_then_clean_up(obj, f):
        (tmp,) = [p for p in d.iterdir() if CACHE_TMP_PATTERN.fullmatch(p.name)]
        removed = remove_stale(d, CACHE_TMP_PATTERN, is_dir=False, max_age=0.0)  # even at age 0
        seen.append((tmp.name, tmp.exists(), removed, _locked(tmp, is_dir=False)))
        real_save(obj, f)

    monkeypatch.setattr(corpus_mod.torch, "save", save_then_clean_up)
    load_corpus("ptb", tmp_path)
    ((name, existed, removed, locked),) = seen
    assert owner_tag() in name
    assert existed and removed == [] and locked is True
    assert (d / CACHE_NAME).is_file() and sorted(p.name for p in d.iterdir()) == sorted([*PTB_FILES, CACHE_NAME])


# ---------------------------------------------------------------- the downloader: stale staging, Ctrl-C, checksums


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


PTB_CONTENT = {"ptb.train.txt": b"a b a\nc a b\n", "ptb.valid.txt": b"b c\n", "ptb.test.txt": b"a\n"}


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A local PTB mirror with the right checksums in SOURCES."""
    src = tmp_path / "mirror"
    src.mkdir()
    files = {}
    for name, data in PTB_CONTENT.items():
        (src / name).write_bytes(data)
        files[name] = src / name
    monkeypatch.setitem(dl.SOURCES, "ptb", tuple(
        dl.Source(n, (p.as_uri(),), _md5(PTB_CONTENT[n])) for n, p in files.items()))
    return files


def _staging(root: Path, tag: str | None, suffix: str = "k3j_9x0q") -> Path:
    d = root / (f".ptb-download-{tag}-{suffix}" if tag else f".ptb-download-{suffix}")
    (d / "ptb").mkdir(parents=True)
    (d / "ptb" / "ptb.train.txt").write_bytes(b"half a file")
    return d


def test_download_removes_stale_staging_and_keeps_live_or_unknown(tmp_path: Path, mirror, capsys) -> None:
    root = tmp_path / "data"
    dead = _dead_pid()
    stale = _staging(root, f"{dead}@{_host()}")
    own = _staging(root, owner_tag(), "aaaaaaaa")
    other_host = _staging(root, f"{dead}@elsewhere.example", "bbbbbbbb")
    old_format = _staging(root, None, "cccccccc")
    aged_old = _staging(root, None, "dddddddd")
    _age(aged_old, OLD)
    user = [root / ".ptb-download-notes", root / ".ptb-download-eeeeeeee.txt"]
    user[0].mkdir()
    user[1].write_text("mine")
    for p in user:
        _age(p, OLD)
    dl.download_corpus("ptb", root=root)
    out = capsys.readouterr().out
    assert f"removed the stale partial download {stale} (left by process {dead}" in out
    assert f"removed the stale partial download {aged_old} (untouched for 72 h)" in out
    assert not stale.exists() and not aged_old.exists()
    assert own.exists() and other_host.exists() and old_format.exists() and all(p.exists() for p in user)
    assert load_corpus("ptb", root).train.tolist() == [0, 1, 0, 2, 3, 0, 1, 2]
    # The new run's own staging is gone; what is left is exactly what was kept.
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["ptb", own.name, other_host.name, old_format.name, *(p.name for p in user)])


def test_stale_staging_removed_when_corpus_already_present(tmp_path: Path, mirror, capsys) -> None:
    root = tmp_path / "data"
    _ptb(root, *PTB_CONTENT.values())
    stale = _staging(root, f"{_dead_pid()}@{_host()}")
    assert dl.main(["ptb", "--root", str(root)]) == 0
    assert not stale.exists()
    assert "already present" in capsys.readouterr().out


@needs_flock
def test_download_holds_a_lock_on_its_staging(tmp_path: Path, mirror, monkeypatch) -> None:
    root = tmp_path / "data"
    checks = []
    real = dl._fetch

    def fetch_and_clean_up(url, dest, *, quiet):
        (staging,) = [p for p in root.iterdir() if dl.STAGING_PATTERN.fullmatch(p.name)]
        checks.append((dl.remove_stale(root, dl.STAGING_PATTERN, is_dir=True, max_age=0.0),
                       _locked(staging, is_dir=True)))
        real(url, dest, quiet=quiet)

    monkeypatch.setattr(dl, "_fetch", fetch_and_clean_up)
    dl.download_corpus("ptb", root=root, quiet=True)
    assert checks == [([], True)] * 3  # the running download's staging was never taken for stale
    assert sorted(p.name for p in root.iterdir()) == ["ptb"]


@needs_flock
def test_locked_staging_with_a_dead_pid_survives(tmp_path: Path) -> None:
    stale = _staging(tmp_path, f"{_dead_pid()}@{_host()}")
    holder = Holder(stale)
    try:
        assert dl.remove_stale_downloads(tmp_path) == []
    finally:
        holder.close()
    assert dl.remove_stale_downloads(tmp_path) == [stale]


def _interrupting_fetch(on: str):
    """A fake _fetch: copies the file, but for ``on`` writes half of it and then Ctrl-C arrives."""
    real = dl._fetch

    def fetch(url, dest, *, quiet):
        if url.endswith(on):
            dest.write_bytes(b"half")
            raise KeyboardInterrupt
        real(url, dest, quiet=quiet)

    return fetch


def test_ctrl_c_exits_130_with_one_line_and_no_staging(tmp_path: Path, mirror, monkeypatch, capsys) -> None:
    root = tmp_path / "data"
    monkeypatch.setattr(dl, "_fetch", _interrupting_fetch("ptb.valid.txt"))
    assert dl.main(["ptb", "--root", str(root), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.fullmatch(r"interrupted: the download of ptb was stopped while fetching ptb\.valid\.txt; "
                        r"nothing partial was left in .*data\n", err)
    assert list(root.iterdir()) == []  # no staging folder, no half corpus directory


def test_ctrl_c_library_call_raises_keyboard_interrupt_and_keeps_partial_dir(tmp_path: Path, mirror,
                                                                           monkeypatch) -> None:
    root = tmp_path / "data"
    (root / "ptb").mkdir(parents=True)
    (root / "ptb" / "ptb.valid.txt").write_bytes(PTB_CONTENT["ptb.valid.txt"])
    monkeypatch.setattr(dl, "_fetch", _interrupting_fetch("ptb.test.txt"))
    with pytest.raises(KeyboardInterrupt, match="while fetching ptb.test.txt") as info:
        dl.download_corpus("ptb", root=root, quiet=True)
    assert isinstance(info.value, dl.DownloadInterrupted)
    assert sorted(p.name for p in root.iterdir()) == ["ptb"]
    assert sorted(p.name for p in (root / "ptb").iterdir()) == ["ptb.valid.txt"]  # as before


def test_second_ctrl_c_during_clean_up_is_finished_by_main(tmp_path: Path, mirror, monkeypatch, capsys) -> None:
    root = tmp_path / "data"
    monkeypatch.setattr(dl, "_fetch", _interrupting_fetch("ptb.train.txt"))
    real_rmtree = dl.shutil.rmtree
    calls = []

    def rmtree_interrupted_once(path, *args, **kwargs):
        calls.append(Path(path))
        if len(calls) == 1:
            raise KeyboardInterrupt  # the user pressed Ctrl-C again
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(dl.shutil, "rmtree", rmtree_interrupted_once)
    assert dl.main(["ptb", "--root", str(root), "--quiet"]) == 130
    assert "nothing partial was left" in capsys.readouterr().err
    assert len(calls) == 2 and calls[0] == calls[1] and list(root.iterdir()) == []


_CHILD = """
import sys, time
import deq.data.download as dl

def fetch(url, dest, *, quiet):
    dest.write_bytes(b"half")
    print("fetching", flush=True)
    time.sleep(60)

dl._fetch = fetch
sys.exit(dl.main(["ptb", "--root", sys.argv[1], "--quiet"]))
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child is POSIX")
def test_real_sigint_to_the_command(tmp_path: Path) -> None:
    root = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "fetching"
        assert len(list(root.iterdir())) == 1  # the staging folder exists while fetching
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.startswith("interrupted: the download of ptb was stopped while fetching ptb.train.txt; "
                          "nothing partial was left") and err.count("\n") == 1
    assert list(root.iterdir()) == []


def test_present_file_with_wrong_checksum_is_refused(tmp_path: Path, mirror, monkeypatch, capsys) -> None:
    root = tmp_path / "data"
    d = _ptb(root, *PTB_CONTENT.values())
    (d / "ptb.valid.txt").write_bytes(b"b c d\n")  # edited by hand, or a damaged copy

    def no_network(*args, **kwargs):
        raise AssertionError("fetched although the files are present")

    monkeypatch.setattr(dl, "_fetch", no_network)
    want, got = _md5(PTB_CONTENT["ptb.valid.txt"]), _md5(b"b c d\n")
    with pytest.raises(dl.ChecksumError) as info:
        dl.download_corpus("ptb", root=root, quiet=True)
    msg = str(info.value)
    assert f"{d / 'ptb.valid.txt'}: md5 {got}, expected {want}" in msg
    assert "ptb.train.txt" not in msg and "Nothing was overwritten" in msg
    assert f"Delete it and fetch again with: python -m deq.data.download ptb --root {root}" in msg
    assert dl.main(["ptb", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ptb: 1 file(s) differ from the published corpus") and got in err
    assert (d / "ptb.valid.txt").read_bytes() == b"b c d\n"  # untouched


def test_present_files_with_right_checksums_say_verified(tmp_path: Path, mirror, capsys) -> None:
    root = tmp_path / "data"
    _ptb(root, *PTB_CONTENT.values())
    assert dl.main(["ptb", "--root", str(root)]) == 0
    assert "already present in" in (out := capsys.readouterr().out)
    assert "md5 verified: ptb.train.txt, ptb.valid.txt, ptb.test.txt" in out


def test_partial_directory_with_a_bad_file_fetches_nothing(tmp_path: Path, mirror, monkeypatch) -> None:
    root = tmp_path / "data"
    (root / "ptb").mkdir(parents=True)
    (root / "ptb" / "ptb.train.txt").write_bytes(b"truncated")
    fetched = []
    monkeypatch.setattr(dl, "_fetch", lambda url, dest, *, quiet: fetched.append(url))
    with pytest.raises(dl.ChecksumError, match=r"ptb\.train\.txt: md5 .*, expected "
                                               + _md5(PTB_CONTENT["ptb.train.txt"])):
        dl.download_corpus("ptb", root=root, quiet=True)
    assert fetched == [] and sorted(p.name for p in root.iterdir()) == ["ptb"]


def test_files_are_verified_again_once_in_place(tmp_path: Path, mirror, monkeypatch, capsys) -> None:
    root = tmp_path / "data"
    dl.download_corpus("ptb", root=root)
    assert "md5 verified: ptb.train.txt, ptb.valid.txt, ptb.test.txt" in capsys.readouterr().out
    # Bytes that change between the fetch check and the final place (a failing disk, a racing
    # writer) are caught by the check after the move.
    other = tmp_path / "other"
    real_move = dl._move_into_place

    def move_then_damage(staging, target, files):
        real_move(staging, target, files)
        (target / "ptb.test.txt").write_bytes(b"x\n")

    monkeypatch.setattr(dl, "_move_into_place", move_then_damage)
    with pytest.raises(dl.ChecksumError, match=r"ptb\.test\.txt: md5 " + _md5(b"x\n")):
        dl.download_corpus("ptb", root=other, quiet=True)


def test_fetched_file_with_wrong_checksum_says_what_to_do(tmp_path: Path, mirror) -> None:
    src = mirror["ptb.train.txt"]
    src.write_bytes(b"<html>rate limited</html>")
    want = _md5(PTB_CONTENT["ptb.train.txt"])
    with pytest.raises(dl.DownloadError, match=rf"(?s)md5 {_md5(src.read_bytes())} != expected {want}.*"
                                               rf"nothing was moved into place.*check that its md5 is {want}"):
        dl.download_corpus("ptb", root=tmp_path / "data", quiet=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_known_checksums_cover_ptb_only() -> None:
    assert set(dl.known_md5("ptb")) == set(PTB_FILES)
    assert dl.known_md5("wikitext-2") == {} and dl.known_md5("wikitext-103") == {}
