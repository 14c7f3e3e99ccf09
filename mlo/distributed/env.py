"""This process among several: the launcher's environment, the process group, ranks."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ..errors import MLOError


@dataclass(frozen=True)
class Env:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched), before ``init``."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MLOError(f"environment variable {name}={value!r} is not an integer") from None


def init(device: str | torch.device = "cpu", backend: str | None = None, timeout_s: float = 1800.0) -> Env:
    """Join the process group that ``torchrun`` describes in the environment.

    ``device``: ``"cpu"`` or ``"cuda"``; with CUDA each process takes the GPU of its
    ``LOCAL_RANK``. ``backend`` defaults to NCCL for CUDA and gloo for the CPU.
    A single process (no launcher, or ``--nproc_per_node=1`` on one node) joins
    nothing and gets ``world_size == 1``.
    """
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MLOError("CUDA was requested but no CUDA device is available")
        if dev.index is None:
            count = torch.cuda.device_count()
            if local >= count:
                raise MLOError(f"LOCAL_RANK={local} but this node has only {count} CUDA device(s): "
                               f"start at most {count} processes per node (--nproc_per_node)")
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world <= 1:
        return Env(0, 1, 0, dev, None)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend, **kwargs)
    return Env(dist.get_rank(), dist.get_world_size(), local, dev, backend)


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def current_world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


rank = current_rank                  # this process's rank (0 without a process group)
world_size = current_world           # number of processes (1 without a process group)


def control_device(group=None) -> torch.device:
    """Where small control tensors must live for the group's backend (NCCL: this process's GPU)."""
    if current_world(group) > 1 and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Iterable[float], group=None) -> list[float]:
    """Element-wise sum over processes of a few numbers (counts of an evaluation, ...)."""
    values = [float(v) for v in values]
    if current_world(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=control_device(group))
    dist.all_reduce(t, group=group)
    return t.tolist()
