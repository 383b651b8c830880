"""Resuming: bit-exact continuation (also after SIGKILL at random moments and after Ctrl-C), the
log interval that spans a resume, finished runs, changed settings, and the refusals."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from _train_common import (COPY, QUICK, REPO, SAMPLE, TINY_TRANSFORMER, TINY_TRELLISNET, assert_same_parameters,
                           copy_cfg, compose_train, model_state, need_shared_data, records, without_times)
from experiments import checkpoint
from experiments.loop import ResumeError, TrainingInterrupted
from experiments.step import Stepper
from experiments.train import train

# Dropout on (the RNG state matters), a warmup-cosine schedule (its position matters), checkpoints
# and validations in between, and a log interval of 3 that is cut by most interruptions.
RESUMABLE = ["model.dropout=0.1", "schedule=cosine", "schedule.warmup_steps=3", "train.log_interval=3",
             "train.eval_interval=4", "train.ckpt_interval=1"]


def _sigterm_after(monkeypatch, calls: int) -> None:
    """Send this process a real SIGTERM right after its ``calls``-th training step."""
    real, count = Stepper.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Stepper, "step", step)


@pytest.mark.parametrize("setup", ["copy_memory", "ptb_sample"])
def test_resume_after_sigterm_is_bit_exact_and_logs_the_same_lines(tmp_path, setup, monkeypatch):
    if setup == "ptb_sample":
        need_shared_data()
        # TrellisNet: (h, c) memory carried across segments, dropout masks from the RNG.
        def make(out_dir, *more):
            return compose_train(out_dir, "experiment=ptb_sample_trellisnet", *TINY_TRELLISNET, *SAMPLE, *RESUMABLE,
                                 "train.max_steps=8", "train.pretrain_steps=2", *more)
    else:
        def make(out_dir, *more):
            return copy_cfg(out_dir, *RESUMABLE, "train.max_steps=8", *more)
    full = train(make(tmp_path / "full"))["deq"]
    _sigterm_after(monkeypatch, 5)  # inside the log interval of steps 4..6
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after step 5 \(checkpoint .* at step 5\)"):
        train(make(tmp_path / "split"))
    monkeypatch.undo()
    resumed = train(make(tmp_path / "split", "resume=true"))["deq"]
    assert resumed.steps == full.steps == 8
    split, whole = records(tmp_path / "split"), records(tmp_path / "full")
    assert without_times(split) == without_times(whole)
    # The interval 4..6 was cut by the stop after 5: its line still counts all three steps.
    tokens = {r["step"]: r["tokens"] for r in split if r["kind"] == "train"}
    assert tokens[6] == tokens[3] > 0 and set(tokens) == {3, 6, 8}
    assert_same_parameters(model_state(tmp_path / "split" / "checkpoint.pt"),
                           model_state(tmp_path / "full" / "checkpoint.pt"))
    a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoint.pt")
    assert torch.equal(a["ranks"][0]["rng"]["torch"], b["ranks"][0]["rng"]["torch"])
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert resumed.valid == full.valid


def test_resume_continues_the_run_then_starts_the_explicit_twin(tmp_path, monkeypatch):
    _sigterm_after(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        train(copy_cfg(tmp_path, "train.compare_explicit=true"))
    assert not (tmp_path / "checkpoint-explicit.pt").exists()
    monkeypatch.undo()
    result = train(copy_cfg(tmp_path, "train.compare_explicit=true", "resume=true"))
    assert (result["deq"].steps, result["explicit"].steps) == (4, 4)
    assert [(r["run"], r["step"]) for r in records(tmp_path) if r["kind"] == "train"] == [
        ("deq", 1), ("deq", 2), ("deq", 3), ("deq", 4), ("explicit", 1), ("explicit", 2), ("explicit", 3),
        ("explicit", 4)]


def test_resuming_a_finished_run_only_reports_it(tmp_path, caplog):
    done = train(copy_cfg(tmp_path))["deq"]
    lines = (tmp_path / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO, logger="experiments"):
        again = train(copy_cfg(tmp_path, "resume=true"))["deq"]
    assert again.already_finished and again.steps == 4 and again.valid == done.valid
    assert again.time_s == done.time_s > 0  # the run's, as recorded when it finished, not this process's
    assert (tmp_path / "metrics.jsonl").read_text() == lines  # no new line
    assert "finished at step 4" in caplog.text


def test_time_is_cumulative_over_processes(tmp_path):
    first = train(copy_cfg(tmp_path, "train.max_steps=3", "train.pretrain_steps=1"))["deq"]
    second = train(copy_cfg(tmp_path, "train.max_steps=4", "train.pretrain_steps=1", "resume=true"))["deq"]
    assert second.time_s > first.time_s
    # The run's clock carries over the resume: its stamps never go back (a logging property, not a speed).
    stamps = [r["elapsed_s"] for r in records(tmp_path) if r["kind"] == "train"]
    assert stamps == sorted(stamps)


def test_lr_override_on_resume_is_refused_with_the_key_named(tmp_path):
    train(copy_cfg(tmp_path, "train.max_steps=3"))
    with pytest.raises(ResumeError, match=r"in 1 setting\(s\):\n  optim.optimizer.lr: 0.0005 -> 1e-05\n"
                                          r"Pass allow_changes=true"):
        train(copy_cfg(tmp_path, "train.max_steps=6", "resume=true", "optim.optimizer.lr=1e-5"))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_override_on_resume_trains_at_exactly_the_asked_lr(tmp_path, schedule, caplog):
    sched = ["schedule=constant"] if schedule == "constant" else ["schedule=cosine", "schedule.max_steps=6"]
    train(copy_cfg(tmp_path, *sched, "train.max_steps=3"))
    with caplog.at_level(logging.WARNING, logger="experiments"):
        train(copy_cfg(tmp_path, *sched, "train.max_steps=6", "resume=true", "optim.optimizer.lr=1e-5",
                       "allow_changes=true"))
    assert "optim.optimizer.lr: 0.0005 -> 1e-05" in caplog.text
    lrs = {r["step"]: r["lr"] for r in records(tmp_path) if r["kind"] == "train"}
    from experiments.schedules import Constant, Cosine

    rule = Constant() if schedule == "constant" else Cosine(max_steps=6)
    assert [lrs[s] for s in (1, 2, 3)] == [rule.lr(s - 1, 5e-4) for s in (1, 2, 3)]
    assert [lrs[s] for s in (4, 5, 6)] == [rule.lr(s - 1, 1e-5) for s in (4, 5, 6)]  # exactly, not approx
    assert lrs[6] == (1e-5 if schedule == "constant" else rule.lr(5, 1e-5))


def test_changed_model_setting_is_listed_and_refused(tmp_path):
    train(copy_cfg(tmp_path, "train.max_steps=3"))
    with pytest.raises(ResumeError) as err:
        train(copy_cfg(tmp_path, "resume=true", "model.d_inner=64", "data.batch_size=16", "schedule=warmup_cosine"))
    msg = str(err.value)
    for line in ("data.batch_size: 8 -> 16", "model.d_inner: 32 -> 64",
                 "schedule._target_: 'experiments.schedules.Constant' -> 'experiments.schedules.WarmupCosine'"):
        assert line in msg
    # Where to write, how often to log and how long to train may change freely.
    train(copy_cfg(tmp_path, "resume=true", "train.log_interval=2", "train.eval_interval=1", "train.plots=true"))


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ResumeError, match=f"resume=true but there is no checkpoint at {tmp_path}/checkpoint.pt "
                                          r"\(nor checkpoint.prev.pt\): check hydra.run.dir"):
        train(copy_cfg(tmp_path, "resume=true"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_new_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    train(copy_cfg(tmp_path, "train.max_steps=3"))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ResumeError, match="already exists .* pass resume=true to continue it"):
        train(copy_cfg(tmp_path))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_auto_starts_afresh_or_continues(tmp_path):
    first = train(copy_cfg(tmp_path, "resume=auto", "train.max_steps=3"))["deq"]
    second = train(copy_cfg(tmp_path, "resume=auto", "train.max_steps=4"))["deq"]
    assert (first.steps, second.steps) == (3, 4)
    assert [r["step"] for r in records(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# Hard kills: a forked child (the parent has imported everything already) trains with a
# checkpoint after every step; the parent SIGKILLs it, half the time the moment a checkpoint's
# temporary file appears (inside the write), half the time after a random delay.

KILLED = [*RESUMABLE, "train.max_steps=16", "train.pretrain_steps=4", "train.eval_interval=5",
          "train.test_at_end=false"]


def _child(cfg) -> None:
    logging.disable(logging.CRITICAL)
    try:
        train(cfg)
    except BaseException:
        os._exit(1)
    os._exit(0)


def _kill_during(proc, out_dir, *, inside_write: bool, delay: float) -> bool:
    """SIGKILL ``proc``; True if it was inside a checkpoint write. False: it finished first."""
    deadline = time.monotonic() + (60 if inside_write else delay)
    while time.monotonic() < deadline and proc.is_alive():
        if inside_write and any(p.name.startswith(".checkpoint.pt.") for p in out_dir.glob(".*.tmp")):
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            return True
        time.sleep(0.0005)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_random_moments_always_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    train(copy_cfg(full, *KILLED))
    out = tmp_path / "killed"
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    kills, in_write, trial = 0, 0, 0
    while trial < 12:
        proc = ctx.Process(target=_child, args=(copy_cfg(out, *KILLED, "resume=auto"),))
        proc.start()
        if trial >= 6:  # enough kills: let it finish
            proc.join()
            assert proc.exitcode == 0
            break
        hit = _kill_during(proc, out, inside_write=trial % 2 == 0, delay=rng.uniform(0.05, 0.8))
        kills += proc.exitcode == -signal.SIGKILL
        in_write += hit
        trial += 1
    assert kills >= 4 and in_write >= 2, (kills, in_write)
    # The child that finished cleaned up what the killed ones left.
    assert not list(out.glob(".*.tmp"))
    assert without_times(records(out)) == without_times(records(full))
    assert_same_parameters(model_state(out / "checkpoint.pt"), model_state(full / "checkpoint.pt"))


def test_ctrl_c_on_the_command_line_stops_cleanly_and_resumes_exactly(tmp_path):
    """The real entry point, interrupted with SIGINT while training: exit status 130, no traceback."""
    need = [*QUICK, *COPY, *TINY_TRANSFORMER, "train.compare_explicit=false", *KILLED, "train.max_steps=24"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "experiments" / "train.py"), *need, f"hydra.run.dir={tmp_path / 'cli'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    metrics = tmp_path / "cli" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    assert "stopped by SIGINT after step" in out + err and "continue with resume=true" in out + err
    stopped_at = checkpoint.load(tmp_path / "cli" / "checkpoint.pt")["state"]["step"]
    assert 0 < stopped_at < 24
    done = subprocess.run(cmd + ["resume=true"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train(compose_train(tmp_path / "ref", *need))
    assert without_times(records(tmp_path / "cli")) == without_times(records(tmp_path / "ref"))
    assert_same_parameters(model_state(tmp_path / "cli" / "checkpoint.pt"),
                           model_state(tmp_path / "ref" / "checkpoint.pt"))
