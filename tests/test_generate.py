"""experiments/generate.py: incremental decoding against teacher forcing, sampling, the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import deq
from _train_common import REPO, SAMPLE, TINY_TRANSFORMER, TINY_TRELLISNET, compose_train, need_shared_data
from experiments.config import ConfigError
from experiments.generate import Decoder, Sampling, encode, generate, load_run, teacher_forced
from experiments.train import train

FAMILIES = {"transformer": [*TINY_TRANSFORMER, "model.mem_len=8"], "trellisnet": ["model=trellisnet",
                                                                                    *TINY_TRELLISNET]}


@pytest.fixture(scope="module", params=list(FAMILIES))
def run_dir(request, tmp_path_factory):
    """A tiny language model trained 6 steps (4 unrolled, 2 DEQ) on the PTB sample."""
    need_shared_data()
    out = tmp_path_factory.mktemp(request.param)
    train(compose_train(out, "data=ptb_sample", *SAMPLE, *FAMILIES[request.param], "train.max_steps=6",
                        "train.pretrain_steps=4", "train.compare_explicit=false", "train.test_at_end=false"))
    return out


def _exact(model, *, tol=1e-12, max_iter=400, solver="fixed_point"):
    """float64 and a tight forward solve: the equilibria are exact, so decodings can be compared closely."""
    model = model.double()
    layer = model.deq
    layer.solver, layer.eval_tol, layer.eval_max_iter = deq.get_solver(solver), tol, max_iter
    return model


def _text(vocab, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(vocab), (n,), generator=gen)


def _incremental_logprobs(model, ids, split, decode="incremental"):
    """Feed ids[:split] at once, then one at a time; the log-probability of each next token."""
    decoder = Decoder(model, decode=decode)
    out = [decoder.feed(ids[:split])]
    for t in range(split, len(ids)):
        out.append(decoder.feed(ids[t:t + 1]))
    logp = torch.stack(out[:-1])  # predictions for positions split .. len-1
    return logp[torch.arange(len(ids) - split), ids[split:]]


def test_incremental_decoding_equals_teacher_forcing(run_dir):
    model, vocab, _ = load_run(run_dir)
    model = _exact(model)
    ids = _text(vocab)
    forced = teacher_forced(model, ids)
    forced = forced[torch.arange(4, len(ids)) - 1, ids[4:]]
    incremental = _incremental_logprobs(model, ids, 4)
    torch.testing.assert_close(incremental, forced.double(), rtol=0, atol=1e-8)


def test_window_decoding_is_exact_in_causal_mode_at_a_loose_budget(run_dir):
    """At 4 iterations nothing has converged; the causal solve still gives every prefix its own answer."""
    model, vocab, _ = load_run(run_dir)
    model = _exact(model, tol=1e-3, max_iter=4, solver="anderson")
    assert model.deq.time_dim is not None  # the models' default
    ids = _text(vocab)
    forced = teacher_forced(model, ids)
    forced = forced[torch.arange(4, len(ids)) - 1, ids[4:]].double()
    window = _incremental_logprobs(model, ids, 4, decode="window")
    torch.testing.assert_close(window, forced, rtol=0, atol=1e-12)
    model.deq.time_dim = None  # the plain solve: later tokens move earlier predictions at this budget
    forced_plain = teacher_forced(model, ids)[torch.arange(4, len(ids)) - 1, ids[4:]].double()
    window_plain = _incremental_logprobs(model, ids, 4, decode="window")
    assert (window_plain - forced_plain).abs().max() > 1e-6


def test_sampling_is_reproducible_and_greedy_is_the_argmax(run_dir):
    model, vocab, _ = load_run(run_dir)
    prompt = encode("the company said", vocab)
    draws = [generate(model, prompt, max_new_tokens=6, sampling=Sampling(temperature=1.3, top_k=50, top_p=0.95),
                      generator=torch.Generator().manual_seed(seed)).ids for seed in (3, 3, 4)]
    assert draws[0] == draws[1] and len(draws[0]) == 6
    greedy = generate(model, prompt, max_new_tokens=5, sampling=Sampling(greedy=True),
                      generator=torch.Generator().manual_seed(0))
    top1 = generate(model, prompt, max_new_tokens=5, sampling=Sampling(top_k=1),
                    generator=torch.Generator().manual_seed(9))
    assert greedy.ids == top1.ids
    decoder = Decoder(model)
    logp = decoder.feed(prompt)
    assert greedy.ids[0] == int(logp.argmax()) and greedy.logprobs[0] == pytest.approx(float(logp.max()))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {Sampling(top_p=0.75).pick(logp, torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are cut
    seen = {Sampling(top_p=0.5).pick(logp, torch.Generator().manual_seed(s)) for s in range(50)}
    assert seen == {0}
    seen = {Sampling(temperature=0.01).pick(logp, torch.Generator().manual_seed(s)) for s in range(50)}
    assert seen == {0}


@pytest.mark.parametrize("kwargs,key", [(dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"),
                                        (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p")])
def test_invalid_sampling_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        Sampling(**kwargs)


def test_prompt_words_outside_the_vocabulary_become_unk(run_dir, caplog):
    _, vocab, _ = load_run(run_dir)
    ids = encode("the zzqx company", vocab)
    assert ids.tolist()[1] == vocab.unk_id and "zzqx" in caplog.text
    with pytest.raises(ConfigError, match="prompt is empty"):
        encode("   ", vocab)


def test_command_line(run_dir):
    cmd = [sys.executable, str(REPO / "experiments" / "generate.py"), f"run_dir={run_dir}", "prompt=the market",
           "max_new_tokens=4", "seed=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\nthe market [" in out.stdout and "tokens/s" in out.stdout and "teacher-forced" in out.stdout
    bad = subprocess.run([*cmd[:2], f"run_dir={run_dir}/missing"], capture_output=True, text=True, timeout=120)
    said = bad.stdout + bad.stderr
    assert bad.returncode == 1 and "missing" in said and "Traceback" not in said
