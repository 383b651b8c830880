"""Equilibrium problems shared by the benchmarks (solvers, gradients, ...).

Each constructor returns ``(f, z0, meta)``:

- ``f``: a function of the state alone, ``z -> f(z)`` (the input is bound),
  ready for :func:`deq.solve`; it does not switch autograd on or off, so a
  gradient benchmark can call it under autograd.
- ``z0``: the initial state (zeros), batch first; a tuple ``(h, c)`` for TrellisNet.
- ``meta``: a dict with at least ``name``, ``module`` (the ``nn.Module`` whose
  ``forward(z, x)`` is the equilibrium function, for :class:`deq.DEQLayer`),
  ``x`` (the input passed as its second argument) and the sizes.

The modules are ordinary ``nn.Module`` s at their PyTorch default
initialisation (seeded), so ``f(z) == meta["module"](z, meta["x"])``.

Problems:

- :func:`tanh_contraction`: ``z = tanh(W z + U x + b)`` with symmetric ``W`` of
  spectral radius ``rho`` and small inputs, so the Jacobian at the fixed point,
  ``diag(1 - z*^2) W``, has spectral radius just below ``rho``: a contraction
  whose difficulty is set by one number.
- :func:`transformer_block`: one post-LayerNorm Transformer block with input
  injection, ``h = LN(z + Attn(z) + x)``, ``f = LN(h + FFN(h))`` (causal
  self-attention), the equilibrium function of a DEQ-Transformer.
- :func:`trellis_conv`: a TrellisNet-style weight-tied causal convolution of
  kernel 2 over the hidden state with LSTM-like gates over ``(h, c)``, input
  injected at every step (Bai, Kolter, Koltun, Trellis Networks, 2019).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Problem = tuple[Callable, object, dict]


# ----------------------------------------------------------------------------
# tanh(W z + U x + b)

class TanhLayer(nn.Module):
    """``f(z, x) = tanh(z W^T + x U^T + b)`` with a fixed symmetric ``W``.

    Args:
        width: state size ``D``.
        n_in: input size.
        rho: spectral radius of ``W`` (symmetric, so also its 2-norm).
        input_scale: rms of the injection ``x U^T + b`` per unit (small keeps
            ``tanh`` near its linear regime, so ``J(z*)`` is close to ``W``).
        generator: the random source.
    """

    def __init__(self, width: int, n_in: int, *, rho: float, input_scale: float,
                 generator: torch.Generator):
        super().__init__()
        a = torch.randn(width, width, generator=generator)
        sym = (a + a.T) / 2
        sym = sym * (rho / torch.linalg.eigvalsh(sym).abs().max())
        self.register_buffer("W", sym)
        self.U = nn.Parameter(torch.randn(width, n_in, generator=generator) * input_scale / math.sqrt(n_in))
        self.b = nn.Parameter(torch.randn(width, generator=generator) * input_scale)

    def inject(self, x: Tensor) -> Tensor:
        """The input's term ``x U^T + b``, computed once per solve."""
        return F.linear(x, self.U, self.b)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """``z``: ``(B, D)``; ``x``: the injection ``(B, D)`` from :meth:`inject`."""
        return torch.tanh(torch.addmm(x, z, self.W))  # W symmetric: z W = z W^T


def tanh_spectral_radius(W: Tensor, z_star: Tensor) -> Tensor:
    """Per-sample spectral radius of ``J = diag(s) W``, ``s = 1 - z*^2`` (``W`` symmetric).

    ``J`` is similar to the symmetric ``S^{1/2} W S^{1/2}`` (``0 < s <= 1``), so its
    eigenvalues are real and ``eigvalsh`` gives them exactly.
    """
    root = (1 - z_star.double() ** 2).clamp_min(0).sqrt()
    sym = root[:, :, None] * W.double() * root[:, None, :]
    return torch.linalg.eigvalsh(sym).abs().amax(dim=1)


