"""DEQ-Transformer LM and the adaptive embedding/softmax (deq.models.transformer, deq.models.adaptive).

Float64 on CPU wherever values are compared. The "small" test model has a
large injection (init_std 2.0), which makes its post-LN block a contraction:
plain fixed-point iteration reaches a relative residual of 1e-13 in 10-40
steps, so equilibria are exact to well below the tolerances used. (Anderson
stalls near 1e-2 on some sequences of this block, so the tests that need exact
equilibria iterate plainly.)
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import deq
from deq.models.adaptive import AdaptiveEmbedding, AdaptiveSoftmax, TiedAdaptiveLogSoftmax
from deq.models.transformer import (TRANSFORMER_PRESETS, BlockMasks, DEQTransformerLM, TransformerInput,
                                    TransformerMemory, rel_shift, sinusoid_embedding)



SMALL = dict(n_token=23, d_model=8, n_head=2, d_head=4, d_inner=16, mem_len=6, init_std=2.0)


def make_model(*, seed: int = 0, solver="fixed_point", backward="implicit", tol: float = 1e-12, max_iter: int = 300,
               fix_rng: bool = True, dtype=torch.float64, **overrides) -> DEQTransformerLM:
    torch.manual_seed(seed)
    layer = functools.partial(deq.DEQLayer, solver=solver, backward=backward, tol=tol, max_iter=max_iter,
                              on_nonconvergence="ignore", fix_rng=fix_rng)
    return DEQTransformerLM(**{**SMALL, **overrides}, deq_layer=layer).to(dtype)


def tokens(batch: int, length: int, n_token: int = SMALL["n_token"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n_token, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# Adaptive embedding and softmax

ADAPTIVE_CASES = [  # (d_embed, d_model, cutoffs, div_val)
    (16, 16, [10, 30], 2),
    (16, 12, [10, 30], 1),
    (16, 16, [], 1),
    (8, 12, [], 1),
]


@pytest.mark.parametrize("d_embed,d_model,cutoffs,div_val", ADAPTIVE_CASES)
@pytest.mark.parametrize("tie_weight", [True, False])
def test_adaptive_softmax_normalised_and_nll_per_token(d_embed, d_model, cutoffs, div_val, tie_weight):
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(50, d_embed=d_embed, d_model=d_model, cutoffs=cutoffs, div_val=div_val, init_std=0.3)
    crit = AdaptiveSoftmax(emb, tie_weight=tie_weight, tie_projs=True, init_std=0.3).double()
    hidden = torch.randn(40, d_model, dtype=torch.float64)
    target = torch.arange(40) % 50 + (torch.arange(40) >= 20) * 10  # every cluster is hit
    logp = crit.log_prob(hidden)
    assert logp.shape == (40, 50)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)
    nll = crit(hidden, target)
    assert nll.shape == (40,)
    torch.testing.assert_close(nll, -logp.gather(1, target[:, None]).squeeze(1), rtol=0, atol=1e-12)


def test_adaptive_embedding_is_scaled_projected_lookup():
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(50, d_embed=16, d_model=12, cutoffs=[10, 30], div_val=2)
    assert emb.cluster_dims == (16, 8, 4)
    toks = torch.tensor([[0, 9, 10, 29], [30, 49, 5, 31]])
    out = emb(toks)
    for b in range(2):
        for t in range(4):
            tok = int(toks[b, t])
            i = sum(tok >= c for c in (10, 30))
            lo = (0, 10, 30)[i]
            ref = 12 ** 0.5 * emb.emb_projs[i] @ emb.emb_layers[i].weight[tok - lo]
            torch.testing.assert_close(out[b, t], ref)


def test_tied_full_softmax_is_plain_tied_softmax():
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(30, d_embed=8, d_model=8)
    crit = TiedAdaptiveLogSoftmax(emb)
    with torch.no_grad():
        crit.biases[0].normal_()
    hidden, target = torch.randn(7, 8), torch.randint(0, 30, (7,))
    ref = F.cross_entropy(hidden @ emb.emb_layers[0].weight.T + crit.biases[0], target, reduction="none")
    torch.testing.assert_close(crit(hidden, target), ref)
    assert emb(target[None]).shape == (1, 7, 8)
    torch.testing.assert_close(emb(target[None])[0], 8 ** 0.5 * emb.emb_layers[0].weight[target])


def test_tied_weights_and_projections_are_shared_parameters():
    emb = AdaptiveEmbedding(50, d_embed=16, d_model=16, cutoffs=[10, 30], div_val=2)
    crit = TiedAdaptiveLogSoftmax(emb, tie_projs=[False, True, True])
    for i in range(3):
        assert crit.weights[i] is emb.emb_layers[i].weight
    assert crit.out_projs[0] is not emb.emb_projs[0]
    assert crit.out_projs[1] is emb.emb_projs[1] and crit.out_projs[2] is emb.emb_projs[2]
    # A gradient from the softmax reaches the embedding tables of the clusters it used.
    crit(torch.randn(3, 16), torch.tensor([1, 15, 40])).sum().backward()
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in emb.emb_layers)


def test_adaptive_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        AdaptiveEmbedding(50, d_embed=8, d_model=8, cutoffs=[30, 10])
    with pytest.raises(ValueError, match="strictly increasing"):
        AdaptiveEmbedding(50, d_embed=8, d_model=8, cutoffs=[10, 50])
    with pytest.raises(ValueError, match="width 0"):
        AdaptiveEmbedding(50, d_embed=8, d_model=8, cutoffs=[10, 20, 30], div_val=4)
    emb = AdaptiveEmbedding(50, d_embed=8, d_model=8, cutoffs=[10, 30], div_val=2)
    with pytest.raises(ValueError, match="one per cluster"):
        TiedAdaptiveLogSoftmax(emb, tie_projs=[True, False])
    crit = TiedAdaptiveLogSoftmax(emb)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        crit(torch.randn(2, 8), torch.tensor([3, 50]))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        TiedAdaptiveLogSoftmax(AdaptiveEmbedding(50, d_embed=8, d_model=8))(torch.randn(1, 8), torch.tensor([-1]))


# ----------------------------------------------------------------------------
# Relative attention


def test_rel_shift_moves_distance_index_to_key_index():
    batch, heads, qlen, mlen = 2, 3, 5, 4
    klen = qlen + mlen
    scores = torch.randn(batch, heads, qlen, klen, dtype=torch.float64)
    out = rel_shift(scores)
    for i in range(qlen):
        for j in range(klen):
            if j <= i + mlen:  # visible keys; the rest is masked by the caller
                assert torch.equal(out[..., i, j], scores[..., i, j + qlen - 1 - i])


def _naive_block(block, z, x):
    """f(z, x) with the relative attention written out per (query, key) pair."""
    u, mem = x.u, x.mem
    batch, qlen, d = z.shape
    mlen = mem.shape[1]
    heads, dh = block.n_head, block.d_head
    cat = torch.cat([mem, z], 1)
    if block.pre_lnorm:
        cat = F.layer_norm(cat, (d,))
    q, k, v = (block.qkv_net(cat) + u).chunk(3, -1)
    q, k, v = (t.reshape(batch, -1, heads, dh) for t in (q, k, v))
    out = torch.zeros(batch, qlen, heads, dh, dtype=z.dtype)
    for i in range(qlen):
        scores = []
        for j in range(mlen + i + 1):  # causal: keys up to the query's own position
            dist = torch.tensor([float(mlen + i - j)], dtype=z.dtype)
            r = block.r_net(sinusoid_embedding(dist, d)).reshape(heads, dh)
            a = ((q[:, mlen + i] + block.r_w_bias) * k[:, j]).sum(-1) + ((q[:, mlen + i] + block.r_r_bias) * r).sum(-1)
            scores.append(a / dh ** 0.5)
        prob = torch.softmax(torch.stack(scores, -1), -1)  # (B, H, n_keys)
        out[:, i] = torch.einsum("bhj,bjhd->bhd", prob, v[:, :mlen + i + 1])
    h = F.layer_norm(z + block.o_net(out.reshape(batch, qlen, heads * dh)), (d,))
    res = h + block.ff2(F.relu(block.ff1(h)))  # pre-LN: the residual is LN(h) too
    return res if block.pre_lnorm else F.layer_norm(res, (d,))


def _block_input(model, batch, qlen, mlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    hd3 = model.inject.out_features
    u = torch.randn(batch, mlen + qlen, hd3, generator=g, dtype=torch.float64)
    mem = torch.randn(batch, mlen, model.d_model, generator=g, dtype=torch.float64)
    pos = sinusoid_embedding(torch.arange(mlen + qlen - 1, -1, -1, dtype=torch.float64), model.d_model)
    z = torch.randn(batch, qlen, model.d_model, generator=g, dtype=torch.float64)
    return z, TransformerInput(u=u, mem=mem, pos=pos)


@pytest.mark.parametrize("pre_lnorm", [False, True])
@pytest.mark.parametrize("mlen", [0, 3])
def test_block_matches_naive_relative_attention(pre_lnorm, mlen):
    model = make_model(pre_lnorm=pre_lnorm).eval()
    z, x = _block_input(model, batch=2, qlen=5, mlen=mlen)
    block = model.block
    block.reset_dropout(2, 5, 5 + mlen, like=z)
    torch.testing.assert_close(block(z, x), _naive_block(block, z, x), rtol=0, atol=1e-12)


def _original_block(weights, z, x, masks, *, pre_lnorm):
    """The DEQ-Transformer code's equilibrium function, from its equations, in its layout.

    ``RelPartialLearnableDecoderLayer`` of locuslab/deq (``DEQModel/models/transformers/
    deq_transformer.py``, 2019, and ``DEQ-Sequence/models/deq_transformer.py``, 2021):
    ``WeightShareSelfAttention`` then ``WeightSharePositionwiseFF``, channels first
    ``(B, C, L)``, 1x1 convolutions, the pad-and-view relative shift. Its Pre-LN path::

        out    = z + drop(W_o attn(LN([mem ; z])))             (no LayerNorm after)
        inp    = LN(out)
        f(z)   = drop2(W_2 drop1(relu(W_1 inp + b_1)) + b_2) + inp

    Written from the weights alone: nothing of ours is called. ``masks`` are
    ``(att, attn_out, ff_inner, ff_out)`` in the original's shapes ``(B, H, L, K)``,
    ``(B, d, 1)``, ``(B, 1, d_inner)``, ``(B, 1, d)``, or ``None`` (eval mode).
    """
    w_qkv, w_r, w_o, b_o, w_1, b_1, w_2, b_2, r_w_bias, r_r_bias = weights
    n_head, d_head = r_w_bias.shape
    z1ss, u1ss = z.transpose(1, 2), x.u.transpose(1, 2)       # (B, d, L), (B, 3 H D, M + L)
    mems, pos_emb = x.mem.transpose(1, 2), x.pos.T[None]       # (B, d, M), (1, d, M + L)
    bsz, d_model, qlen = z1ss.shape
    mlen = mems.shape[2]
    klen = mlen + qlen

    def layer_norm_channels(t):  # LayerNorm over the channels of (B, C, L), no affine
        return F.layer_norm(t.transpose(1, 2), (d_model,)).transpose(1, 2)

    cat = torch.cat([mems, z1ss], dim=-1)
    if pre_lnorm:
        cat = layer_norm_channels(cat)
    w_heads = F.conv1d(cat, w_qkv[..., None]) + u1ss
    r_head_k = F.conv1d(pos_emb, w_r[..., None]).view(n_head, d_head, klen)
    q, k, v = torch.chunk(w_heads, 3, dim=1)
    q = q[:, :, -qlen:].reshape(bsz, n_head, d_head, qlen)
    k, v = k.reshape(bsz, n_head, d_head, klen), v.reshape(bsz, n_head, d_head, klen)
    ac = torch.einsum("bndi,bndj->bnij", q + r_w_bias[:, :, None], k)
    bd = torch.einsum("bndi,ndj->bnij", q + r_r_bias[:, :, None], r_head_k)
    bd = F.pad(bd, (1, 0)).view(bsz, n_head, klen + 1, qlen)[:, :, 1:].reshape(bsz, n_head, qlen, klen)
    score = (ac + bd) / d_head ** 0.5
    score = score.masked_fill(torch.triu(torch.ones(qlen, klen), diagonal=1 + mlen).bool(), float("-inf"))
    prob = F.softmax(score, dim=-1)
    if masks is not None:
        prob = prob * masks[0]
    attn_vec = torch.einsum("bnij,bndj->bndi", prob, v).reshape(bsz, n_head * d_head, qlen)
    attn_out = F.conv1d(attn_vec, w_o[..., None], b_o)
    if masks is not None:
        attn_out = attn_out * masks[1]
    out = attn_out + z1ss if pre_lnorm else layer_norm_channels(attn_out + z1ss)
    inp = out.transpose(1, 2)                                  # the FFN in (B, L, C)
    if pre_lnorm:
        inp = F.layer_norm(inp, (d_model,))
    relu_out1 = F.relu(inp @ w_1.T + b_1)
    if masks is not None:
        relu_out1 = relu_out1 * masks[2]
    out2 = relu_out1 @ w_2.T + b_2
    if masks is not None:
        out2 = out2 * masks[3]
    output = out2 + inp
    return output if pre_lnorm else F.layer_norm(output, (d_model,))


@pytest.mark.parametrize("pre_lnorm", [True, False])
@pytest.mark.parametrize("mlen", [0, 3])
@pytest.mark.parametrize("training", [False, True])
def test_block_matches_the_original_equations(pre_lnorm, mlen, training):
    """Our block equals the DEQ-Transformer code's, Pre-LN and Post-LN, eval mode and with its dropout masks."""
    model = make_model(pre_lnorm=pre_lnorm, init_std=0.3, dropout=0.3, dropatt=0.2).train(training)
    block = model.block
    with torch.no_grad():  # nonzero biases, so that a misplaced one shows
        for param in (block.o_net.bias, block.ff1.bias, block.ff2.bias):
            param.normal_(0.0, 0.5)
    z, x = _block_input(model, batch=3, qlen=5, mlen=mlen)
    z = 3.0 * z  # |f| of a few units, where LN(h) and h differ by O(1)
    block.reset_dropout(3, 5, 5 + mlen, like=z)
    masks = None
    if training:
        masks = (block.drop_att.mask.squeeze(-1), block.drop_attn_out.mask.transpose(1, 2),
                 block.drop_ff_inner.mask, block.drop_ff_out.mask)
        assert all((m == 0).any() and (m > 0).any() for m in masks)
    weights = tuple(t.detach() for t in (block.qkv_net.weight, block.r_net.weight, block.o_net.weight,
                                         block.o_net.bias, block.ff1.weight, block.ff1.bias, block.ff2.weight,
                                         block.ff2.bias, block.r_w_bias, block.r_r_bias))
    with torch.no_grad():
        ours, ref = block(z, x), _original_block(weights, z, x, masks, pre_lnorm=pre_lnorm)
    assert ours.dtype == torch.float64 and ref.abs().amax() > 1.0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_pre_ln_output_is_bounded_whatever_z():
    """Pre-LN f(z) = LN(h) + FFN(LN(h)): each position's norm is at most
    sqrt(d) + ||W_2|| (||W_1|| sqrt(d) + ||b_1||) + ||b_2||, however large z is
    (h + FFN(LN(h)) would carry z through and grow with it)."""
    model = make_model(pre_lnorm=True).eval()
    block = model.block
    z, x = _block_input(model, batch=2, qlen=5, mlen=3)
    d = model.d_model
    spec = lambda w: torch.linalg.matrix_norm(w.detach(), ord=2)
    bound = (d ** 0.5 + spec(block.ff2.weight) * (spec(block.ff1.weight) * d ** 0.5 + block.ff1.bias.norm())
             + block.ff2.bias.norm())
    block.reset_dropout(2, 5, 8, like=z)
    with torch.no_grad():
        for scale in (1.0, 1e3, 1e6):
            assert block(scale * z, x).norm(dim=-1).amax() <= bound


