"""Mixed precision as a code path: every solver x backward x model under CPU bf16 autocast.

CPU bf16 autocast takes the same code path in deq as CUDA autocast (only the
op lists differ): the solver's own arithmetic runs with autocast off in
float32, f runs under the caller's autocast.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import deq
from deq.models import DEQTransformerLM, DEQTrellisNetLM

SOLVERS = ["fixed_point", "anderson", "broyden"]
BACKWARDS = ["implicit", "upg", "npg", "jfb"]


class Cell(nn.Module):
    def __init__(self, dim=12, out_bf16=False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(dim, dim)
        self.inj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.out_bf16 = out_bf16

    def forward(self, z, x):
        pre = self.lin(z) + self.inj(x)  # bf16 under autocast
        return pre.tanh() if self.out_bf16 else torch.nn.functional.layer_norm(pre.tanh(), pre.shape[-1:])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("out_bf16", [False, True], ids=["f32-out", "bf16-out"])
def test_layer_under_bf16_autocast(solver, backward, out_bf16):
    cell = Cell(out_bf16=out_bf16)
    layer = deq.DEQLayer(cell, solver=solver, backward=backward, tol=1e-2, max_iter=40,
                         on_nonconvergence="ignore")
    x = torch.randn(4, 12, requires_grad=True)
    w = torch.randn(4, 12)  # a loss that LayerNorm does not make constant
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        loss = (z.float() * w).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert layer.last_result.z.dtype == torch.float32  # the solver's state
    assert layer.last_result.converged.all()
    grads = [x.grad, *(p.grad for p in cell.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The bf16 gradient is close to the float32 one (about 2-3 significant digits).
    cell.zero_grad()
    x32 = x.detach().clone().requires_grad_()
    (layer(x32).float() * w).sum().backward()
    cos = torch.nn.functional.cosine_similarity(x.grad.flatten(), x32.grad.flatten(), dim=0)
    assert cos > 0.98, float(cos)


def _transformer(layer):
    torch.manual_seed(0)
    return DEQTransformerLM(n_token=20, d_model=16, n_head=2, d_head=8, d_inner=32, mem_len=4, dropout=0.1,
                            init_std=0.5, deq_layer=layer)


def _trellisnet(layer):
    torch.manual_seed(0)
    return DEQTrellisNetLM(ntoken=20, ninp=8, nhid=8, nout=8, dropout=0.1, dropouti=0.1, dropouth=0.1,
                           deq_layer=layer)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("build", [_transformer, _trellisnet], ids=["transformer", "trellisnet"])
def test_models_train_under_bf16_autocast(solver, backward, build):
    layer = functools.partial(deq.DEQLayer, solver=solver, backward=backward, tol=1e-2, max_iter=20,
                              on_nonconvergence="ignore", fix_rng=False)
    model = build(layer)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20, (2, 6), generator=gen), torch.randint(0, 20, (2, 6), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y, jac_reg=1)
        loss = out.loss + 0.5 * out.jac_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
    res = model.deq.last_result
    assert (res.z[0] if isinstance(res.z, tuple) else res.z).dtype == torch.float32