def tanh_contraction(*, width: int = 256, batch: int = 64, rho: float = 0.9, n_in: int = 64,
                     input_scale: float = 0.02, seed: int = 0, dtype: torch.dtype = torch.float32) -> Problem:
    """``z = tanh(W z + U x + b)``, ``W`` symmetric with spectral radius ``rho``.

    ``meta`` also holds ``rho_J``: the spectral radius of the Jacobian at the
    fixed point (max over the batch, exact via ``eigvalsh``), and ``z_star``.
    """
    gen = torch.Generator().manual_seed(seed)
    module = TanhLayer(width, n_in, rho=rho, input_scale=input_scale, generator=gen).to(dtype)
    with torch.no_grad():
        x = module.inject(torch.randn(batch, n_in, generator=gen).to(dtype))
        z_star = _reference_fixed_point(lambda z: module(z, x), torch.zeros(batch, width, dtype=dtype))
        rho_j = tanh_spectral_radius(module.W, z_star)
    meta = dict(name=f"tanh{width}_rho{rho:g}_b{batch}", module=module, x=x, batch=batch, width=width, rho_W=rho,
                rho_J=float(rho_j.max()), rho_J_mean=float(rho_j.mean()), z_star=z_star,
                dim=width)
    return (lambda z: module(z, x)), torch.zeros(batch, width, dtype=dtype), meta


# ----------------------------------------------------------------------------
# Transformer block

class TransformerBlock(nn.Module):
    """``f(z, x) = LN2(h + FFN(h))`` with ``h = LN1(z + Attn(z) + x)``.

    Causal multi-head self-attention over the sequence, GELU feed-forward of
    width ``d_ff``, post-LayerNorm (the normalisation bounds ``f`` and makes
    the iteration converge at initialisation), no dropout.

    Args:
        d_model: model width.
        n_heads: attention heads.
        d_ff: feed-forward width.
    """

    def __init__(self, d_model: int = 128, n_heads: int = 4, d_ff: int = 512):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        """``z``, ``x``: ``(B, L, d_model)``; ``x`` is the injected input (e.g. embeddings)."""
        seq = z.shape[1]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=z.device).triu(1)  # True = masked
        a = self.attn(z, z, z, attn_mask=mask, need_weights=False)[0]
        h = self.ln1(z + a + x)
        return self.ln2(h + self.ff(h))


def transformer_block(*, d_model: int = 128, n_heads: int = 4, seq: int = 64, batch: int = 8,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> Problem:
    """A Transformer-block equilibrium at its default initialisation; ``x ~ N(0, 1)`` embeddings."""
    torch.manual_seed(seed)
    module = TransformerBlock(d_model, n_heads, 4 * d_model).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, seq, d_model, generator=gen).to(dtype)
    meta = dict(name=f"transformer_d{d_model}_L{seq}_b{batch}", module=module, x=x, batch=batch, d_model=d_model,
                n_heads=n_heads, seq=seq, dim=seq * d_model)
    return (lambda z: module(z, x)), torch.zeros(batch, seq, d_model, dtype=dtype), meta


# ----------------------------------------------------------------------------
# TrellisNet

