"""The weight-normalised convolution that recomputes its kernel in backward (deq.models.weight_norm).

Every comparison is in float64 against the plain path: the kernel built with
autograd from the formula, written here, then ``F.conv1d``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deq.models.dropout import WeightDropout
from deq.models.weight_norm import (WeightNormConv1d, apply_weight_norm, cached_weights, weight_dropconnect,
                                    weight_norm_conv1d, weight_norm_tensors)

D64 = dict(dtype=torch.float64)

# (C_in, C_out, k, stride, padding, dilation, groups)
GEOMETRIES = [(5, 6, 2, 1, 0, 1, 1), (4, 6, 3, 2, 1, 2, 2), (8, 4, 1, 1, 0, 1, 1)]


def _case(geometry, *, dropconnect: str | None, bias: bool = True, seed: int = 0, batch: int = 3, length: int = 9):
    c_in, c_out, k, *_, groups = geometry
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, length, generator=gen, **D64)
    v = torch.randn(c_out, c_in // groups, k, generator=gen, **D64)
    g = torch.rand(c_out, 1, 1, generator=gen, **D64) + 0.5
    b = torch.randn(c_out, generator=gen, **D64) if bias else None
    factors = None
    if dropconnect is not None:
        drop = WeightDropout(0.4, temporal=dropconnect == "temporal")
        torch.manual_seed(seed)
        drop.reset(v)
        factors = drop.factors()
        assert (~factors[0]).any()
    return x, g, v, b, factors


def _dropconnect_ref(v, mask, scale):
    """TrellisNet's WeightDrop on v: F.dropout of the taps [:-1] (temporal) or of all of v."""
    if mask.shape == v.shape:
        return v * mask * scale
    return torch.cat([v[..., :-1] * mask * scale, v[..., -1:]], dim=-1)


def _plain(x, g, v, b, factors, geometry):
    """The plain path: w = g v' / ||v'|| per output channel (v' = DropConnect(v)) with autograd, then F.conv1d."""
    *_, stride, padding, dilation, groups = geometry
    vd = v if factors is None else _dropconnect_ref(v, *factors)
    w = g * vd / vd.flatten(1).norm(dim=1)[:, None, None]
    return F.conv1d(x, w, b, stride, padding, dilation, groups)


def _ours(x, g, v, b, factors, geometry):
    *_, stride, padding, dilation, groups = geometry
    return weight_norm_conv1d(x, g, v, b, dropconnect=factors, stride=stride, padding=padding, dilation=dilation,
                              groups=groups)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dropconnect", [None, "temporal", "all"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_the_plain_path(geometry, dropconnect, bias):
    x, g, v, b, factors = _case(geometry, dropconnect=dropconnect, bias=bias)
    inputs = [t.requires_grad_() for t in (x, g, v, b) if t is not None]
    ours, ref = _ours(x, g, v, b, factors, geometry), _plain(x, g, v, b, factors, geometry)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-13)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, inputs, grad_out)
    refs = torch.autograd.grad(ref, inputs, grad_out)
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if factors is not None:  # dropped entries of v get no gradient
        mask = factors[0]
        grad_v = grads[2] if mask.shape == v.shape else grads[2][..., :-1]
        assert (grad_v[~mask] == 0).all() and (grad_v[mask] != 0).all()
        if dropconnect == "temporal" and v.shape[-1] > 1:
            assert mask.shape == (*v.shape[:-1], v.shape[-1] - 1)  # no mask held for the current tap


@pytest.mark.parametrize("dropconnect", [None, "temporal"])
def test_gradcheck_and_second_derivatives(dropconnect):
    """First and second derivatives (Jacobian regularisation differentiates a VJP of f again)."""
    geometry = GEOMETRIES[1]
    x, g, v, b, factors = _case(geometry, dropconnect=dropconnect, batch=1, length=6)
    inputs = tuple(t.requires_grad_() for t in (x, g, v, b))

    def fn(x, g, v, b):
        return _ours(x, g, v, b, factors, geometry)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    # The second derivative of <J^T u, J^T u> (a Jacobian-regulariser-like term) equals the plain path's.
    u = torch.randn_like(fn(*inputs))
    vals = []
    for conv in (fn, lambda *t: _plain(*t, factors, geometry)):
        (vjp_x,) = torch.autograd.grad(conv(*inputs), inputs[0], u, create_graph=True)
        vals.append(torch.autograd.grad(vjp_x.square().sum(), inputs[1:3]))  # to g and v (b drops out)
    for got, want in zip(*vals):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _saved(fn, *args):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*args)
    return out, saved


