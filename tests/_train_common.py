"""Shared settings of the training tests: tiny models, short runs, composed configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments import checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"

# Small and quick everywhere: tiny models, short evaluations, no bar, no plots.
QUICK = ["train.progress=false", "train.plots=false", "train.log_interval=1", "num_threads=1"]
TINY_TRANSFORMER = ["model.d_model=16", "model.n_head=2", "model.d_head=8", "model.d_inner=32"]
TINY_TRELLISNET = ["model.ninp=16", "model.nhid=16", "model.nout=16"]
COPY = ["data.blank_len=4", "data.n_symbols_to_copy=3", "data.batch_size=8", "data.eval_batch_size=8",
        "data.eval_batches=1"]
SAMPLE = ["data.batch_size=4", "data.eval_batch_size=4", "data.tgt_len=8", "train.eval_max_batches=2"]
# Fields that measure wall-clock time: the only ones allowed to differ between equal runs.
TIMES = ("step_time_s", "elapsed_s", "eval_time_s")


def need_shared_data() -> Path:
    """The PTB sample in ../shared/data: skip without it, but fail under CI (CI must have it)."""
    if not (SHARED_DATA / "ptb-sample" / "ptb.test.txt").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the test data are missing: {SHARED_DATA}/ptb-sample")
        pytest.skip(f"no test data in {SHARED_DATA}")
    return SHARED_DATA


def compose_train(out_dir: Path | None, *overrides: str):
    """``configs/train.yaml`` with the quick settings, writing into ``out_dir``."""
    where = [] if out_dir is None else [f"out_dir={out_dir}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[*QUICK, *where, *overrides])


def copy_cfg(out_dir: Path | None, *overrides: str):
    """Copy memory, tiny Transformer: 2 unrolled steps, 2 DEQ steps, a validation every 2."""
    return compose_train(out_dir, *COPY, *TINY_TRANSFORMER, "train.max_steps=4", "train.pretrain_steps=2",
                         "train.eval_interval=2", "train.compare_explicit=false", *overrides)


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_times(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in recs]


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model"]


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