class TrellisConv(nn.Module):
    """Weight-tied gated causal convolution over ``z = (h, c)``, each ``(B, H, L)``.

    With the injection ``x = inject(input)`` ``(B, 4H, L)`` (computed once)::

        pre_t = x_t + W_1 h_{t-1} + W_2 h_t          (kernel-2 causal conv)
        i, f, o, g = split(pre, 4)
        c_t' = sigmoid(f_t) * c_{t-1} + sigmoid(i_t) * tanh(g_t)
        h_t' = sigmoid(o_t) * tanh(c_t')

    Args:
        n_in: input channels.
        n_hidden: hidden channels ``H``.
    """

    def __init__(self, n_in: int, n_hidden: int):
        super().__init__()
        self.n_hidden = n_hidden
        self.inj = nn.Conv1d(n_in, 4 * n_hidden, kernel_size=2)
        self.conv = nn.Conv1d(n_hidden, 4 * n_hidden, kernel_size=2, bias=False)

    def inject(self, inp: Tensor) -> Tensor:
        """``(B, n_in, L) -> (B, 4H, L)``: the input's term, causal, computed once per solve."""
        return self.inj(F.pad(inp, (1, 0)))

    def forward(self, z: tuple[Tensor, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        h, c = z
        pre = self.conv(F.pad(h, (1, 0))) + x
        i, f, o, g = pre.chunk(4, dim=1)
        c_prev = F.pad(c, (1, 0))[..., :-1]
        c_new = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new


def trellis_conv(*, n_hidden: int = 128, n_in: int = 64, seq: int = 64, batch: int = 8, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Problem:
    """A TrellisNet equilibrium at its default initialisation; inputs ``N(0, 1)``."""
    torch.manual_seed(seed)
    module = TrellisConv(n_in, n_hidden).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        x = module.inject(torch.randn(batch, n_in, seq, generator=gen).to(dtype))
    zeros = torch.zeros(batch, n_hidden, seq, dtype=dtype)
    meta = dict(name=f"trellis_H{n_hidden}_L{seq}_b{batch}", module=module, x=x, batch=batch, n_hidden=n_hidden,
                seq=seq, dim=2 * n_hidden * seq)
    return (lambda z: module(z, x)), (zeros, zeros.clone()), meta


# ----------------------------------------------------------------------------
# Helpers

def _reference_fixed_point(f: Callable[[Tensor], Tensor], z0: Tensor) -> Tensor:
    """A tight fixed point in float64 (for reporting the Jacobian at z*)."""
    import deq

    f64 = lambda z: f(z.to(z0.dtype)).double()  # noqa: E731
    return deq.solve(f64, z0.double(), solver="anderson", tol=1e-10, max_iter=500).z


def jacobian_spectral_radius(f: Callable, z_star, *, iters: int = 30, seed: int = 0) -> float:
    """Power-iteration estimate of the spectral radius of ``J_f`` at ``z_star`` (per sample, max).

    Uses Jacobian-vector products (forward mode) on the flattened state;
    ``|v^T J v| / |v|`` after ``iters`` steps (a lower estimate where the dominant
    eigenvalues are complex).
    """
    parts = z_star if isinstance(z_star, tuple) else (z_star,)
    gen = torch.Generator().manual_seed(seed)
    v = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in parts)

    def norms(t):
        return torch.sqrt(sum(x.flatten(1).pow(2).sum(1) for x in t))

    def as_state(t):
        return t if isinstance(z_star, tuple) else t[0]

    est = torch.zeros(parts[0].shape[0])
    for _ in range(iters):
        n = norms(v)
        v = tuple(x / n.view(-1, *[1] * (x.dim() - 1)) for x in v)
        _, jv = torch.func.jvp(f, (as_state(parts),), (as_state(v),))
        v = jv if isinstance(jv, tuple) else (jv,)
        est = norms(v)
    return float(est.max())


def main() -> None:
    """Build each problem (tiny with ``--quick``) and print its sizes and one f-call's shapes."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the shared benchmark problems and print them.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--out", default=None, help="unused (benchmarks share this command line)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        builds = [tanh_contraction(width=32, batch=4, rho=0.9),
                  transformer_block(d_model=16, n_heads=2, seq=8, batch=2),
                  trellis_conv(n_hidden=8, n_in=4, seq=8, batch=2)]
    else:
        builds = [tanh_contraction(rho=rho) for rho in (0.9, 0.95, 0.99)] + [transformer_block(), trellis_conv()]
    for f, z0, meta in builds:
        with torch.no_grad():
            out = f(z0)
        shapes = [tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,))]
        extra = f", rho(J(z*)) = {meta['rho_J']:.4f}" if "rho_J" in meta else ""
        print(f"{meta['name']}: batch {meta['batch']}, D = {meta['dim']}, f(z0) shapes {shapes}{extra}")


if __name__ == "__main__":
    main()
