"""experiments/train.py: a few steps of every model family, exact resume, atomic checkpoints,
the non-finite guard, missing data, the command line and sweeps."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import deq

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "experiments"))
import _checkpoint  # noqa: E402
import _loop  # noqa: E402
from train import train  # noqa: E402

# Small and quick everywhere: tiny models, short evaluations, no bar, no plots.
QUICK = ["train.progress=false", "train.plots=false", "train.log_interval=1", "num_threads=1"]
TINY_TRANSFORMER = ["model.d_model=16", "model.n_head=2", "model.d_head=8", "model.d_inner=32"]
TINY_TRELLISNET = ["model.ninp=16", "model.nhid=16", "model.nout=16"]
COPY = ["data.blank_len=4", "data.n_symbols_to_copy=3", "data.batch_size=8", "data.eval_batch_size=8",
        "data.eval_batches=1"]
SAMPLE = ["data.batch_size=4", "data.eval_batch_size=4", "data.tgt_len=8", "train.eval_max_batches=2"]


@pytest.fixture
def shared_data():
    """The PTB sample in ../shared/data: skip without it, but fail under CI (CI must have it)."""
    if not (SHARED_DATA / "ptb-sample" / "ptb.test.txt").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the test data are missing: {SHARED_DATA}/ptb-sample")
        pytest.skip(f"no test data in {SHARED_DATA}")
    return SHARED_DATA


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[*QUICK, f"out_dir={tmp_path}", *overrides])


def _records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def _copy_cfg(tmp_path, *overrides):
    return _cfg(tmp_path, *COPY, *TINY_TRANSFORMER, "train.max_steps=4", "train.pretrain_steps=2",
                "train.eval_interval=2", *overrides)


def test_copy_memory_deq_and_explicit_twin(tmp_path):
    result = train(_copy_cfg(tmp_path))
    assert result["steps"] == 4 and len(result["history"]) == 4
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result["history"])
    twin = result["explicit"]
    assert twin is not None and twin["steps"] == 4
    # Same seed, same batches, same unrolled network for the 2 pretraining steps.
    assert twin["history"][:2] == result["history"][:2]
    assert twin["history"][2:] != result["history"][2:]
    assert 0.0 <= result["valid"]["acc"] <= 1.0 and 0.0 <= twin["valid"]["acc"] <= 1.0

    recs = _records(tmp_path)
    train_recs = {(r["run"], r["step"]): r for r in recs if r["kind"] == "train"}
    assert set(train_recs) == {(run, s) for run in ("deq", "explicit") for s in (1, 2, 3, 4)}
    deq_step = train_recs[("deq", 4)]
    assert deq_step["mode"] == "deq" and deq_step["fwd_nstep"] >= 1 and deq_step["bwd_nstep"] >= 1
    assert train_recs[("deq", 2)]["mode"] == "unrolled" and train_recs[("deq", 2)]["fwd_nstep"] == 2
    assert train_recs[("explicit", 4)]["mode"] == "unrolled" and "bwd_nstep" not in train_recs[("explicit", 4)]
    valid = [(r["run"], r["step"], r["mode"]) for r in recs if r["kind"] == "valid"]
    assert valid == [("deq", 2, "unrolled"), ("deq", 4, "deq"), ("explicit", 2, "unrolled"),
                     ("explicit", 4, "unrolled")]
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "checkpoint-explicit.pt").is_file()
    assert _checkpoint.load(tmp_path / "checkpoint.pt")["step"] == 4


def test_copy_memory_trellisnet(tmp_path):
    result = train(_cfg(tmp_path, "model=trellisnet", *TINY_TRELLISNET, *COPY, "train.max_steps=3",
                        "train.pretrain_steps=1", "train.compare_explicit=false"))
    assert result["steps"] == 3 and result["explicit"] is None
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result["history"])
    assert result["last_train_result"].solver == "anderson"


@pytest.mark.parametrize("family", ["transformer", "trellisnet"])
def test_ptb_sample_few_steps(tmp_path, shared_data, family):
    tiny = TINY_TRANSFORMER + ["model.mem_len=8"] if family == "transformer" else TINY_TRELLISNET
    result = train(_cfg(tmp_path, f"experiment=ptb_sample_{family}", *tiny, *SAMPLE, "train.max_steps=3",
                        "train.pretrain_steps=1"))
    assert result["steps"] == 3
    valid = result["valid"]
    assert valid["partial"] and valid["n_tokens"] == 2 * 4 * 8
    # An untrained model is close to uniform over the sample's 7596 words.
    assert 1000 < valid["ppl"] < 3 * 7596
    assert result["test"] is None  # the sample has no test split
    kinds = [r["kind"] for r in _records(tmp_path)]
    assert kinds.count("train") == 3 and kinds.count("valid") == 1


def _state(path: Path) -> dict:
    return _checkpoint.load(path)


@pytest.mark.parametrize("setup", ["copy_memory", "ptb_sample"])
def test_resume_is_bit_exact(tmp_path, request, setup):
    if setup == "ptb_sample":
        request.getfixturevalue("shared_data")
        # TrellisNet: carried (h, c) memory, dropout masks from the RNG, a cosine schedule.
        base = ["experiment=ptb_sample_trellisnet", *TINY_TRELLISNET, *SAMPLE]
    else:
        # Dropout on, so the RNG state matters; a warmup-cosine schedule, so the scheduler state does.
        base = [*COPY, *TINY_TRANSFORMER, "model.dropout=0.1", "train.compare_explicit=false"]
    base += ["train.pretrain_steps=2", "optim.scheduler.name=cosine", "optim.scheduler.warmup_steps=2",
             "optim.scheduler.max_steps=4", "train.eval_interval=0", "train.ckpt_interval=0"]
    full = train(_cfg(tmp_path / "full", *base, "train.max_steps=4"))
    first = train(_cfg(tmp_path / "split", *base, "train.max_steps=2"))   # stops (and checkpoints) at 2
    second = train(_cfg(tmp_path / "split", *base, "train.max_steps=4", "resume=true"))
    assert first["history"] + second["history"] == full["history"]
    a, b = _state(tmp_path / "full" / "checkpoint.pt"), _state(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4 and a["position"] == b["position"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["ranks"][0]["rng"]["torch"], b["ranks"][0]["rng"]["torch"])
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # metrics.jsonl of the resumed run equals the uninterrupted one, step for step.
    steps = lambda p: [(r["kind"], r["step"], r.get("loss")) for r in _records(p) if r["kind"] == "train"]
    assert steps(tmp_path / "split") == steps(tmp_path / "full")


def test_resume_of_a_finished_run_only_evaluates(tmp_path):
    cfg = _copy_cfg(tmp_path, "train.compare_explicit=false")
    done = train(cfg)
    again = train(_copy_cfg(tmp_path, "train.compare_explicit=false", "resume=true"))
    assert again["history"] == [] and again["steps"] == 4
    assert again["valid"]["loss"] == pytest.approx(done["valid"]["loss"], rel=1e-6)


def test_checkpoint_write_survives_a_crash(tmp_path, monkeypatch):
    base = ["train.compare_explicit=false", "train.ckpt_interval=2"]
    train(_copy_cfg(tmp_path, *base, "train.max_steps=2"))
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # the crash happens mid-write
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        train(_copy_cfg(tmp_path, *base, "train.max_steps=4", "resume=true"))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert _checkpoint.load(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def _poison(monkeypatch, steps: set[int] | None, how: str = "nan"):
    """Make the model's forward fail at the given (1-based) calls in training mode: NaN loss or solver error."""
    from deq.models.transformer import DEQTransformerLM

    real = DEQTransformerLM.forward
    calls = {"n": 0}

    def forward(self, input, target=None, *, mems=None):
        out = real(self, input, target, mems=mems)
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
    result = train(_copy_cfg(tmp_path, "train.compare_explicit=false"))
    assert result["steps"] == 4 and result["nonfinite_steps"] == 1
    losses = torch.tensor([loss for _, loss in result["history"]])
    assert losses.isnan().tolist() == [s == step for s in (1, 2, 3, 4)]
    skipped = [r for r in _records(tmp_path) if r["kind"] == "nonfinite"]
    assert len(skipped) == 1 and skipped[0]["step"] == step and skipped[0]["consecutive"] == 1
    assert reason in skipped[0]["reason"]


