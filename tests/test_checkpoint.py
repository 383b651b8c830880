"""experiments.checkpoint: atomic writes, the checksum, every way a checkpoint can be unusable (each
named with its file), the fallback to the previous checkpoint, and stale temporary files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from _train_common import copy_cfg, records
from experiments import checkpoint
from experiments.checkpoint import CheckpointError, CheckpointMissing
from experiments.train import train


def _state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((4, 4), value)}, "state": {"step": int(value)}}


def test_save_and_load_round_trip_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(_state(1.0), path)
    checkpoint.save(_state(2.0), path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.full((4, 4), 2.0))
    assert torch.equal(checkpoint.load(tmp_path / "checkpoint.prev.pt")["model"]["w"], torch.full((4, 4), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_a_crash_during_the_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(_state(1.0), path)
    before = path.read_bytes()

    def crashing_write(f):
        f.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(path, crashing_write, backup=checkpoint.previous_path(path))
    assert path.read_bytes() == before and not (tmp_path / "checkpoint.prev.pt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def _corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "random bytes":
        middle = len(data) // 2
        data[middle:middle + 64] = os.urandom(64)
    elif how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "empty":
        data = bytearray()
    elif how == "not a checkpoint":
        data = bytearray(b"PK\x03\x04 a zip file, say")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [
    ("random bytes", r"is damaged: its SHA-256 is [0-9a-f]{16}\.\.\., the header says"),
    ("truncated", r"is truncated: \d+ of its \d+ payload bytes are there"),
    ("empty", r"is empty \(0 bytes\)"),
    ("not a checkpoint", r"is not a deq training checkpoint \(no 'DEQCKPT' header line"),
])
def test_an_unusable_checkpoint_is_named_with_its_problem(tmp_path, how, message):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(_state(), path)
    _corrupt(path, how)
    with pytest.raises(CheckpointError, match=f"^{path} {message}"):
        checkpoint.load(path)


def test_non_finite_parameters_are_refused_on_load(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _state()
    state["model"]["w"][1, 2] = float("nan")
    checkpoint.save(state, path)
    with pytest.raises(CheckpointError, match=f"{path} holds non-finite model parameters: w"):
        checkpoint.load(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointMissing, match=f"no checkpoint at {tmp_path}/checkpoint.pt"):
        checkpoint.load_latest(tmp_path / "checkpoint.pt")


def test_load_latest_falls_back_to_the_previous_checkpoint_with_a_message(tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(_state(1.0), path)
    checkpoint.save(_state(2.0), path)
    _corrupt(path, "random bytes")
    with caplog.at_level(logging.WARNING, logger="experiments"):
        state, used = checkpoint.load_latest(path)
    assert used == tmp_path / "checkpoint.prev.pt" and state["state"]["step"] == 1
    assert f"{path} is damaged" in caplog.text and "using the previous checkpoint" in caplog.text
    _corrupt(used, "truncated")
    with pytest.raises(CheckpointError, match="no usable checkpoint: .*checkpoint.pt is damaged.*; and "
                                              ".*checkpoint.prev.pt is truncated"):
        checkpoint.load_latest(path)


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path, caplog):
    base = ["train.max_steps=6", "train.ckpt_interval=1"]
    train(copy_cfg(tmp_path / "full", *base))
    train(copy_cfg(tmp_path / "cut", *base, "train.max_steps=3", "train.test_at_end=false"))
    # The final checkpoint (step 3) is damaged; checkpoint.prev.pt holds step 2.
    _corrupt(tmp_path / "cut" / "checkpoint.pt", "random bytes")
    with caplog.at_level(logging.WARNING, logger="experiments"):
        result = train(copy_cfg(tmp_path / "cut", *base, "resume=true"))["deq"]
    assert "using the previous checkpoint" in caplog.text and result.steps == 6
    assert [r["step"] for r in records(tmp_path / "cut") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    full = [r["loss"] for r in records(tmp_path / "full") if r["kind"] == "train"]
    assert [r["loss"] for r in records(tmp_path / "cut") if r["kind"] == "train"] == full


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".checkpoint.pt.{dead}.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.tmp"  # a running process: maybe still writing
    live.write_bytes(b"y")
    other = tmp_path / ".unrelated.123.tmp"
    other.write_bytes(b"z")
    assert checkpoint.remove_stale_temporaries(tmp_path, ("checkpoint.pt",)) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_training_start_removes_temporary_files_left_by_a_kill(tmp_path):
    train(copy_cfg(tmp_path, "train.max_steps=3"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in ("checkpoint.pt", "metrics.jsonl", "checkpoint.prev.pt"):
        (tmp_path / f".{name}.{dead}.tmp").write_bytes(b"partial")
    train(copy_cfg(tmp_path, "train.max_steps=4", "resume=true"))
    assert not list(tmp_path.glob(".*.tmp"))