def test_pre_ln_tiny_preset_does_not_diverge_at_initialisation():
    """At initialisation the Pre-LN tiny preset predicts about uniformly (NLL ~ ln V), as Post-LN does:
    with the residual on h rather than LN(h), its DEQ reached NLLs of 1e2 to 1e6 here."""
    torch.manual_seed(0)
    layer = functools.partial(deq.DEQLayer, solver="broyden", max_iter=30, tol=1e-4, on_nonconvergence="ignore")
    cfg = {**TRANSFORMER_PRESETS["tiny"], "pre_lnorm": True}
    model = DEQTransformerLM(**cfg, deq_layer=layer).eval()
    data = tokens(4, 33, n_token=cfg["n_token"], seed=0)
    mems = None
    with torch.no_grad():
        for s in range(2):
            out = model(data[:, 16 * s:16 * s + 16], data[:, 16 * s + 1:16 * s + 17], mems=mems)
            mems = out.mems
            assert abs(out.loss.item() - math.log(cfg["n_token"])) < 0.05


# ----------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("mlen", [0, 3])
def test_block_is_causal(mlen):
    model = make_model().eval()
    z, x = _block_input(model, batch=2, qlen=6, mlen=mlen)
    model.block.reset_dropout(2, 6, 6 + mlen, like=z)
    t = 2
    z2, u2 = z.clone(), x.u.clone()
    z2[:, t + 1:] += 1.0
    u2[:, mlen + t + 1:] -= 1.0
    out, out2 = model.block(z, x), model.block(z2, x._replace(u=u2))
    torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-13)
    assert (out2[:, t + 1:] - out[:, t + 1:]).abs().amin(dim=-1).gt(1e-6).all()


