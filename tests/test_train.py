"""experiments/train.py: a few steps of every model family, the explicit twin, the non-finite guard,
missing data, the command line (sweeps, --help, logs), bf16 autocast, and the per-step plan
(Jacobian regularisation, random forward budget)."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import deq
from _train_common import (COPY, QUICK, REPO, SAMPLE, TINY_TRANSFORMER, TINY_TRELLISNET, compose_train,
                           copy_cfg, model_state, need_shared_data, records)
from deq.models.transformer import DEQTransformerBlock, DEQTransformerLM
from experiments import checkpoint
from experiments.loop import NonFiniteTrainingError, jac_weight
from experiments.train import train


def test_copy_memory_deq_and_explicit_twin(tmp_path):
    result = train(copy_cfg(tmp_path, "train.compare_explicit=true", "train.log_interval=1"))
    deq_run, twin = result["deq"], result["explicit"]
    assert deq_run.steps == twin.steps == 4 and deq_run.switch_step == 2 and twin.switch_step is None
    assert 0.0 <= deq_run.valid["acc"] <= 1.0 and 0.0 <= twin.valid["acc"] <= 1.0
    recs = records(tmp_path)
    train_recs = {(r["run"], r["step"]): r for r in recs if r["kind"] == "train"}
    assert set(train_recs) == {(run, s) for run in ("deq", "explicit") for s in (1, 2, 3, 4)}
    # Same seed, same batches, same unrolled network for the 2 pretraining steps.
    assert [train_recs[("deq", s)]["loss"] for s in (1, 2)] == [train_recs[("explicit", s)]["loss"] for s in (1, 2)]
    assert train_recs[("deq", 3)]["loss"] != train_recs[("explicit", 3)]["loss"]
    deq_step = train_recs[("deq", 4)]
    assert deq_step["mode"] == "deq" and deq_step["fwd_nstep"] >= 1 and deq_step["bwd_nstep"] >= 1
    assert train_recs[("deq", 2)]["mode"] == "unrolled" and train_recs[("deq", 2)]["fwd_nstep"] == 2
    assert train_recs[("explicit", 4)]["mode"] == "unrolled" and "bwd_nstep" not in train_recs[("explicit", 4)]
    for key in ("lr", "grad_norm", "grad_norm_max", "fwd_residual", "fwd_residual_max", "step_time_s", "tokens"):
        assert math.isfinite(deq_step[key]), key
    valid = [(r["run"], r["step"], r["mode"]) for r in recs if r["kind"] == "valid"]
    assert valid == [("deq", 2, "unrolled"), ("deq", 4, "deq"), ("explicit", 2, "unrolled"),
                     ("explicit", 4, "unrolled")]
    assert checkpoint.load(tmp_path / "checkpoint.pt")["state"]["step"] == 4
    assert checkpoint.load(tmp_path / "checkpoint-explicit.pt")["state"]["step"] == 4
    # The convergence plot's material: every batch of the final validation, the last training solves.
    assert len(deq_run.traces["valid forward"]) == 1 and len(deq_run.traces["train backward"]) == 2
    assert twin.traces == {}


def test_copy_memory_trellisnet(tmp_path):
    result = train(compose_train(tmp_path, "model=trellisnet", *TINY_TRELLISNET, *COPY, "train.max_steps=3",
                                 "train.pretrain_steps=1", "train.compare_explicit=false"))
    assert list(result) == ["deq"] and result["deq"].steps == 3
    losses = [r["loss"] for r in records(tmp_path) if r["kind"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("family", ["transformer", "trellisnet"])
def test_ptb_sample_few_steps(tmp_path, family):
    need_shared_data()
    tiny = TINY_TRANSFORMER + ["model.mem_len=8"] if family == "transformer" else TINY_TRELLISNET
    result = train(compose_train(tmp_path, f"experiment=ptb_sample_{family}", *tiny, *SAMPLE, "train.max_steps=3",
                                 "train.pretrain_steps=1"))["deq"]
    assert result.steps == 3
    assert result.valid["partial"] and result.valid["n_tokens"] == 2 * 4 * 8
    # An untrained model is close to uniform over the sample's 7596 words.
    assert 1000 < result.valid["ppl"] < 3 * 7596
    assert result.test is None  # the sample has no test split
    kinds = [r["kind"] for r in records(tmp_path)]
    assert kinds.count("train") == 3 and kinds.count("valid") == 1


def _poison(monkeypatch, steps: set[int] | None, how: str = "nan"):
    """Make the model's forward fail at the given (1-based) calls in training mode: NaN loss or solver error."""
    real = DEQTransformerLM.forward
    calls = {"n": 0}

    def forward(self, input, target=None, **kwargs):
        out = real(self, input, target, **kwargs)
        if not self.training:
            return out
        calls["n"] += 1
        if steps is None or calls["n"] in steps:
            if how == "error":
                raise deq.NonFiniteError("f produced NaN (simulated)", stage="forward", step=3, samples=[0])
            if how == "grad":
                out.loss.register_hook(lambda g: g * float("inf"))
                return out
            nan = out.nll_sum * float("nan")
            return dataclasses.replace(out, loss=nan / out.n_tokens, nll_sum=nan)
        return out

    monkeypatch.setattr(DEQTransformerLM, "forward", forward)