def test_nonfinite_step_leaves_the_parameters_alone(tmp_path, monkeypatch):
    train(_copy_cfg(tmp_path / "a", "train.compare_explicit=false", "train.max_steps=2"))
    _poison(monkeypatch, {3}, "grad")
    train(_copy_cfg(tmp_path / "b", "train.compare_explicit=false", "train.max_steps=3"))
    a, b = _state(tmp_path / "a" / "checkpoint.pt"), _state(tmp_path / "b" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_too_many_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    _poison(monkeypatch, None)
    with pytest.raises(_loop.NonFiniteTrainingError, match=r"3 non-finite steps in a row \(more than "
                                                           r"train.max_nonfinite=2\) at step 3"):
        train(_copy_cfg(tmp_path, "train.compare_explicit=false", "train.max_nonfinite=2"))


def test_missing_corpus_names_the_directory_and_the_download_command(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        train(_cfg(tmp_path, "data=ptb", f"data.root={root}"))
    msg = str(err.value)
    assert str(root / "ptb") in msg and f"python -m deq.data.download ptb --root {root}" in msg


def test_vocab_size_mismatch_is_explained(tmp_path, shared_data):
    with pytest.raises(ValueError, match="data.vocab_size=100 but the lm data have 7596 tokens"):
        train(_cfg(tmp_path, "experiment=ptb_sample_transformer", "data.vocab_size=100"))


def test_command_line_sweep_runs_one_job_per_backward_pass(tmp_path):
    # The real entry point: `python experiments/train.py -m grad=implicit,upg,npg`.
    cmd = [sys.executable, str(REPO / "experiments" / "train.py"), "-m", "grad=implicit,upg,npg",
           f"hydra.sweep.dir={tmp_path}", *QUICK, *COPY, *TINY_TRANSFORMER, "train.max_steps=2",
           "train.pretrain_steps=1", "train.compare_explicit=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2"]
    for job, name in zip(jobs, ["Implicit", "UPG", "NPG"]):
        assert (job / "checkpoint.pt").is_file() and (job / "metrics.jsonl").is_file()
        assert f"_target_: deq.{name}" in (job / ".hydra" / "config.yaml").read_text()