@pytest.mark.parametrize("with_memory", [False, True])
@pytest.mark.parametrize("mode", ["unrolled", "deq"])
def test_model_is_causal(mode, with_memory):
    """Changing tokens after position t leaves the predictions at <= t unchanged.

    Exact for the explicit twin. For the DEQ, fixed-point iteration is causal
    step by step but stops (and picks its best iterate) on the residual of the
    whole sequence, so the agreement is to the solve tolerance. Anderson and
    Broyden mix positions through their least-squares/low-rank updates: where
    the block has more than one equilibrium (this one does, at some positions)
    they may land on another one at earlier positions when later tokens change,
    so this property is pinned with FixedPoint only.
    """
    model = make_model().eval()
    if mode == "unrolled":
        model.deq.unroll_steps = 6
    mems = model(tokens(2, 5, seed=3)).mems if with_memory else None
    inp = tokens(2, 7)
    t = 3
    changed = inp.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % SMALL["n_token"]
    with torch.no_grad():
        a, b = model(inp, mems=mems).logits, model(changed, mems=mems).logits
    atol = 1e-12 if mode == "unrolled" else 1e-9
    torch.testing.assert_close(b[:, :t + 1], a[:, :t + 1], rtol=0, atol=atol)
    assert (b[:, t + 1:] - a[:, t + 1:]).abs().amax() > 1e-4


