"""The interface both language models offer a training loop: the unrolled/DEQ switch and per-call options."""

from __future__ import annotations

import functools

import pytest
import torch

import deq
from deq.models import DEQTransformerLM, DEQTrellisNetLM

DT = torch.float64


def _layer(**kw):
    return functools.partial(deq.DEQLayer, solver="fixed_point", tol=1e-14, on_nonconvergence="ignore", **kw)


def transformer(**kw):
    torch.manual_seed(0)
    return DEQTransformerLM(n_token=17, d_model=8, n_head=2, d_head=4, d_inner=16, mem_len=3, dropout=0.0,
                            init_std=0.5, deq_layer=_layer(max_iter=30, **kw)).to(DT)


def trellisnet(**kw):
    torch.manual_seed(0)
    return DEQTrellisNetLM(ntoken=17, ninp=6, nhid=4, nout=6, deq_layer=_layer(max_iter=30, **kw)).to(DT)


def _tokens(batch=2, length=5, seed=1):
    return torch.randint(0, 17, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build", [transformer, trellisnet])
def test_set_unroll_steps_switches_between_the_twin_and_the_deq(build):
    model = build()
    x, y = _tokens(), _tokens(seed=2)
    model.set_unroll_steps(3)
    model(x, y)
    assert model.deq.last_result.solver == "unrolled" and model.deq.last_result.n_iter == 3
    model.set_unroll_steps(None)
    model(x, y)
    assert model.deq.last_result.solver == "fixed_point"
    with pytest.raises(ValueError, match="unroll_steps"):
        model.set_unroll_steps(0)


@pytest.mark.parametrize("build", [transformer, trellisnet])
def test_max_iter_reaches_the_layer_for_one_call(build):
    model = build()
    x, y = _tokens(), _tokens(seed=2)
    model(x, y, max_iter=4)
    assert model.deq.last_result.n_iter == 4
    model(x, y)
    assert model.deq.last_result.n_iter > 4


@pytest.mark.parametrize("build", [transformer, trellisnet])
def test_jac_loss_is_the_layers_regulariser_and_trains_the_block(build):
    model = build()
    x, y = _tokens(), _tokens(seed=2)
    assert model(x, y).jac_loss is None
    torch.manual_seed(5)
    out = model(x, y, jac_reg=2)
    z_star = model.deq.last_result.z
    inputs = model.deq.f
    assert out.jac_loss.dim() == 0 and float(out.jac_loss.detach()) > 0
    grads = torch.autograd.grad(out.jac_loss, [p for p in inputs.parameters() if p.requires_grad],
                                allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert isinstance(z_star, (torch.Tensor, tuple))


def test_transformer_mem_len_of_one_call():
    model = transformer()
    x, y = _tokens(length=5), _tokens(length=5, seed=2)
    assert model(x, y).mems.z.shape[1] == 3
    assert model(x, y, mem_len=5).mems.z.shape[1] == 5
    assert model(x, y, mem_len=0).mems.z.shape[1] == 0
    with pytest.raises(ValueError, match="mem_len"):
        model(x, y, mem_len=-1)


def _dropout_models(compact, causal, family):
    torch.manual_seed(0)
    layer = functools.partial(deq.DEQLayer, solver="anderson", tol=1e-10, max_iter=80, on_nonconvergence="ignore",
                              fix_rng=False, compact=compact)
    if family == "transformer":
        return DEQTransformerLM(n_token=17, d_model=8, n_head=2, d_head=4, d_inner=16, mem_len=3, dropout=0.2,
                                dropatt=0.2, init_std=0.5, causal=causal, deq_layer=layer).to(DT)
    return DEQTrellisNetLM(ntoken=17, ninp=6, nhid=4, nout=6, dropouth=0.3, dropout=0.2, dropouti=0.2,
                           causal=causal, deq_layer=layer).to(DT)


@pytest.mark.parametrize("family", ["transformer", "trellisnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_both_models_run_in_active_set_mode_with_their_dropout_masks(family, causal):
    """compact=1.0 drops stopped samples from f's batch; the masks travel in x and are sliced with them."""
    x = torch.randint(0, 17, (6, 5), generator=torch.Generator().manual_seed(3))
    x[:2] = 0  # two repeated-token rows: easy, they stop first
    y = torch.randint(0, 17, (6, 5), generator=torch.Generator().manual_seed(4))
    results = []
    for compact in (False, 1.0):
        model = _dropout_models(compact, causal, family).train()
        torch.manual_seed(7)  # the same dropout masks in both runs
        out = model(x, y)
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
        results.append((out.loss.detach(), grads, model.deq.last_result))
    (loss0, g0, r0), (loss1, g1, r1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-10)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert torch.equal(r1.nstep, r0.nstep)
    assert r0.rows == r0.n_iter * 6
    # TrellisNet's samples all need the same count here (its causal conv moves one position per
    # iteration): nothing to drop. The Transformer's easy rows stop first.
    assert r1.rows == int(r1.nstep.sum()) if family == "transformer" else r1.rows <= r0.rows
