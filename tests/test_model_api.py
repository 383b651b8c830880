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