# ----------------------------------------------------------------------------
# Memory


def test_mems_shapes_and_mem_len():
    model = make_model(mem_len=5).eval()
    batch, qlen = 2, 4
    hd3 = 3 * SMALL["n_head"] * SMALL["d_head"]
    out1 = model(tokens(batch, qlen, seed=1))
    assert isinstance(out1.mems, TransformerMemory)
    assert out1.mems.z.shape == (batch, 4, 8) and out1.mems.u.shape == (batch, 4, hd3)
    assert out1.logits.shape == (batch, qlen, SMALL["n_token"]) and out1.loss is None and out1.n_tokens == 0
    out2 = model(tokens(batch, qlen, seed=2), tokens(batch, qlen, seed=5), mems=out1.mems)
    assert out2.mems.z.shape == (batch, 5, 8) and out2.mems.u.shape == (batch, 5, hd3)
    assert out2.n_tokens == batch * qlen and out2.logits is None
    torch.testing.assert_close(out2.loss, out2.nll_sum / out2.n_tokens)
    # The memory is the last mem_len positions of [old memory ; this segment].
    assert torch.equal(out2.mems.z[:, :1], out1.mems.z[:, -1:])
    assert torch.equal(out2.mems.u[:, :1], out1.mems.u[:, -1:])
    out3 = model(tokens(batch, qlen, seed=3), mems=out2.mems)
    assert out3.mems.z.shape[1] == 5
    assert torch.equal(out3.mems.z[:, :1], out2.mems.z[:, -1:])
    assert not out3.mems.z.requires_grad and not out3.mems.u.requires_grad
    # The equilibrium of this segment is what the memory stores: a segment whose
    # memory holds only itself (mem_len = L) reproduces its own equilibrium.
    model.mem_len = qlen
    with torch.no_grad():
        z_star = model(tokens(batch, qlen, seed=2), mems=out1.mems).mems.z
    model.mem_len = 0
    out0 = model(tokens(batch, qlen, seed=2), mems=out1.mems)
    assert out0.mems.z.shape == (batch, 0, 8)
    with torch.no_grad():
        res = model.block(z_star, _segment_input(model, tokens(batch, qlen, seed=2), out1.mems))
    torch.testing.assert_close(res, z_star, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="mem_len"):
        model.mem_len = -1


