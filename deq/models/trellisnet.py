"""DEQ-TrellisNet: a weight-tied gated temporal convolution at its equilibrium, as a language model.

TrellisNet (Bai, Kolter, Koltun, ICLR 2019) applies one causal convolution with
an LSTM-like gate at every layer, with shared weights and the input injected at
every layer. Its DEQ version (Bai, Kolter, Koltun, NeurIPS 2019) replaces the
stack by its fixed point. Layout: every sequence tensor here is channels-first,
``(B, C, L)`` (batch, channels, time), as ``nn.Conv1d`` wants; token tensors
are ``(B, L)``.

Per segment of ``L`` tokens, with ``H = nhid + nout``:

* embed the tokens with the tied embedding matrix ``E`` (``(ntoken, ninp)``),
  embedding dropout (whole words) and variational input dropout, giving
  ``x`` of shape ``(B, ninp, L)``;
* the injection ``u = WN-Conv1d_{ninp -> 4H, kernel k}(x)``, left-padded with
  zeros so position ``t`` sees tokens ``t-k+1 .. t``: ``(B, 4H, L)``, once;
* the history ``(h0, c0)``, each ``(B, H, 1)``: the last time step of the
  previous segment's equilibrium (zeros for the first segment), detached.
  It is all a segment keeps of the previous one: as in the DEQ-TrellisNet code,
  the injection at a segment's first position sees zeros in place of the
  previous segment's last tokens, so a segment run with ``mems`` is close to,
  not exactly, the continuation of the concatenated sequence;
* the equilibrium ``(h*, c*) = f((h*, c*), (u, h0, c0))`` of the cell
  :class:`TrellisNetCell`, found by the model's :class:`deq.DEQLayer`::

      pre  = u + WN-Conv1d_{H -> 4H, kernel k}(drop_h([h0 ; h]))     (B, 4H, L)
      i, o, g, f = split(pre, 4)                                      each (B, H, L)
      c'   = sigmoid(f) * [c0 ; c[:, :, :-1]] + sigmoid(i) * tanh(g)
      h'   = sigmoid(o) * tanh(c')

  (``[h0 ; h]`` pads ``h`` on the left with ``k - 1`` copies of ``h0``;
  ``drop_h`` is variational hidden dropout, ``dropouth``);
* the readout: the last ``nout`` channels of ``h*``, variational output
  dropout, then the decoder tied to ``E`` (full softmax, or an adaptive softmax
  with ``cutoffs``) scoring the next token.

Every dropout mask is drawn once per segment, before the solver runs (see
:mod:`deq.models.dropout`): the solver calls ``f`` dozens of times and must see
one fixed function. Both convolutions are
:class:`~deq.models.weight_norm.WeightNormConv1d`: their weight-normalised
kernels are recomputed from ``(g, v)`` at each call and in the backward pass,
never saved, so nothing is cached per segment.

Explicit twin: ``model.deq.unroll_steps = L`` makes the DEQ layer apply ``f``
exactly ``L`` times from ``z = 0`` with ordinary autograd (the weight-tied
``L``-layer TrellisNet: the pretraining phase and the baseline);
``model.deq.unroll_steps = None`` switches back to the equilibrium. The model
needs nothing else.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq.layer import DEQLayer
from deq.models.adaptive import AdaptiveEmbedding, TiedAdaptiveLogSoftmax
from deq.models.dropout import VariationalDropout, embedding_dropout, locked_dropout
from deq.models.output import LMOutput, readout
from deq.models.weight_norm import WeightNormConv1d

__all__ = ["DEQTrellisNetLM", "LMOutput", "TRELLISNET_PRESETS", "TrellisInput", "TrellisNetCell"]


# Constructor keyword arguments of DEQTrellisNetLM (the Hydra configs copy them).
# ptb: the TrellisNet word-level PTB recipe (Bai et al. 2019: dropout 0.45,
#      dropouti 0.45, dropouth 0.28, emb_dropout 0.1, wdrop 0.5); the DEQ paper
#      reports 24M parameters, 20M without the embedding.
# wt103: the DEQ paper's WikiText-103 size (180M parameters, 45M without the
#      embedding) with the DEQ code's WT103 dropouts and its adaptive-softmax cutoffs.
# tiny: a CPU-sized model for tests and the PTB sample.
TRELLISNET_PRESETS: dict[str, dict] = {
    "ptb": dict(ntoken=10000, ninp=400, nhid=1000, nout=400, kernel_size=2, dropout=0.45, dropouti=0.45,
                dropouth=0.28, emb_dropout=0.1, wdrop=0.5, cutoffs=None),
    "wt103": dict(ntoken=267735, ninp=512, nhid=1600, nout=512, kernel_size=2, dropout=0.1, dropouti=0.1,
                  dropouth=0.1, emb_dropout=0.0, wdrop=0.0, cutoffs=[2800, 20000, 76000]),
    "tiny": dict(ntoken=10000, ninp=32, nhid=48, nout=32, kernel_size=2, dropout=0.1, dropouti=0.1,
                 dropouth=0.1, emb_dropout=0.0, wdrop=0.0, cutoffs=None),
}


class TrellisInput(NamedTuple):
    """The ``x`` of the cell's ``f(z, x)`` for one segment, every tensor batch first.

    Attributes:
        u: ``(B, 4H, L)`` the injection.
        h0, c0: ``(B, H, 1)`` each, the history.
        mask: ``(B, H, 1)`` the hidden-dropout mask, or ``None`` (no dropout).
    """

    u: Tensor
    h0: Tensor
    c0: Tensor
    mask: Tensor | None = None


def _check_size(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_prob(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


class TrellisNetCell(nn.Module):
    """The DEQ-TrellisNet equilibrium function ``f((h, c), (u, h0, c0)) -> (h', c')``.

    One weight-normalised causal convolution over the hidden sequence plus the
    injection, then an LSTM-style gate; the cell state is carried one step to
    the right::

        pre = u + Conv1d(drop_h([h0 ; h]))          (B, 4H, L)
        i, o, g, f = pre.chunk(4, dim=1)             input, output, candidate, forget
        c'  = sigmoid(f) * [c0 ; c[..., :-1]] + sigmoid(i) * tanh(g)
        h'  = sigmoid(o) * tanh(c')

    Position ``t`` of the output depends on ``h`` at ``t-k+1 .. t``, ``c`` at
    ``t-1`` and ``u`` at ``t`` only (causal). The convolution's weight is
    initialised ``N(0, 0.01)`` (weight and bias), as in the DEQ-TrellisNet code,
    then weight-normalised per output channel; its kernel is recomputed at each
    call and in the backward pass, not saved
    (:class:`~deq.models.weight_norm.WeightNormConv1d`).

    Call :meth:`reset` once per segment, before the solver, to draw the hidden
    dropout and DropConnect masks.

    Args:
        h_size: ``H = nhid + nout``, channels of ``h`` and ``c``.
        kernel_size: ``k``, the temporal kernel size (2 in the paper).
        dropouth: variational hidden dropout on ``[h0 ; h]`` (one mask per
            sequence and channel for the whole segment).
        wdrop: DropConnect on the direction ``v`` of the weight-normalised
            weight (taps on earlier time steps only).

    Raises:
        ValueError: non-positive sizes or probabilities outside ``[0, 1)``.
    """

    def __init__(self, h_size: int, *, kernel_size: int = 2, dropouth: float = 0.0, wdrop: float = 0.0):
        super().__init__()
        self.h_size = _check_size("h_size", h_size)
        self.kernel_size = _check_size("kernel_size", kernel_size)
        # Its kernel is recomputed in the backward pass rather than saved once per
        # segment (deq.models.weight_norm.WeightNormConv1d): 59.8 MiB at PTB size.
        self.conv = WeightNormConv1d(h_size, 4 * h_size, kernel_size, dropconnect=_check_prob("wdrop", wdrop),
                                     init_std=0.01)
        self.drop = VariationalDropout(_check_prob("dropouth", dropouth))

    def extra_repr(self) -> str:
        return f"h_size={self.h_size}, kernel_size={self.kernel_size}"

    def reset(self, h0: Tensor) -> None:
        """Draw this segment's dropout masks (no-op in eval mode).

        Args:
            h0: ``(B, H, 1)`` history (only its shape, dtype and device are used).
        """
        self.drop.reset(h0)
        self.conv.reset_dropconnect()

    def hidden_mask(self) -> Tensor | None:
        """The ``(B, H, 1)`` hidden-dropout mask :meth:`reset` drew (``None`` in eval or without dropout).

        Raises:
            RuntimeError: training mode with dropout and no :meth:`reset` since.
        """
        if not self.drop.training or self.drop.p == 0.0:
            return None
        if self.drop.mask is None:
            raise RuntimeError("TrellisNetCell: no dropout mask drawn; call reset(h0) once per segment, outside "
                               "the solver")
        return self.drop.mask

    def forward(self, z: tuple[Tensor, Tensor], x: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """One TrellisNet layer.

        Args:
            z: ``(h, c)``, each ``(B, H, L)``.
            x: ``(u, h0, c0)``: injection ``(B, 4H, L)`` and history ``(B, H, 1)``
                each; or :class:`TrellisInput` ``(u, h0, c0, mask)``, whose
                hidden-dropout mask (``(B, H, 1)`` or ``None``) then replaces
                the one :meth:`reset` drew (carried in ``x``, it is sliced with
                the rows of an active-set solve).

        Returns:
            ``(h', c')``, each ``(B, H, L)``.
        """
        h, c = z
        u, h0, c0 = x[:3]
        pad = self.kernel_size - 1
        hp = torch.cat([h0.expand(-1, -1, pad), h], dim=2) if pad > 0 else h
        if len(x) > 3:
            hp = hp if x[3] is None else hp * x[3]
        else:
            hp = self.drop(hp)
        pre = u + self.conv(hp)
        i, o, g, f = pre.chunk(4, dim=1)
        c_prev = torch.cat([c0, c[:, :, :-1]], dim=2)
        c_new = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return h_new, c_new


class DEQTrellisNetLM(nn.Module):
    """DEQ-TrellisNet language model (Bai, Kolter, Koltun, NeurIPS 2019).

    See the module docstring for the equations. The embedding matrix ``E``
    (``(ntoken, ninp)``, uniform in ``[-0.1, 0.1]``) is shared by the input
    lookup and the decoder (``ninp == nout``); the decoder adds a bias per word.
    Without ``cutoffs`` the decoder is the full softmax; with ``cutoffs`` it is
    an adaptive softmax (Grave et al., 2017) whose clusters are row blocks of
    ``E`` (no projections, as in the DEQ-TrellisNet WikiText-103 code), with its
    own ``(n_clusters - 1, ninp)`` cluster vectors and biases. Both are
    :class:`deq.models.adaptive.TiedAdaptiveLogSoftmax` over an
    :class:`~deq.models.adaptive.AdaptiveEmbedding` with ``div_val=1`` used as
    the holder of ``E``; the lookup itself is TrellisNet's (no ``sqrt(d)``
    scale).

    Args:
        ntoken: vocabulary size.
        ninp: embedding width.
        nhid: hidden channels of the cell beyond the output ones.
        nout: output channels, the last ``nout`` of ``H = nhid + nout``; must
            equal ``ninp`` (tied decoder).
        kernel_size: temporal kernel size of both convolutions (2 in the paper).
        dropout: variational output dropout before the decoder.
        dropouti: variational input dropout on the embeddings.
        dropouth: variational hidden dropout inside the cell.
        emb_dropout: embedding dropout (whole words of ``E``).
        wdrop: DropConnect on the weight-norm directions of the injection and
            the cell convolutions (taps on earlier time steps only).
        cutoffs: adaptive-softmax cluster boundaries (e.g. ``[2800, 20000,
            76000]`` for WikiText-103); ``None`` for the full softmax.
        causal: solve in the layer's causal mode (``time_dim=2``): the
            log-probability at position ``t`` depends on tokens ``<= t`` only,
            exactly, whatever the solver budget.
        deq_layer: builds the DEQ layer from the cell: ``deq_layer(cell)`` must
            return an ``nn.Module`` that holds the cell as ``.f`` and is called
            as ``layer(x, z0=...)``, like :class:`deq.DEQLayer` (the default,
            with its default solver and backward). Pass e.g.
            ``functools.partial(deq.DEQLayer, solver="anderson", max_iter=30)``.
            Stored as ``self.deq``. The cell draws no random numbers itself,
            so ``fix_rng=False`` is safe (and saves an RNG reset per f-call).

    Raises:
        ValueError: ``ninp != nout``, non-positive sizes, probabilities outside
            ``[0, 1)``, bad cutoffs.
        TypeError: ``deq_layer`` did not return a module holding the cell as ``.f``.

    Example:
        >>> model = DEQTrellisNetLM(**TRELLISNET_PRESETS["tiny"])
        >>> out = model(tokens, targets)             # tokens, targets: (B, L) int64
        >>> out.loss.backward()
        >>> out2 = model(next_tokens, next_targets, mems=out.mems)
        >>> model.deq.unroll_steps = 20              # the explicit twin: 20 weight-tied layers
    """

    def __init__(self, *, ntoken: int, ninp: int, nhid: int, nout: int, kernel_size: int = 2,
                 dropout: float = 0.0, dropouti: float = 0.0, dropouth: float = 0.0, emb_dropout: float = 0.0,
                 wdrop: float = 0.0, cutoffs: Sequence[int] | None = None, causal: bool = True,
                 deq_layer: Callable[[nn.Module], nn.Module] = DEQLayer):
        super().__init__()
        for name, value in (("ntoken", ntoken), ("ninp", ninp), ("nhid", nhid), ("nout", nout)):
            _check_size(name, value, minimum=0 if name == "nhid" else 1)
        if ninp != nout:
            raise ValueError(f"the decoder is tied to the embedding, so nout must equal ninp; got ninp={ninp}, "
                             f"nout={nout}")
        self.ntoken, self.ninp, self.nhid, self.nout = ntoken, ninp, nhid, nout
        self.h_size = nhid + nout
        self.kernel_size = _check_size("kernel_size", kernel_size)
        self.dropout = _check_prob("dropout", dropout)
        self.dropouti = _check_prob("dropouti", dropouti)
        self.emb_dropout = _check_prob("emb_dropout", emb_dropout)
        self.cutoffs = tuple(int(c) for c in cutoffs) if cutoffs is not None else ()

        self.encoder = AdaptiveEmbedding(ntoken, d_embed=ninp, d_model=ninp, cutoffs=self.cutoffs, div_val=1)
        nn.init.uniform_(self.embedding_weight, -0.1, 0.1)
        self.inject_conv = WeightNormConv1d(ninp, 4 * self.h_size, kernel_size, dropconnect=_check_prob("wdrop", wdrop))
        cell = TrellisNetCell(self.h_size, kernel_size=kernel_size, dropouth=dropouth, wdrop=wdrop)
        layer = deq_layer(cell)
        if not isinstance(layer, nn.Module) or getattr(layer, "f", None) is not cell:
            raise TypeError("deq_layer(cell) must return an nn.Module holding the cell as .f (like deq.DEQLayer), "
                            f"got {type(layer).__name__}")
        self.deq = layer
        self.causal = bool(causal)
        if self.causal:
            self.deq.time_dim = 2  # h and c are (B, H, L)
        self.decoder = TiedAdaptiveLogSoftmax(self.encoder, tie_projs=True)

    @property
    def embedding_weight(self) -> nn.Parameter:
        """The tied ``(ntoken, ninp)`` embedding / decoder matrix ``E``."""
        return self.encoder.emb_layers[0].weight

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        """Trainable parameter count, each shared tensor once (weight-norm ``g`` and ``v`` both count).

        Args:
            non_embedding: subtract the tied embedding matrix ``E`` (the paper's
                "non-embedding" count; decoder biases and cluster vectors stay in).
        """
        total = sum(p.numel() for p in self.parameters())
        return total - self.embedding_weight.numel() if non_embedding else total

    def _history(self, mems: tuple[Tensor, Tensor] | None, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (batch, self.h_size, 1)
        if mems is None:
            zeros = like.new_zeros(shape)
            return zeros, zeros
        if not (isinstance(mems, (tuple, list)) and len(mems) == 2 and all(isinstance(m, Tensor) for m in mems)):
            raise ValueError("mems must be None or the (h0, c0) pair returned by the previous segment's forward")
        h0, c0 = mems
        if tuple(h0.shape) != shape or tuple(c0.shape) != shape:
            raise ValueError(f"mems must be two tensors of shape {shape} (batch, nhid + nout, 1); got "
                             f"{tuple(h0.shape)} and {tuple(c0.shape)}")
        return h0.detach().to(like.dtype), c0.detach().to(like.dtype)

    def set_unroll_steps(self, steps: int | None) -> None:
        """Switch to the explicit weight-tied twin of ``steps`` layers, or back to the DEQ with ``None``.

        The one switch between unrolled pretraining and DEQ training.

        Raises:
            ValueError: ``steps`` neither ``None`` nor an integer ``>= 1``.
        """
        self.deq.unroll_steps = steps

    def _check_prefix(self, prefix: Tensor | None, batch: int) -> int:
        if prefix is None:
            return 0
        if prefix.dim() != 2 or prefix.shape[0] != batch or prefix.shape[1] > self.kernel_size - 1:
            raise ValueError(f"prefix must be (B={batch}, P) token ids with P <= kernel_size - 1 = "
                             f"{self.kernel_size - 1}, got shape {tuple(prefix.shape)}")
        return prefix.shape[1]

    def forward(self, input: Tensor, target: Tensor | None = None, *,
                mems: tuple[Tensor, Tensor] | None = None, prefix: Tensor | None = None,
                max_iter: int | None = None, jac_reg: int = 0) -> LMOutput:
        """Score one segment of tokens and hand its history to the next.

        Args:
            input: ``(B, L)`` token ids.
            target: ``(B, L)`` next-token ids, or ``None`` to get log-probabilities.
            mems: ``(h0, c0)`` from the previous segment's :class:`LMOutput`
                (each ``(B, nhid + nout, 1)``); ``None`` starts from zeros.
            prefix: ``(B, P)`` token ids just before ``input``, ``P <= kernel_size - 1``:
                the injection's left context (its convolution reads the
                ``kernel_size - 1`` inputs before each position). ``None``:
                zeros, as the DEQ-TrellisNet code has at a segment's start.
                With ``mems`` and ``prefix`` a segment continues the previous
                one exactly (token-by-token decoding uses this).
            max_iter: this call's forward solver budget (see :class:`deq.DEQLayer`).
            jac_reg: Hutchinson probes of the Jacobian regulariser at ``z*``;
                with ``jac_reg > 0`` the output's ``jac_loss`` holds it.

        Returns:
            :class:`LMOutput` (loss, nll_sum, n_tokens, mems, logits, jac_loss).

        Raises:
            ValueError: ``input`` not 2-D, ``target`` of another shape, bad ``mems``
                or ``prefix``.
        """
        if input.dim() != 2:
            raise ValueError(f"input must be (batch, length) token ids, got shape {tuple(input.shape)}")
        if target is not None and target.shape != input.shape:
            raise ValueError(f"target must have the shape of input {tuple(input.shape)}, got {tuple(target.shape)}")
        batch, length = input.shape
        before = self._check_prefix(prefix, batch)
        tokens = input if before == 0 else torch.cat([prefix, input], dim=1)
        emb = embedding_dropout(tokens, self.embedding_weight, self.emb_dropout, training=self.training)
        emb = locked_dropout(emb, self.dropouti, time_dim=1, training=self.training)     # (B, P + L, ninp)
        x = emb.transpose(1, 2)                                                         # (B, ninp, P + L)
        h0, c0 = self._history(mems, batch, like=x)

        self.deq.f.reset(h0)  # this segment's masks, before the solver
        self.inject_conv.reset_dropconnect()
        u = self.inject_conv(F.pad(x, (self.kernel_size - 1 - before, 0)))             # (B, 4H, L)
        z0 = (x.new_zeros(batch, self.h_size, length), x.new_zeros(batch, self.h_size, length))
        x_in = TrellisInput(u=u, h0=h0, c0=c0, mask=self.deq.f.hidden_mask())
        z = self.deq(x_in, z0=z0, max_iter=max_iter, jac_reg=jac_reg)
        (h, c), jac_loss = z if jac_reg else (z, None)
        new_mems = (h[:, :, -1:].detach(), c[:, :, -1:].detach())

        out = h[:, self.h_size - self.nout:, :].transpose(1, 2)                         # (B, L, nout)
        out = locked_dropout(out, self.dropout, time_dim=1, training=self.training)
        return readout(self.decoder, out, target, new_mems, n_token=self.ntoken, jac_loss=jac_loss)
