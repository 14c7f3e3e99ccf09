"""Flattening, padding and gathering helpers for ``DataParallel``'s collectives."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..tree import Tree


def all_gather_into(out: Tensor, t: Tensor, group=None) -> None:
    """Every process's ``t`` concatenated into ``out`` (equal sizes)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # renamed in recent torch
    gather(out, t, group=group)


def group_by_dtype(tree: Tree) -> dict:
    groups: dict = {}
    for k, v in tree.items():
        groups.setdefault(v.dtype, []).append(k)
    return groups


def group_by_dtype_device(tree: Mapping[str, Tensor]) -> dict:
    groups: dict = {}
    for k, v in tree.items():
        groups.setdefault((v.dtype, v.device), []).append(k)
    return groups


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = flat[i:i + t.numel()].view(t.shape).to(t.device)
        i += t.numel()
    return out


def pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    extra = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, extra])


def first_occurrence(idx: Tensor) -> Tensor:
    """Boolean mask: True where ``idx[i]`` appears for the first time (no host sync)."""
    order = torch.argsort(idx, stable=True)
    s = idx[order]
    first = torch.ones_like(s, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    keep = torch.empty_like(first)
    keep[order] = first
    return keep