def _segment_input(model, inp, mems):
    """The x of f for one segment in eval mode, rebuilt from the public pieces."""
    emb = model.word_emb(inp)
    u = torch.cat([mems.u, model.inject(emb)], 1)
    klen = u.shape[1]
    pos = sinusoid_embedding(torch.arange(klen - 1, -1, -1, dtype=emb.dtype), model.d_model)
    return TransformerInput(u=u, mem=mems.z, pos=pos)


def test_second_segment_depends_on_first_only_through_mems():
    model = make_model(tol=1e-10, backward=deq.Implicit(solver="fixed_point", tol=1e-6, max_iter=100)).eval()
    first = model(tokens(2, 5, seed=1))
    second = tokens(2, 4, seed=2)
    ref = model(second, mems=first.mems).logits
    model(tokens(2, 5, seed=7))  # an unrelated segment in between leaves no state behind
    torch.testing.assert_close(model(second, mems=first.mems).logits, ref, rtol=0, atol=1e-12)
    # ... and the memory does matter: another history gives other predictions.
    other = model(tokens(2, 5, seed=9)).mems
    assert (model(second, mems=other).logits - ref).abs().amax() > 1e-4
    assert (model(second).logits - ref).abs().amax() > 1e-4
    # Training: the loss of segment 2 sends no gradient into segment 1's graph.
    model.train()
    out1 = model(tokens(2, 5, seed=1), tokens(2, 5, seed=4))
    out2 = model(second, tokens(2, 4, seed=5), mems=out1.mems)
    assert not out1.mems.z.requires_grad and not out1.mems.u.requires_grad
    out2.loss.backward()
    out1.loss.backward()  # its graph is intact (nothing was freed by segment 2's backward)