@pytest.mark.parametrize("how, step, reason", [
    ("nan", 3, "non-finite loss"),
    ("error", 3, "solver: f produced NaN"),                  # deq.NonFiniteError from the forward solve
    ("grad", 2, "non-finite gradient"),                      # unrolled step: caught by the gradient norm
    ("grad", 3, "backward solver: backward solve: f(z0)"),   # DEQ step: Implicit's adjoint solve sees it first
])
def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path, monkeypatch, how, step, reason):
    _poison(monkeypatch, {step}, how)
    result = train(copy_cfg(tmp_path))["deq"]
    assert result.steps == 4 and result.nonfinite_steps == 1
    recs = records(tmp_path)
    skipped = [r for r in recs if r["kind"] == "nonfinite"]
    assert len(skipped) == 1 and skipped[0]["step"] == step and skipped[0]["consecutive"] == 1
    assert reason in skipped[0]["reason"]
    train_recs = {r["step"]: r for r in recs if r["kind"] == "train"}
    assert [train_recs[s]["skipped"] for s in (1, 2, 3, 4)] == [int(s == step) for s in (1, 2, 3, 4)]
    assert math.isnan(train_recs[step]["loss"]) and train_recs[step]["tokens"] == 0


def test_nonfinite_step_leaves_the_parameters_alone(tmp_path, monkeypatch):
    train(copy_cfg(tmp_path / "a", "train.max_steps=3"))
    _poison(monkeypatch, {4}, "grad")
    train(copy_cfg(tmp_path / "b", "train.max_steps=4"))
    a, b = model_state(tmp_path / "a" / "checkpoint.pt"), model_state(tmp_path / "b" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_streak_stops_the_run_and_leaves_a_good_checkpoint(tmp_path, monkeypatch):
    # Steps 4, 5, 6 are non-finite: the run stops at 6 (more than 2 in a row). A checkpoint is
    # written after every good step but none during the streak, so the one on disk is step 3's.
    _poison(monkeypatch, {4, 5, 6, 7, 8})
    common = ["train.max_steps=8", "train.ckpt_interval=1", "train.max_nonfinite=2"]
    with pytest.raises(NonFiniteTrainingError) as err:
        train(copy_cfg(tmp_path, *common))
    msg = str(err.value)
    assert "3 non-finite steps in a row (more than train.max_nonfinite=2) at step 6" in msg
    assert f"{tmp_path / 'checkpoint.pt'} (step 3)" in msg and "resume=true" in msg
    stored = checkpoint.load(tmp_path / "checkpoint.pt")
    assert stored["state"]["step"] == 3 and stored["state"]["nonfinite_streak"] == 0
    monkeypatch.undo()
    result = train(copy_cfg(tmp_path, *common, "resume=true"))["deq"]
    assert result.steps == 8 and result.nonfinite_steps == 0
    after = [r for r in records(tmp_path) if r["kind"] == "train" and r["step"] > 3]
    assert [r["step"] for r in after] == [4, 5, 6, 7, 8] and all(math.isfinite(r["loss"]) for r in after)
    assert not [r for r in records(tmp_path) if r["kind"] == "nonfinite"]  # the streak's lines were replayed away


def test_resume_resets_the_streak_counter(tmp_path, monkeypatch):
    # The last step of the first process is skipped: its final checkpoint holds a streak of 1.
    _poison(monkeypatch, {4})
    train(copy_cfg(tmp_path, "train.max_nonfinite=1"))
    assert checkpoint.load(tmp_path / "checkpoint.pt")["state"]["nonfinite_streak"] == 1
    monkeypatch.undo()
    _poison(monkeypatch, {1})  # the resumed process's first step: a streak of 1 again, not 2
    result = train(copy_cfg(tmp_path, "train.max_nonfinite=1", "train.max_steps=6", "resume=true"))["deq"]
    assert result.steps == 6 and result.nonfinite_steps == 2


def test_missing_corpus_names_the_directory_and_the_download_command(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        train(compose_train(tmp_path, "data=ptb", f"data.root={root}"))
    msg = str(err.value)
    assert str(root / "ptb") in msg and f"python -m deq.data.download ptb --root {root}" in msg


def test_vocab_size_mismatch_is_explained(tmp_path):
    need_shared_data()
    with pytest.raises(ValueError, match="data.vocab_size=100 but the ptb-sample corpus .* has 7596 words; set "
                                         "data.vocab_size=7596"):
        train(compose_train(tmp_path, "experiment=ptb_sample_transformer", "data.vocab_size=100"))


def _run_cli(tmp_path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "experiments" / "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_command_line_sweep_logs_one_line_per_interval_without_a_terminal(tmp_path):
    # The real entry point: `python experiments/train.py -m grad=implicit,upg,npg`, output piped.
    proc = _run_cli(tmp_path, "-m", "grad=implicit,upg,npg", f"hydra.sweep.dir={tmp_path}", *QUICK, *COPY,
                    *TINY_TRANSFORMER, "train.max_steps=3", "train.pretrain_steps=1", "train.compare_explicit=false",
                    "train.progress=true", "train.log_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout + proc.stderr  # no progress bar redraws in a pipe
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job, name in zip(jobs, ["Implicit", "UPG", "NPG"]):
        assert (job / "checkpoint.pt").is_file() and (job / "metrics.jsonl").is_file()
        assert f"_target_: deq.{name}" in (job / ".hydra" / "config.yaml").read_text()
        log = (job / "train.log").read_text()
        # One line per log interval (steps 2 and 3, the end), the validation, the summary.
        assert [line.split("] ")[-1].split(" |")[0] for line in log.splitlines() if "| loss" in line] == [
            "step 2", "step 3"]
        assert "step 3 valid: loss" in log and "deq: 3 steps in" in log
    assert proc.stdout.count("[deq] step 2 | loss") == 3


def test_help_shows_usage_and_examples(tmp_path):
    proc = _run_cli(tmp_path, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("Usage: python experiments/train.py", "experiment: ", "schedule: ", "-m grad=implicit,upg,npg",
                 "resume=true hydra.run.dir=", "torchrun --nproc_per_node=8", "logger=tensorboard"):
        assert text in proc.stdout, text


def test_bf16_autocast_is_a_real_code_path_on_the_cpu(tmp_path, monkeypatch):
    # The default solvers: Anderson forward, Implicit with Anderson backward (their state in float32).
    seen = []
    real = DEQTransformerBlock.forward

    def spy(self, z, x):
        seen.append((self.training, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return real(self, z, x)

    monkeypatch.setattr(DEQTransformerBlock, "forward", spy)
    result = train(copy_cfg(tmp_path, "train.precision=bf16"))
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    assert {training for training, _ in seen} == {True, False}  # training and evaluation
    recs = [r for r in records(tmp_path) if r["kind"] == "train"]
    assert len(recs) == 4 and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[3]["mode"] == "deq" and recs[3]["bwd_nstep"] >= 1 and math.isfinite(recs[3]["grad_norm"])
    assert math.isfinite(result["deq"].valid["loss"])


def test_plan_draws_the_jacobian_regulariser_and_the_budget_on_deq_steps_only(tmp_path, monkeypatch):
    calls = []
    real = DEQTransformerLM.forward

    def spy(self, input, target=None, **kwargs):
        if self.training:
            calls.append((self.deq.unroll_steps, kwargs.get("max_iter"), kwargs.get("jac_reg", 0)))
        return real(self, input, target, **kwargs)

    monkeypatch.setattr(DEQTransformerLM, "forward", spy)
    jr = ["train.jac_reg.weight=2.0", "train.jac_reg.probability=0.5", "train.max_iter_reduction=2",
          "deq.max_iter=6", "train.max_steps=14", "train.log_interval=7", "train.eval_interval=0"]
    train(copy_cfg(tmp_path / "a", *jr))
    unrolled, deq_steps = calls[:2], calls[2:]
    assert unrolled == [(2, None, 0), (2, None, 0)]
    assert all(mode is None for mode, _, _ in deq_steps)
    budgets, probes = [b for _, b, _ in deq_steps], [p for _, _, p in deq_steps]
    assert set(budgets) == {4, 5, 6} and set(probes) == {0, 1}  # 12 draws of each
    recs = [r for r in records(tmp_path / "a") if r["kind"] == "train"]
    assert [r["jac_steps"] for r in recs] == [sum(probes[:5]), sum(probes[5:])]
    assert all(r["jac_loss"] > 0 and r["jac_weight"] == 2.0 for r in recs)
    # The draws come from the run's own generator: a second run draws the same.
    first = list(calls)
    calls.clear()
    train(copy_cfg(tmp_path / "b", *jr))
    assert calls == first


def test_jacobian_weight_grows_as_in_the_original_code():
    # locuslab/deq DEQ-Sequence/train_transformer.py: after each step, with train_step the count
    # of steps taken, `if train_step > pretrain_steps and train_step % jac_incremental == 0:
    # jac_loss_weight += 0.1`. The weight of the step taken at count s is the weight then.
    cfg = compose_train(None, "train.pretrain_steps=7", "train.max_steps=60", "train.jac_reg.weight=1.9",
                        "train.jac_reg.probability=0.35", "train.jac_reg.increment_every=5")
    weight, expected = 1.9, []
    for train_step in range(60):
        expected.append(weight)
        if train_step + 1 > 7 and (train_step + 1) % 5 == 0:
            weight += 0.1
    assert [jac_weight(cfg, s) for s in range(60)] == pytest.approx(expected, abs=1e-12)
    assert jac_weight(cfg, 59) == pytest.approx(1.9 + 0.1 * 10)
    off = compose_train(None, "train.jac_reg.weight=1.9", "train.jac_reg.increment_every=5")  # probability 0
    assert jac_weight(off, 1000) == 1.9
