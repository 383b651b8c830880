"""DEQ-TrellisNet and its building blocks: dropout held fixed per segment, cached weight norm."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import deq
from deq.models.dropout import (VariationalDropout, WeightDropout, apply_weight_dropout, embedding_dropout,
                                embedding_dropout_mask, locked_dropout)
from deq.models.trellisnet import TRELLISNET_PRESETS, DEQTrellisNetLM, LMOutput, TrellisNetCell
from deq.models.weight_norm import (WeightNormConv1d, WeightNormDropConnect, apply_weight_norm, cached_weights,
                                    weight_dropconnect, weight_norm_tensors)

SMALL = dict(ntoken=40, ninp=8, nhid=6, nout=8, kernel_size=2, dropout=0.0, dropouti=0.0, dropouth=0.0,
             emb_dropout=0.0, wdrop=0.0, cutoffs=None)




def small(deq_layer=deq.DEQLayer, dtype=torch.float64, seed=0, **overrides) -> DEQTrellisNetLM:
    torch.manual_seed(seed)
    return DEQTrellisNetLM(**{**SMALL, **overrides}, deq_layer=deq_layer).to(dtype)


def tight(**kw):
    """A DEQ layer that solves to near machine precision (float64 tests)."""
    return functools.partial(deq.DEQLayer, solver="anderson", tol=1e-12, max_iter=200, stop_mode="abs",
                             backward=deq.Implicit(tol=1e-12, max_iter=200, stop_mode="abs"),
                             on_nonconvergence="raise", **kw)


def tokens(batch, length, ntoken=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ntoken, (batch, length), generator=g)


def capture_equilibrium(model):
    """Record the (h, c) the DEQ layer returns on each call."""
    seen = []
    model.deq.register_forward_hook(lambda mod, args, out: seen.append(tuple(t.detach() for t in out)))
    return seen


# ----------------------------------------------------------------------------- dropout

def test_variational_dropout_mask_fixed_until_reset():
    torch.manual_seed(0)
    drop = VariationalDropout(0.5)
    h = torch.randn(4, 6, 9)
    drop.reset(h)
    first = drop(h)
    for _ in range(5):
        assert torch.equal(drop(h), first)
    mask = first / h
    # Shared over time: one value per (sequence, channel), 0 or 1 / (1 - p).
    assert torch.allclose(mask, mask[:, :, :1].expand_as(mask))
    assert set(mask[:, :, 0].unique().tolist()) <= {0.0, 2.0}
    # Longer inputs (a history pad) reuse the same mask.
    longer = torch.randn(4, 6, 10)
    assert torch.allclose(drop(longer), longer * mask[:, :, :1])
    drop.reset(h)
    assert not torch.equal(drop(h), first)


@pytest.mark.parametrize("p", [0.2, 0.8])
def test_every_dropout_mask_keeps_1_minus_p_and_has_mean_one(p):
    """Keep fraction 1 - p and expected scale 1 for each mask producer (p != 0.5 on purpose:
    ``Tensor.bernoulli_()`` without an argument keeps with probability 0.5 whatever p is)."""
    torch.manual_seed(0)
    n = 200_000
    drop = VariationalDropout(p)
    ones = torch.ones(n, 1, 1)
    drop.reset(ones)
    weight_drop = WeightDropout(p, temporal=False)
    weight_drop.reset(torch.ones(n, 1))
    masks = {
        "variational": drop(ones).flatten(),
        "locked": locked_dropout(torch.ones(n, 1, 2), p).flatten()[::2],
        "embedding": embedding_dropout_mask(torch.arange(n), n, p).flatten(),
        "weight": weight_drop(torch.ones(n, 1)).flatten(),
    }
    for name, mask in masks.items():
        kept = (mask != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 0.01, (name, kept)
        assert abs(mask.double().mean().item() - 1.0) < 0.03, (name, mask.mean().item())
        values = mask.unique()
        assert len(values) == 2 and values[0] == 0 and torch.isclose(values[1], torch.tensor(1 / (1 - p))), name


def test_variational_dropout_contract_errors_and_eval():
    drop = VariationalDropout(0.3)
    with pytest.raises(RuntimeError, match="call reset"):
        drop(torch.ones(2, 3, 4))
    drop.reset(torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="does not match the mask"):
        drop(torch.ones(2, 4, 4))
    drop.eval()
    x = torch.randn(2, 3, 4)
    assert drop(x) is x
    state = torch.get_rng_state()
    drop.reset(x)  # eval: no mask, no random numbers consumed
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariationalDropout(1.0)
    with pytest.raises(TypeError):
        VariationalDropout(0.1, timedim=1)


def test_locked_dropout_shares_mask_over_time():
    torch.manual_seed(0)
    x = torch.ones(3, 7, 5)  # (B, L, C), time_dim=1
    y = locked_dropout(x, 0.5, time_dim=1)
    assert torch.equal(y, y[:, :1].expand_as(y))
    assert locked_dropout(x, 0.5, time_dim=1, training=False) is x


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    weight = torch.randn(20, 4)
    inp = torch.randint(0, 20, (6, 30))
    out = embedding_dropout(inp, weight, 0.5)
    dropped = out.abs().sum(-1) == 0
    assert dropped.any() and not dropped.all()
    for word in inp.unique():
        at = inp == word
        # A word is dropped everywhere or nowhere; kept words are scaled by 1 / (1 - p).
        assert dropped[at].all() or not dropped[at].any()
        if not dropped[at].any():
            assert torch.allclose(out[at], 2.0 * weight[word].expand(int(at.sum()), 4))
    assert torch.equal(embedding_dropout(inp, weight, 0.5, training=False), weight[inp])
    assert embedding_dropout_mask(inp, 20, 0.0) is None


def test_weight_dropout_temporal_and_fixed():
    torch.manual_seed(0)
    conv = nn.Conv1d(5, 7, 3)
    w = conv.weight.detach().clone()
    drop = apply_weight_dropout(conv, p=0.5, temporal=True)
    with pytest.raises(RuntimeError, match="call reset"):
        conv.weight
    drop.reset(w)
    w1 = conv.weight.detach()
    assert torch.equal(conv.weight, w1)
    assert torch.equal(w1[..., -1], w[..., -1])  # the current-time tap is never dropped
    ratio = w1[..., :-1] / w[..., :-1]
    assert set(ratio.flatten().round(decimals=5).unique().tolist()) == {0.0, 2.0}
    drop.reset(w)
    assert not torch.equal(conv.weight, w1)
    conv.eval()
    assert torch.equal(conv.weight, w)
    full = WeightDropout(0.5, temporal=False)
    full.reset(w)
    assert (full.mask[..., -1] == 0).any()


# ----------------------------------------------------------------------------- weight norm

def test_weight_norm_dropconnect_drops_direction_and_keeps_norm():
    torch.manual_seed(0)
    ref, conv = nn.Conv1d(4, 6, 2), nn.Conv1d(4, 6, 2)
    conv.load_state_dict(ref.state_dict())
    apply_weight_norm(ref)
    apply_weight_norm(conv, dropconnect=0.5)
    assert isinstance(conv.parametrizations.weight[0], WeightNormDropConnect)
    assert set(conv.state_dict()) == set(ref.state_dict())
    g, v = weight_norm_tensors(conv)
    weight_dropconnect(conv).reset(v)
    w = conv.weight
    # w = g * d(v) / ||d(v)||: every output channel keeps norm g; dropped entries are 0.
    assert torch.allclose(torch.linalg.vector_norm(w, dim=(1, 2)), g.flatten().abs())
    assert (w[..., 0] == 0).any() and not (w[..., 1] == 0).any()
    conv.eval()
    assert torch.allclose(conv.weight, ref.weight)
    assert weight_dropconnect(ref) is None


class _Counter:
    def __init__(self, *modules):
        self.n = 0
        for m in modules:
            m.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


def _wn_counter(model):
    return _Counter(model.inject_conv.parametrizations.weight[0], model.deq.f.conv.parametrizations.weight[0])


@pytest.mark.parametrize("backward", ["implicit", "upg", "npg"])
def test_convolutions_save_no_kernel_and_every_parameter_trains(backward):
    """The weight-normalised kernels are recomputed, never saved: of the tensors autograd keeps for a
    training step, none of a kernel's shape is a float tensor other than v itself (the DropConnect
    mask is kept as bool); the parametrized weight is never evaluated; every parameter gets a gradient."""
    model = small(deq_layer=functools.partial(deq.DEQLayer, backward=backward, max_iter=20), wdrop=0.3,
                  dropouth=0.2)
    counter = _wn_counter(model)
    f_calls = _Counter(model.deq.f)
    convs = (model.inject_conv, model.deq.f.conv)
    directions = {v.untyped_storage().data_ptr(): v.shape for v in (weight_norm_tensors(c)[1] for c in convs)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(tokens(2, 7), tokens(2, 7, seed=1))
    out.loss.backward()
    assert f_calls.n > 5 and counter.n == 0
    kernel_like = [t for t in saved if t.shape in directions.values()]
    assert kernel_like and all(t.dtype == torch.bool or t.untyped_storage().data_ptr() in directions
                               for t in kernel_like)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()
               if p is not model.decoder.cluster_weight)


def _grads(model, inp, tgt):
    model.zero_grad()
    torch.manual_seed(3)
    model(inp, tgt).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("unroll", [None, 5])
def test_recomputed_kernel_gradients_equal_the_plain_convolution(monkeypatch, unroll):
    """Gradients with kernels recomputed in backward equal those of nn.Conv1d reading its parametrized
    weight (autograd through g, DropConnect and v at every call), DEQ and unrolled, dropouts on."""
    model = small(deq_layer=tight(), wdrop=0.3, dropouth=0.2, dropout=0.1)
    model.deq.unroll_steps = unroll
    inp, tgt = tokens(2, 6), tokens(2, 6, seed=1)
    ours = _grads(model, inp, tgt)
    counter = _wn_counter(model)
    monkeypatch.setattr(WeightNormConv1d, "forward", nn.Conv1d.forward)
    plain = _grads(model, inp, tgt)
    assert counter.n > 2  # the plain path evaluates the weight at every call
    for name in ours:
        assert torch.allclose(ours[name], plain[name], rtol=1e-9, atol=1e-12), name
    g_name = "deq.f.conv.parametrizations.weight.original0"
    assert ours[g_name].abs().sum() > 0


def test_cached_weights_fills_cache_in_grad_mode():
    conv = apply_weight_norm(nn.Conv1d(3, 4, 2))
    with cached_weights(conv):
        with torch.no_grad():
            w = conv.weight
        assert w.requires_grad
    assert not parametrize._cache_enabled


# ----------------------------------------------------------------------------- the cell and the model

def test_cell_is_causal_and_gates():
    torch.manual_seed(0)
    cell = TrellisNetCell(5, kernel_size=2).double().eval()
    B, H, L = 2, 5, 8
    h, c = torch.randn(B, H, L, dtype=torch.float64), torch.randn(B, H, L, dtype=torch.float64)
    u = torch.randn(B, 4 * H, L, dtype=torch.float64)
    h0, c0 = torch.randn(B, H, 1, dtype=torch.float64), torch.randn(B, H, 1, dtype=torch.float64)
    hn, cn = cell((h, c), (u, h0, c0))
    t = 4
    h2, c2, u2 = h.clone(), c.clone(), u.clone()
    h2[..., t + 1:] += 1.0
    c2[..., t + 1:] += 1.0
    u2[..., t + 1:] += 1.0
    hm, cm = cell((h2, c2), (u2, h0, c0))
    assert torch.equal(hm[..., :t + 1], hn[..., :t + 1]) and torch.equal(cm[..., :t + 1], cn[..., :t + 1])
    assert not torch.allclose(hm[..., t + 1:], hn[..., t + 1:])
    # The gate equations, position 0 by hand (history pads h and c).
    w, b = cell.conv.weight, cell.conv.bias
    pre0 = u[..., 0] + torch.einsum("oik,bik->bo", w, torch.stack([h0[..., 0], h[..., 0]], dim=-1)) + b
    i, o, g, f = pre0.chunk(4, dim=1)
    c_ref = torch.sigmoid(f) * c0[..., 0] + torch.sigmoid(i) * torch.tanh(g)
    assert torch.allclose(cn[..., 0], c_ref)
    assert torch.allclose(hn[..., 0], torch.sigmoid(o) * torch.tanh(c_ref))


@pytest.mark.parametrize("with_history", [False, True])
@pytest.mark.parametrize("unroll", [None, 6])
def test_model_is_causal(with_history, unroll):
    model = small(deq_layer=tight()).eval()
    model.deq.unroll_steps = unroll
    mems = model(tokens(2, 5, seed=7)).mems if with_history else None
    inp = tokens(2, 9)
    t = 4
    changed = inp.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 40
    with torch.no_grad():
        a = model(inp, mems=mems).logits
        b = model(changed, mems=mems).logits
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])
    if unroll is not None:
        assert torch.equal(a[:, :t + 1], b[:, :t + 1])  # the explicit net is exactly causal
    else:
        # The exact equilibrium is causal; the solver mixes positions only through its tolerance.
        assert torch.allclose(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-9)


def test_shapes_and_mems_handoff():
    model = small(deq_layer=tight()).eval()
    seen = capture_equilibrium(model)
    B, L, H = 3, 6, SMALL["nhid"] + SMALL["nout"]
    first = model(tokens(B, L), tokens(B, L, seed=1))
    assert isinstance(first, LMOutput)
    assert first.loss.shape == () and first.n_tokens == B * L and first.logits is None
    assert torch.allclose(first.loss * first.n_tokens, first.nll_sum)
    h, c = seen[-1]
    assert h.shape == c.shape == (B, H, L)
    # The history is the last time step of the equilibrium, detached.
    assert torch.equal(first.mems[0], h[:, :, -1:]) and torch.equal(first.mems[1], c[:, :, -1:])
    assert not first.mems[0].requires_grad and not first.mems[1].requires_grad

    seg2 = tokens(B, L, seed=2)
    with torch.no_grad():
        after_first = model(seg2, mems=first.mems).logits
        other = model(tokens(B, L, seed=5), tokens(B, L, seed=6))
        after_other = model(seg2, mems=other.mems).logits
        fresh = model(seg2).logits
        # The previous segment matters only through mems: replaying the same mems gives the same result.
        again = model(seg2, mems=tuple(m.clone() for m in first.mems)).logits
    assert after_first.shape == (B, L, SMALL["ntoken"])
    assert torch.allclose(after_first.exp().sum(-1), torch.ones(B, L, dtype=torch.float64))
    assert not torch.allclose(after_first, after_other) and not torch.allclose(after_first, fresh)
    assert torch.equal(after_first, again)
    # The history enters the second segment's first position: the equilibrium there
    # satisfies the cell equation with h0, c0 = mems.
    model(seg2, mems=first.mems)
    h2, c2 = seen[-1]
    with torch.no_grad():
        u = model.inject_conv(nn.functional.pad(model.embedding_weight[seg2].transpose(1, 2), (1, 0)))
        fh, fc = model.deq.f((h2, c2), (u, *first.mems))
    assert torch.allclose(fh, h2, atol=1e-10) and torch.allclose(fc, c2, atol=1e-10)


def test_bad_arguments():
    model = small()
    with pytest.raises(ValueError, match="mems must be two tensors"):
        model(tokens(2, 4), mems=(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)))
    with pytest.raises(ValueError, match="target must have the shape"):
        model(tokens(2, 4), tokens(2, 5))
    with pytest.raises(ValueError, match="nout must equal ninp"):
        DEQTrellisNetLM(**{**SMALL, "nout": 7})
    with pytest.raises(ValueError, match="dropouth"):
        DEQTrellisNetLM(**{**SMALL, "dropouth": 1.5})
    with pytest.raises(TypeError):
        DEQTrellisNetLM(**SMALL, dropoute=0.1)
    with pytest.raises(TypeError, match="holding the cell"):
        DEQTrellisNetLM(**SMALL, deq_layer=lambda f: nn.Identity())


def test_dropout_masks_fixed_within_segment_and_new_across_segments():
    model = small(deq_layer=functools.partial(deq.DEQLayer, max_iter=15, on_nonconvergence="ignore"),
                  dropouth=0.3, wdrop=0.4, dropout=0.2, dropouti=0.2, emb_dropout=0.1)
    cell = model.deq.f
    records = []
    cell.conv.register_forward_pre_hook(
        lambda mod, args: records[-1].append((cell.drop.mask, mod.weight.detach().clone())))
    inp, tgt = tokens(2, 6), tokens(2, 6, seed=1)
    for _ in range(2):
        records.append([])
        model(inp, tgt).loss.backward()
    for seg in records:
        assert len(seg) > 5  # solver iterations + the re-attached call
        for mask, weight in seg[1:]:
            assert torch.equal(mask, seg[0][0]) and torch.equal(weight, seg[0][1])
    assert not torch.equal(records[0][0][0], records[1][0][0])
    assert not torch.equal(records[0][0][1], records[1][0][1])
    model.eval()  # eval: no masks, the plain weight-normalised weight
    records.append([])
    with torch.no_grad():
        model(inp, tgt)
    g, v = weight_norm_tensors(cell.conv)
    w_eval = g * v / torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True)
    assert all(mask is None and torch.allclose(w, w_eval) for mask, w in records[-1])


def test_deq_with_fixed_point_equals_explicit_twin():
    """FixedPoint with no early stop and max_iter=L returns f(z_best) with z_best = f^(L-1)(0): the twin's f^L(0).

    The solver evaluates z_0 = 0, ..., z_{L-1} (its L f-calls); its best iterate is
    the last one when the residual decreases (pinned via best_step), and the DEQ
    layer returns one more re-attached call f(z_best). Dropout on, same masks
    (same seed): the losses and the histories agree to the last bit.
    """
    L = 6
    layer = functools.partial(deq.DEQLayer, solver=deq.FixedPoint(), tol=1e-300, max_iter=L, stop_mode="abs",
                              on_nonconvergence="ignore")
    model = small(deq_layer=layer, dropouth=0.2, wdrop=0.3, dropout=0.1, dropouti=0.1, emb_dropout=0.1)
    inp, tgt = tokens(3, 7), tokens(3, 7, seed=1)
    torch.manual_seed(11)
    implicit = model(inp, tgt)
    res = model.deq.last_result
    assert res.n_iter == L and torch.equal(res.best_step, torch.full((3,), L - 1))
    model.deq.unroll_steps = L
    torch.manual_seed(11)
    explicit = model(inp, tgt)
    assert torch.equal(implicit.loss, explicit.loss)
    assert torch.equal(implicit.mems[0], explicit.mems[0]) and torch.equal(implicit.mems[1], explicit.mems[1])
    model.deq.unroll_steps = L + 1
    torch.manual_seed(11)
    assert not torch.allclose(model(inp, tgt).loss, implicit.loss, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- sizes and training

def test_ptb_preset_parameter_counts():
    with torch.device("meta"):
        model = DEQTrellisNetLM(**TRELLISNET_PRESETS["ptb"])
    total, non_emb = model.num_parameters(), model.num_parameters(non_embedding=True)
    # E 10000x400; injection conv 400->5600, k=2 (+ bias, + g); cell conv 1400->5600, k=2 (+ bias, + g);
    # decoder bias 10000.
    assert total == 10000 * 400 + (400 * 5600 * 2 + 2 * 5600) + (1400 * 5600 * 2 + 2 * 5600) + 10000
    assert round(total / 1e6, 1) == 24.2 and round(non_emb / 1e6, 1) == 20.2


def test_wt103_preset_parameter_counts():
    with torch.device("meta"):
        model = DEQTrellisNetLM(**TRELLISNET_PRESETS["wt103"])
    total, non_emb = model.num_parameters(), model.num_parameters(non_embedding=True)
    assert abs(total / 180e6 - 1) < 0.02 and abs(non_emb / 45e6 - 1) < 0.02
    assert model.embedding_weight.shape == (267735, 512)


@pytest.mark.filterwarnings("ignore:DEQLayer forward solve")
def test_tiny_preset_trains():
    torch.manual_seed(0)
    model = DEQTrellisNetLM(**{**TRELLISNET_PRESETS["tiny"], "ntoken": 50})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inp, tgt = tokens(4, 10, ntoken=50), tokens(4, 10, ntoken=50, seed=1)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = model(inp, tgt).loss.item()
        model.train()
        return loss

    before = eval_loss()
    for _ in range(15):
        opt.zero_grad()
        model(inp, tgt).loss.backward()
        opt.step()
    assert eval_loss() < before - 0.3


def test_adaptive_softmax_variant():
    model = small(deq_layer=tight(), cutoffs=[10, 25]).eval()
    inp, tgt = tokens(2, 5), tokens(2, 5, seed=1)
    with torch.no_grad():
        scored = model(inp, tgt)
        logp = model(inp).logits
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    nll = -logp.gather(-1, tgt[..., None]).sum()
    assert torch.allclose(nll, scored.nll_sum)
    # Tied: the decoder's cluster rows are the embedding matrix itself.
    assert all(w is model.embedding_weight for w in model.decoder.weights)


def test_implicit_gradient_gradcheck():
    model = small(deq_layer=tight())
    with torch.no_grad():  # a less trivial Jacobian than the N(0, 0.01) initialisation
        g, _ = weight_norm_tensors(model.deq.f.conv)
        g.uniform_(0.3, 0.8)
    names = ["deq.f.conv.parametrizations.weight.original0", "inject_conv.bias"]
    base = dict(model.named_parameters())
    inp, tgt = tokens(2, 4), tokens(2, 4, seed=1)

    def loss(*values):
        params = {**base, **dict(zip(names, values))}
        return torch.func.functional_call(model, params, (inp, tgt)).nll_sum

    values = tuple(base[n].detach()[:].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss, values, eps=1e-6, atol=1e-6, rtol=1e-4)