def test_mems_validation():
    model = make_model().eval()
    with pytest.raises(ValueError, match="mems must be"):
        model(tokens(2, 3), mems=TransformerMemory(torch.zeros(2, 1, 8), torch.zeros(2, 2, 24)))
    with pytest.raises(ValueError, match="mems must be"):
        model(tokens(2, 3), mems=TransformerMemory(torch.zeros(3, 1, 8), torch.zeros(3, 1, 24)))
    with pytest.raises(ValueError, match="target must have the shape"):
        model(tokens(2, 3), tokens(2, 4))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(tokens(2, 3)[0])


# ----------------------------------------------------------------------------
# Dropout masks


def _record_masks(model):
    """Every call of f records the masks it was handed in x (they travel in TransformerInput.masks)."""
    seen = {name: [] for name in BlockMasks._fields}

    def record(module, args):
        for name, mask in zip(BlockMasks._fields, args[1].masks):
            seen[name].append(mask.clone())

    return seen, [model.block.register_forward_pre_hook(record)]


@pytest.mark.parametrize("unrolled", [False, True])
def test_dropout_masks_fixed_within_segment_redrawn_across(unrolled):
    # fix_rng=False: the masks must stay fixed because the model draws them once
    # per segment, not because the layer replays the RNG before every f-call.
    model = make_model(dropout=0.3, dropatt=0.3, solver="anderson", tol=1e-30, max_iter=6, fix_rng=False).train()
    if unrolled:
        model.deq.unroll_steps = 4
    seen, handles = _record_masks(model)
    inp, tgt = tokens(2, 5, seed=1), tokens(2, 5, seed=2)
    out1 = model(inp, tgt)
    n_calls = 4 if unrolled else model.deq.last_result.n_iter + 1  # solver iterations + the re-attached call
    first = {}
    for name, masks in seen.items():
        assert len(masks) == n_calls
        assert all(torch.equal(m, masks[0]) for m in masks), name
        assert (masks[0] == 0).any() and (masks[0] > 0).any(), name
        first[name] = masks[0]
        masks.clear()
    assert first["att"].shape == (2, SMALL["n_head"], 5, 5)
    out1.loss.backward()  # the backward pass calls f through the saved graph: no new masks
    assert all(len(m) == 0 for m in seen.values())
    out2 = model(inp, tgt, mems=out1.mems)
    assert first["att"].shape != seen["att"][0].shape  # (B, H, L, M + L): memory added
    for name, masks in seen.items():
        assert all(torch.equal(m, masks[0]) for m in masks), name
    assert not torch.equal(seen["attn_out"][0], first["attn_out"])
    assert not torch.equal(seen["ff_inner"][0], first["ff_inner"])
    for h in handles:
        h.remove()
    out2.loss.backward()


@pytest.mark.parametrize("p", [0.2, 0.8])
def test_output_dropout_zeroes_whole_token_positions(p):
    """The mask on z* before the softmax is (B, L, 1), as in the DEQ-Transformer code (which drops
    dim 1 of its (B, d, L) state): a position is kept or dropped in all its channels, positions of
    one sequence independently; keep fraction 1 - p, kept positions scaled by 1 / (1 - p)."""
    model = make_model(dropout=p, solver=deq.FixedPoint(), max_iter=2, tol=1e-30).train()
    model.deq.unroll_steps = 2
    # No exact zeros in z* of its own: dropout inside f off, and nonzero biases (the input
    # dropout may zero a whole embedding).
    for drop in (model.block.drop_attn_out, model.block.drop_ff_inner, model.block.drop_ff_out):
        drop.p = 0.0
    with torch.no_grad():
        for bias in (model.inject.bias, model.block.o_net.bias, model.block.ff1.bias, model.block.ff2.bias):
            bias.normal_()
    seen = {}
    model.deq.register_forward_hook(lambda mod, args, out: seen.__setitem__("z", out.detach()))
    model.crit.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0].detach()))
    batch, length = 64, 32
    torch.manual_seed(0)
    with torch.no_grad():
        model(tokens(batch, length), tokens(batch, length, seed=2))
    z = seen["z"]
    ratio = seen["h"].view_as(z) / z
    assert z.abs().amin() > 1e-6  # LN output: no exact zeros of its own
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=0, atol=1e-12)  # whole positions
    mask = ratio[..., 0]                                                                     # (B, L)
    kept = (mask != 0).double()
    assert abs(kept.mean().item() - (1 - p)) < 0.04, kept.mean().item()
    torch.testing.assert_close(mask[mask != 0], torch.full_like(mask[mask != 0], 1 / (1 - p)), rtol=1e-12, atol=0)
    assert (kept.std(dim=1) > 0).float().mean() > 0.9  # not one value per sequence: drawn per position
    model.eval()
    with torch.no_grad():
        model(tokens(batch, length), tokens(batch, length, seed=2))
    assert torch.equal(seen["h"].view_as(seen["z"]), seen["z"])  # eval: no output dropout


