"""Every invalid setting is an error that names its key, raised before the first training step."""

from __future__ import annotations

import pytest

from _train_common import CONFIGS, COPY, SAMPLE, TINY_TRELLISNET, compose_train, copy_cfg, need_shared_data
from experiments.config import ConfigError, validate
from experiments.step import Stepper
from experiments.tasks import CopyMemoryTask, LanguageModeling
from experiments.train import train


@pytest.fixture(autouse=True)
def no_step(monkeypatch):
    """Any training step taken in these tests is a failure: the error must come before it."""
    def step(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(Stepper, "step", step)


@pytest.mark.parametrize("overrides, message", [
    (["train.ckpt_interval=-3"], "train.ckpt_interval must be >= 0, got -3"),
    (["train.max_steps=abc"], "train.max_steps must be an integer, got 'abc'"),
    (["train.pretrain_steps=5", "train.max_steps=3"],
     "train.pretrain_steps=5 must be below train.max_steps=3: every step would run unrolled"),
    (["train.unroll_steps=0"], "train.unroll_steps must be >= 1, got 0"),
    (["train.log_interval=2.5"], "train.log_interval must be an integer, got 2.5"),
    (["train.precision=fp8"], "train.precision must be one of fp32, bf16, fp16; got 'fp8'"),
    (["train.precision=fp16", "device=cpu"], "train.precision=fp16 needs a CUDA device (device=cpu"),
    (["device=tpu"], "device='tpu' is not a device"),
    (["train.max_iter_reduction=20"], "train.max_iter_reduction=20 must be below deq.max_iter=20"),
    (["train.jac_reg.probability=2"], "train.jac_reg.probability must be a number >= 0 and <= 1, got 2"),
    (["train.jac_reg.probes=0"], "train.jac_reg.probes must be >= 1, got 0"),
    (["train.jac_reg.weight=-1"], "train.jac_reg.weight must be a number >= 0, got -1"),
    (["optim.clip=0"], "optim.clip must be a number > 0 or null, got 0"),
    (["resume=maybe"], "resume must be one of False, True, auto; got 'maybe'"),
    (["train.progress=yes"], "train.progress must be one of False, True; got 'yes'"),
    (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    (["train.eval_max_batches=0"], "train.eval_max_batches must be >= 1, got 0"),
    (["schedule=cosine", "schedule.warmup_steps=-1"], "schedule.warmup_steps must be >= 0, got -1"),
    (["schedule=plateau", "schedule.factor=2"], "schedule.factor must be in (0, 1), got 2"),
])
def test_invalid_setting_is_named_before_the_first_step(tmp_path, overrides, message):
    with pytest.raises(ValueError) as err:
        train(copy_cfg(tmp_path, *overrides))
    assert message in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_evaluation_memory_length_for_trellisnet_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.eval_mem_len=300 but DEQTrellisNetLM takes no mem_len"):
        train(compose_train(tmp_path, "model=trellisnet", *TINY_TRELLISNET, *COPY, "train.eval_mem_len=300"))


def test_every_problem_is_listed_at_once():
    cfg = copy_cfg(None, "train.ckpt_interval=-3", "train.max_steps=abc", "train.precision=fp8")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert len(err.value.problems) == 3
    assert str(err.value).startswith("invalid configuration:\n  train.max_steps must be an integer")


def test_every_shipped_experiment_is_valid():
    names = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    assert len(names) >= 8
    for name in names:
        validate(compose_train(None, f"experiment={name}", "device=cpu"))


def test_segment_longer_than_the_data_is_refused_with_the_split_and_file(tmp_path):
    shared = need_shared_data()
    with pytest.raises(ValueError) as err:
        train(compose_train(tmp_path, "experiment=ptb_sample_transformer", "data.tgt_len=100000"))
    msg = str(err.value)
    assert "data.tgt_len=100000 is longer than the rows of the train split" in msg
    assert f"({shared / 'ptb-sample' / 'ptb.test.txt'}, 82430 tokens)" in msg and "at most 5150" in msg


def _tiny_corpus(root, train_words: int, valid_words: int):
    folder = root / "ptb-sample"
    folder.mkdir(parents=True)
    (folder / "ptb.test.txt").write_text(" ".join(f"w{i % 7}" for i in range(train_words)) + "\n")
    (folder / "ptb.valid.txt").write_text(" ".join(f"w{i % 7}" for i in range(valid_words)) + "\n")
    return folder


def test_split_too_short_for_its_batch_names_the_split_and_file(tmp_path):
    folder = _tiny_corpus(tmp_path, 200, 5)
    common = dict(name="ptb-sample", root=str(tmp_path), vocab_size=8, batch_size=4, tgt_len=8, eval_tgt_len=1)
    with pytest.raises(ConfigError, match=f"the valid split \\({folder / 'ptb.valid.txt'}, 6 tokens\\) is too short "
                                          "for data.eval_batch_size=4: each row needs at least 2 tokens, so at most "
                                          "data.eval_batch_size=3"):
        LanguageModeling(**common, eval_batch_size=4)
    LanguageModeling(**common, eval_batch_size=3)


def test_batch_not_divisible_over_processes_is_named():
    with pytest.raises(ConfigError, match=r"data.batch_size=8 must be divisible by the number of processes \(3\)"):
        CopyMemoryTask(vocab_size=10, blank_len=4, n_symbols_to_copy=3, repeat_delimiter=False, batch_size=8,
                       eval_batch_size=6, eval_batches=1, seed=0, rank=0, world_size=3)


def test_sample_batch_too_large_for_the_sample(tmp_path):
    need_shared_data()
    with pytest.raises(ConfigError, match="data.eval_tgt_len=99999 is longer than the rows of the valid split"):
        train(compose_train(tmp_path, "experiment=ptb_sample_trellisnet", *TINY_TRELLISNET, *SAMPLE,
                            "data.eval_tgt_len=99999"))
