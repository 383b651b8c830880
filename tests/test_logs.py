"""What a run records: metrics.jsonl, TensorBoard's event files (read back), the log lines, the plots."""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import pytest
import torch

from _train_common import copy_cfg, records
from experiments import plots
from experiments.logs import MetricsLog
from experiments.train import train


def _event_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_are_written_and_read_back(tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but the tensorboard package (a dev extra) is missing")
        pytest.skip("tensorboard is not installed (pip install -e '.[tensorboard]')")
    train(copy_cfg(tmp_path, "logger=tensorboard", "logger.flush_secs=1"))
    scalars = _event_scalars(tmp_path / "tensorboard" / "deq")
    for tag in ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/fwd_nstep", "train/fwd_residual",
                "train/bwd_nstep", "train/bwd_residual", "train/step_time_s", "valid/loss", "valid/ppl"):
        assert tag in scalars, tag
    jsonl = {r["step"]: r for r in records(tmp_path) if r["kind"] == "train"}
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    for step, value in scalars["train/loss"]:
        assert value == pytest.approx(jsonl[step]["loss"], rel=1e-6)  # TensorBoard stores float32
    assert [s for s, _ in scalars["train/bwd_nstep"]] == [3, 4]  # DEQ steps only
    assert [s for s, _ in scalars["valid/loss"]] == [2, 4]


def test_log_lines_go_through_logging(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="experiments"):
        train(copy_cfg(tmp_path, "train.log_interval=2"))
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[deq] step 2 | loss ") and "| unrolled |" in m for m in lines)
    assert any(m.startswith("[deq] step 4 | loss ") and "| deq | fwd " in m and "bwd " in m for m in lines)
    assert any(m.startswith("[deq] step 4 valid: loss ") and "recall accuracy" in m for m in lines)
    assert any(m.startswith("deq: 4 steps in ") for m in lines)


def test_metrics_truncate_drops_later_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log, other = MetricsLog(path, "deq"), MetricsLog(path, "explicit")
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step})
        other.write({"kind": "train", "step": step})
    with open(path, "a") as f:
        f.write('{"run": "deq", "kind": "tr')  # a line cut by a kill
    log.truncate(2)
    assert [(r["run"], r["step"]) for r in map(json.loads, path.read_text().splitlines())] == [
        ("deq", 1), ("explicit", 1), ("deq", 2), ("explicit", 2), ("explicit", 3)]


def test_stack_traces_pads_with_the_last_residual():
    a = torch.tensor([[1.0, 2.0], [0.5, 1.0], [0.1, 0.2]])
    b = torch.tensor([[4.0], [3.0]])
    stacked = plots.stack_traces([a, b])
    assert stacked.shape == (3, 3)
    assert stacked[:, 2].tolist() == [4.0, 3.0, 3.0] and stacked[:, :2].tolist() == a.tolist()


def test_plots_are_written(tmp_path):
    recs = [{"run": run, "kind": kind, "step": s, "loss": 2.0 - 0.1 * s} for run in ("deq", "explicit")
            for kind in ("train", "valid") for s in (1, 2, 3)] + [{"run": "deq", "kind": "nonfinite", "step": 2}]
    path = plots.plot_learning_curves(recs, tmp_path / "curve.png", switch_steps={"deq": 2})
    assert path.read_bytes()[:4] == b"\x89PNG"
    traces = {"forward": [torch.rand(5, 4), torch.rand(3, 4)], "backward": [torch.rand(7, 4)]}
    path = plots.plot_convergence(traces, tmp_path / "conv.png", tol=1e-3)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert plots.plot_convergence({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