# ----------------------------------------------------------------------------
# DEQ versus the explicit twin


def test_deq_fixed_point_iteration_equals_unrolled_twin():
    """FixedPoint with max_iter = n and no early stop evaluates f at z_0 .. z_{n-1}
    (z_k = f^k(0)); with a residual that decreases monotonically the best iterate
    is z_{n-1}, and the layer's re-attached call returns f(z_{n-1}) = f^n(0): what
    the explicit twin computes with unroll_steps = n. Same dropout masks (same
    seed), same memory: loss, nll_sum and the new memory agree. Gradients differ
    by design (implicit versus backprop through n steps) except for n = 1 with
    JFB, where both differentiate the single call f(0).
    """
    n = 5
    model = make_model(solver=deq.FixedPoint(), tol=1e-30, max_iter=n, dropout=0.2, dropatt=0.2).train()
    mems = model(tokens(2, 4, seed=8)).mems
    inp, tgt = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    torch.manual_seed(11)
    out_deq = model(inp, tgt, mems=mems)
    res = model.deq.last_result
    assert res.n_iter == n and torch.equal(res.best_step, torch.full((2,), n - 1))
    model.deq.unroll_steps = n
    torch.manual_seed(11)
    out_unr = model(inp, tgt, mems=mems)
    torch.testing.assert_close(out_deq.loss, out_unr.loss, rtol=0, atol=1e-13)
    torch.testing.assert_close(out_deq.nll_sum, out_unr.nll_sum, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_deq.mems.z, out_unr.mems.z, rtol=0, atol=1e-13)
    assert torch.equal(out_deq.mems.u, out_unr.mems.u)
    for steps in (n - 1, n + 1):  # the match is at exactly n steps, not off by one
        model.deq.unroll_steps = steps
        torch.manual_seed(11)
        assert (model(inp, tgt, mems=mems).mems.z - out_deq.mems.z).abs().amax() > 1e-6


def test_single_step_jfb_gradient_equals_one_unrolled_step():
    model = make_model(solver=deq.FixedPoint(), backward=deq.JFB(), tol=1e-30, max_iter=1, dropout=0.1).train()
    inp, tgt = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    grads = []
    for steps in (None, 1):
        model.deq.unroll_steps = steps
        model.zero_grad()
        torch.manual_seed(3)
        model(inp, tgt).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-13, msg=name)


# ----------------------------------------------------------------------------
# Gradients, training, presets


def test_implicit_gradient_gradcheck():
    model = make_model(backward=deq.Implicit(solver="fixed_point", tol=1e-13, max_iter=300), tol=1e-13).train()
    mems = model(tokens(2, 3, seed=4)).mems
    inp, tgt = tokens(2, 4, seed=1), tokens(2, 4, seed=2)
    names = ["deq.f.r_w_bias", "deq.f.r_r_bias", "inject.bias", "deq.f.ff2.bias",
             "deq.f.o_net.parametrizations.weight.original0"]
    named = dict(model.named_parameters())
    params = tuple(named[n].detach().clone().requires_grad_() for n in names)

    def loss(*ps):
        out = torch.func.functional_call(model, dict(zip(names, ps)), (inp, tgt), {"mems": mems})
        return out.loss

    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert model.deq.last_result.converged.all()


