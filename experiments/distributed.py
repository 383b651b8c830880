"""torchrun / DistributedDataParallel helpers: joining the job, the device, sharding, collectives.

Data are split over ranks by rows of the global batch: rank ``r`` of ``W``
gets rows ``[r B/W, (r+1) B/W)`` of every batch, so ``W`` processes see exactly
the batch one process would, and DDP's gradient average over equal shards is
the gradient of the mean loss over the whole batch. Alone (``W = 1``) every
helper is the identity and nothing touches ``torch.distributed``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) job.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them (0, 1, 0 alone).
        owned: :func:`setup` initialised the process group (and :func:`teardown` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Join the torchrun job described by the environment, or run alone.

    An already initialised default process group (a test that spawned its
    workers itself) is used as is. Otherwise ``WORLD_SIZE > 1`` (set by
    torchrun) initialises one: NCCL when the run uses CUDA, gloo on CPUs.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), owned=True)


def teardown(info: DistInfo) -> None:
    if info.owned and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Raises:
        ValueError: ``name`` is not a device, or names CUDA where there is none.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def shard_rows(batch: Tensor, info: DistInfo, key: str) -> Tensor:
    """Rows ``[r B/W, (r+1) B/W)`` of a ``(B, ...)`` batch for rank ``r`` of ``W``.

    Raises:
        ValueError: ``B`` is not divisible by ``W`` (the message names ``key``).
    """
    if not info.enabled:
        return batch
    rows = batch.shape[0]
    if rows % info.world_size:
        raise ValueError(f"{key}={rows} must be divisible by the number of processes ({info.world_size})")
    per = rows // info.world_size
    return batch[info.rank * per:(info.rank + 1) * per]


def all_reduce(values: list[float], info: DistInfo, device: torch.device, *, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over ranks, in float64; the identity alone."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(model: nn.Module, info: DistInfo, device: torch.device, *,
         find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when running with several processes, else ``model``.

    The DEQ layer's backward needs nothing special: the solver runs under
    ``no_grad``, the re-attached call of ``f`` is an ordinary graph whose
    parameter gradients reach DDP's per-parameter hooks once, and Implicit's
    adjoint VJPs are taken with respect to ``z`` only (``autograd.grad``), which
    never touches the parameters' ``.grad`` (tests/test_ddp.py checks the
    gradients against one process on the whole batch).
    """
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)