@pytest.mark.parametrize("dropconnect", [None, "temporal"])
def test_saves_input_g_v_and_the_bool_mask_not_the_kernel(dropconnect):
    geometry = GEOMETRIES[0]
    x, g, v, b, factors = _case(geometry, dropconnect=dropconnect)
    for t in (x, g, v, b):
        t.requires_grad_()
    _, saved = _saved(_ours, x, g, v, b, factors, geometry)
    allowed = {t.untyped_storage().data_ptr() for t in (x, g, v, *(factors or ())[:1])}
    assert {t.untyped_storage().data_ptr() for t in saved} <= allowed
    assert all(t.dtype == torch.bool for t in saved if t.shape == v.shape and t is not v)
    # The plain path saves the float kernel (and v' under DropConnect) besides.
    _, plain_saved = _saved(_plain, x, g, v, b, factors, geometry)
    assert any(t.shape == v.shape and t.dtype == v.dtype and t.untyped_storage().data_ptr() not in allowed
               for t in plain_saved)


@pytest.mark.parametrize("wdrop", [0.0, 0.3])
def test_module_equals_a_weight_normalised_conv1d(wdrop):
    """Same parameters (names, initial values), the parametrized weight, eval and training mode."""
    torch.manual_seed(0)
    conv = WeightNormConv1d(5, 8, 2, dilation=2, dropconnect=wdrop, init_std=0.1).double()
    torch.manual_seed(0)
    ref = nn.Conv1d(5, 8, 2, dilation=2)
    nn.init.normal_(ref.weight, 0.0, 0.1)
    nn.init.normal_(ref.bias, 0.0, 0.1)
    apply_weight_norm(ref, dropconnect=wdrop)
    ref.double()
    assert conv.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(conv.state_dict()[key], value), key
    g, v = weight_norm_tensors(conv)
    torch.testing.assert_close(g.flatten(), v.flatten(1).norm(dim=1), rtol=1e-6, atol=0)  # g = ||v|| (float32 init)
    x = torch.randn(2, 5, 7, **D64)
    conv.reset_dropconnect()
    for train in (True, False):
        conv.train(train)
        torch.testing.assert_close(conv(x), F.conv1d(x, conv.weight, conv.bias, dilation=2), rtol=0, atol=1e-13)
    conv.train()
    if wdrop:
        first = conv(x)
        assert torch.equal(conv(x), first)  # one mask until the next reset
        conv.reset_dropconnect()
        assert not torch.equal(conv(x), first)
        assert not torch.allclose(conv.eval()(x), first)


def test_gradient_right_whatever_grad_mode_the_first_call_runs_in():
    """Inside cached_weights, a first call under no_grad (a DEQ solver) does not lose the gradient to g and v."""
    torch.manual_seed(0)
    conv = WeightNormConv1d(3, 4, 2, dropconnect=0.3).double()
    lin = apply_weight_norm(nn.Linear(4, 4)).double()
    conv.reset_dropconnect()
    x = torch.randn(2, 3, 6, **D64)
    grads = []
    for cached in (True, False):
        conv.zero_grad()
        with cached_weights(conv) if cached else torch.enable_grad():
            with torch.no_grad():
                conv(x)
            out = conv(x)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in conv.parameters()])
        assert all(gr is not None and gr.abs().sum() > 0 for gr in grads[-1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    # cached_weights still caches the other parametrized tensors (and leaves this one alone).
    with cached_weights(lin):
        assert lin.weight is lin.weight


def test_bf16_autocast_matches_the_plain_path():
    """Under CPU bf16 autocast: the convolution in bf16, like F.conv1d; gradients in the parameters' dtype."""
    torch.manual_seed(0)
    conv = WeightNormConv1d(16, 32, 2, dropconnect=0.3)
    conv.reset_dropconnect()
    x = torch.randn(4, 16, 20, requires_grad=True)
    outs, grads = [], []
    for plain in (False, True):
        conv.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.conv1d(x, conv.weight, conv.bias) if plain else conv(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([x.grad, *(p.grad for p in conv.parameters())])
    assert torch.equal(outs[0], outs[1])
    for got, want in zip(*grads):
        assert got.dtype == want.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_errors():
    conv = WeightNormConv1d(3, 4, 2, dropconnect=0.3)
    with pytest.raises(RuntimeError, match="call reset"):
        conv(torch.randn(1, 3, 5))
    conv.eval()
    conv(torch.randn(1, 3, 5))  # eval: no mask needed
    g, v = weight_norm_tensors(conv)
    with pytest.raises(ValueError, match="DropConnect mask has shape"):
        weight_norm_conv1d(torch.randn(1, 3, 5), g, v, dropconnect=(torch.ones(4, 2, 1, dtype=torch.bool), 1.0))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WeightNormConv1d(3, 4, 2, dropconnect=1.0)
    assert weight_dropconnect(WeightNormConv1d(3, 4, 2)) is None