def test_tiny_preset_training_decreases_loss():
    torch.manual_seed(0)
    layer = functools.partial(deq.DEQLayer, solver="anderson", max_iter=12, tol=1e-3,
                              backward=deq.Implicit(tol=1e-3, max_iter=12), on_nonconvergence="ignore")
    model = DEQTransformerLM(**TRANSFORMER_PRESETS["tiny"], deq_layer=layer)
    data = tokens(4, 17, n_token=TRANSFORMER_PRESETS["tiny"]["n_token"], seed=0)
    inp, tgt = data[:, :-1], data[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(inp, tgt).loss.item()

    before = eval_loss()
    model.train()
    for _ in range(8):
        opt.zero_grad()
        model(inp, tgt).loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.25, (before, after)


def _analytic_counts(cfg: dict) -> tuple[int, int]:
    """(total, non-embedding) from the constructor arguments alone."""
    d, heads, dh, di, n = cfg["d_model"], cfg["n_head"], cfg["d_head"], cfg["d_inner"], cfg["n_token"]
    hd = heads * dh
    wn = 1 if cfg.get("weight_norm", True) else 0  # weight norm adds g: one scalar per output row
    block = (3 * hd * d + wn * 3 * hd            # W_qkv (no bias)
             + hd * d + wn * hd                  # W_r (no bias)
             + 2 * hd                            # r_w_bias, r_r_bias
             + d * hd + d + wn * d               # W_o
             + d * di + di + wn * di             # W_1
             + di * d + d + wn * d)              # W_2
    inject = d * 3 * hd + 3 * hd
    bounds = [0, *cfg["cutoffs"], n]
    k = len(bounds) - 1
    div = cfg["div_val"]
    if div == 1:
        dims = [d] * k
        tables, projs = n * d, 0  # d_embed == d_model in every preset: no projection
    else:
        dims = [d // div ** i for i in range(k)]
        tables = sum((hi - lo) * di_ for lo, hi, di_ in zip(bounds, bounds[1:], dims))
        projs = sum(d * di_ for di_ in dims)
    tie = cfg["tie_projs"]
    tie = [tie] * k if isinstance(tie, bool) else tie
    untied_softmax_projs = 0 if div == 1 else sum(d * di_ for di_, t in zip(dims, tie) if not t)
    softmax = n + (k - 1) * (dims[0] + 1) + untied_softmax_projs  # biases, cluster vectors, untied projections
    non_emb = block + inject
    return non_emb + tables + projs + softmax, non_emb


def test_preset_parameter_counts():
    with torch.device("meta"):
        models = {name: DEQTransformerLM(**cfg) for name, cfg in TRANSFORMER_PRESETS.items()}
    for name, model in models.items():
        total, non_emb = _analytic_counts(TRANSFORMER_PRESETS[name])
        assert model.num_parameters() == total, name
        assert model.num_parameters(non_embedding=True) == non_emb, name
    medium = models["wt103_medium"]
    # Bai et al. 2019, Table 3: 98M parameters, about 71M of them outside the embedding.
    assert abs(medium.num_parameters() - 98e6) / 98e6 < 0.02
    assert abs(medium.num_parameters(non_embedding=True) - 71e6) / 71e6 < 0.02
    # The small WikiText-103 model: 4.5M non-embedding parameters.
    assert abs(models["wt103_small"].num_parameters(non_embedding=True) - 4.5e6) / 4.5e6 < 0.02
    # Tied: the softmax's cluster weights are the embedding's tables, counted once.
    crit = medium.crit.impl
    assert all(w is layer.weight for w, layer in zip(crit.weights, medium.word_emb.emb_layers))


def test_deq_layer_is_configurable_and_block_registered_once():
    layer = functools.partial(deq.DEQLayer, solver="broyden", max_iter=7)
    model = DEQTransformerLM(**TRANSFORMER_PRESETS["tiny"], deq_layer=layer)
    assert isinstance(model.deq, deq.DEQLayer) and model.deq.max_iter == 7 and model.block is model.deq.f
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and sum(n.endswith("r_w_bias") for n in names) == 1
    with pytest.raises(TypeError):
        DEQTransformerLM(**TRANSFORMER_PRESETS["tiny"], n_layers=3)


@pytest.mark.parametrize("unrolled", [False, True])
def test_weight_norm_computed_once_per_segment(unrolled):
    model = make_model(max_iter=20, tol=1e-30).train()
    if unrolled:
        model.deq.unroll_steps = 6
    block = model.block
    layers = (block.qkv_net, block.r_net, block.o_net, block.ff1, block.ff2)
    calls = []
    handles = [layer.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
    out = model(tokens(2, 5), tokens(2, 5, seed=2))
    n_f = 6 if unrolled else model.deq.last_result.n_iter + 1
    assert n_f > 5 and len(calls) == len(layers)  # once per weight, not once per f-call
    out.loss.backward()
    assert len(calls) == len(layers)
    g, v = block.ff1.parametrizations.weight.original0, block.ff1.parametrizations.weight.original1
    assert g.grad is not None and v.grad is not None and g.grad.abs().sum() > 0
    for h in handles:
        h.remove()
