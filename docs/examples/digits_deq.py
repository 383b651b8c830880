"""An image-classification DEQ on scikit-learn's 8 x 8 digits, trained on the CPU.

The network, after the implicit-layers tutorial (NeurIPS 2020, chapter 4)::

    conv3x3(1 -> C) -> BatchNorm -> DEQ(cell) -> BatchNorm -> AvgPool(2) -> Linear(16 C -> 10)

The DEQ returns the fixed point ``z* = cell(z*, x)`` of a weight-tied
ResNet-style cell fed the stem's output ``x`` at every step. The cell uses
GroupNorm, which normalises each sample on its own, so the cell is
batch-separable: every sample may stop at its own tolerance, and
``compact=True`` runs the cell only on the samples still iterating. The
BatchNorms, which mix samples, sit outside the DEQ.

Usage::

    python docs/examples/digits_deq.py                    # 1347 training images, 5 epochs
    python docs/examples/digits_deq.py --jac-weight 0.5   # with Jacobian regularisation
    python docs/examples/digits_deq.py --quick            # a few seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq import DEQLayer
from deq.grad import Implicit
from deq.reg import spectral_radius
from deq.solvers import Anderson


@dataclass(frozen=True)
class Config:
    channels: int = 12
    inner: int = 24
    groups: int = 4
    epochs: int = 5
    batch: int = 64
    lr: float = 3e-3           # Adam, cosine decay to 0 over the run
    tol: float = 1e-2          # forward: relative residual ||f(z) - z|| / ||f(z)||
    backward_tol: float = 1e-2  # the adjoint solve (the tutorial uses 1e-2 both ways)
    max_iter: int = 25
    jac_weight: float = 0.0    # weight of the Jacobian regulariser (0: off)
    n_test: int = 450
    n_train: int | None = None  # None: all the other images
    seed: int = 0


QUICK = Config(channels=8, inner=16, epochs=2, n_test=128, n_train=256)


def load_digits_split(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` standardised on the training set."""
    from sklearn.datasets import load_digits  # scikit-learn ships the 1797 images: no download

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    test, train = order[:cfg.n_test], order[cfg.n_test:]
    if cfg.n_train is not None:
        train = train[:cfg.n_train]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class ResNetCell(nn.Module):
    """``f(z, x) = GN_3(relu(z + GN_2(x + conv_2(GN_1(relu(conv_1(z)))))))``."""

    def __init__(self, channels: int, inner: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        # Small convolutions start f near GN_3(relu(z + GN_2(x))), a contraction in z.
        nn.init.normal_(self.conv1.weight, std=0.01)
        nn.init.normal_(self.conv2.weight, std=0.01)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.norm1(F.relu(self.conv1(z)))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(y))))


class DigitsDEQ(nn.Module):
    """Stem, DEQ, head. ``forward(images, jac_reg=n)`` also returns the Jacobian regulariser."""

    def __init__(self, cfg: Config):
        super().__init__()
        c = cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c))
        self.deq = DEQLayer(ResNetCell(c, cfg.inner, cfg.groups),
                            solver=Anderson(m=5, lam=1e-4),
                            backward=Implicit(tol=cfg.backward_tol, max_iter=cfg.max_iter),
                            tol=cfg.tol, max_iter=cfg.max_iter, compact=True,
                            on_nonconvergence="ignore")  # counted in self.deq.counts, printed at the end
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * c, 10))

    def forward(self, images: Tensor, *, jac_reg: int = 0) -> tuple[Tensor, Tensor | None]:
        x = self.stem(images)                                   # (B, C, 8, 8), injected at every step
        if jac_reg:
            z, jac_loss = self.deq(x, jac_reg=jac_reg)          # z0 = zeros_like(x)
        else:
            z, jac_loss = self.deq(x), None
        return self.head(z), jac_loss


def evaluate(model: DigitsDEQ, x: Tensor, y: Tensor) -> tuple[float, float, float]:
    """Test accuracy, mean forward f-calls per sample and the converged fraction."""
    model.eval()
    with torch.no_grad():
        pred = model(x)[0].argmax(dim=1)
    stats = model.deq.last_result.summary()
    return (pred == y).double().mean().item(), stats["nstep_mean"], stats["converged_frac"]


def train(cfg: Config) -> dict[str, float]:
    x_train, y_train, x_test, y_test = load_digits_split(cfg)
    torch.manual_seed(cfg.seed)
    model = DigitsDEQ(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * -(-len(y_train) // cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    print(f"{len(y_train)} training and {len(y_test)} test images, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print("epoch   loss  fwd nstep  bwd nstep  test acc  test nstep  converged  seconds")
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        loss_sum, fwd, bwd, n_batches = 0.0, 0.0, 0.0, 0
        for idx in order.split(cfg.batch):
            logits, jac_loss = model(x_train[idx], jac_reg=1 if cfg.jac_weight else 0)
            loss = F.cross_entropy(logits, y_train[idx])
            total = loss if jac_loss is None else loss + cfg.jac_weight * jac_loss
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
            res = model.deq.last_result  # this batch's forward solve; .backward filled by backward()
            loss_sum += loss.item()
            fwd += res.nstep.double().mean().item()
            bwd += res.backward.nstep.double().mean().item()
            n_batches += 1
        acc, nstep, conv = evaluate(model, x_test, y_test)
        print(f"{epoch:5d}  {loss_sum / n_batches:5.3f}  {fwd / n_batches:9.1f}  {bwd / n_batches:9.1f}  "
              f"{acc:8.3f}  {nstep:10.1f}  {conv:9.3f}  {time.perf_counter() - start:7.1f}")
    # How contractive the trained cell is at the test fixed points (below 1: locally contracting).
    with torch.no_grad():
        x = model.stem(x_test)
    rho = spectral_radius(model.deq.f, model.deq.last_result.z, x, n_iter=20)
    print(f"spectral radius of df/dz at the test fixed points: mean {rho.mean().item():.3f}, "
          f"max {rho.max().item():.3f}")
    fwd_counts, bwd_counts = model.deq.counts.forward, model.deq.counts.backward
    print(f"solves with a sample above tol: forward {fwd_counts.failed} of {fwd_counts.calls}, "
          f"backward {bwd_counts.failed} of {bwd_counts.calls} ({bwd_counts.diverged} diverged)")
    return {"test_acc": acc, "test_nstep": nstep, "converged_frac": conv, "rho_max": rho.max().item()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few hundred images")
    parser.add_argument("--jac-weight", type=float, default=0.0,
                        help="weight of the Jacobian regulariser in the loss (default 0: off)")
    args = parser.parse_args(argv)
    return train(dataclasses.replace(QUICK if args.quick else Config(), jac_weight=args.jac_weight))


if __name__ == "__main__":
    main()
