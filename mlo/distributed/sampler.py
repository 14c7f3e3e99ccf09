"""``ShardedSampler``: each process's disjoint share of one seeded permutation per epoch."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import ConfigError
from .env import current_rank, current_world


class ShardedSampler(Sampler[int]):
    """This process's share of one seeded random permutation per epoch.

    Every process draws the same permutation from ``generator`` (seed it the same
    everywhere, e.g. pass the ``DataLoader``'s own generator) and keeps positions
    ``rank, rank + W, rank + 2W, ...`` of its first ``W·⌊n/W⌋`` entries, so the
    shards are disjoint, equally long, and a new epoch (a new ``iter``) draws a new
    permutation. With per-process batch ``b`` the W processes' k-th batches
    together hold exactly the examples of the k-th batch of size ``W·b`` that one
    process would draw with this sampler. Because the permutation comes from
    ``generator``, ``mlo``'s data positions replay it exactly on resume.
    """

    def __init__(self, num_examples: int, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = True, generator: torch.Generator | None = None, seed: int = 0):
        w = current_world() if world_size is None else world_size
        r = current_rank() if rank is None else rank
        if not isinstance(w, int) or w < 1:
            raise ConfigError(f"ShardedSampler.world_size: expected an integer >= 1, got {w!r}")
        if not isinstance(r, int) or not 0 <= r < w:
            raise ConfigError(f"ShardedSampler.rank: expected an integer in [0, {w}), got {r!r}")
        if num_examples < w:
            raise ConfigError(f"cannot split {num_examples} example(s) over {w} processes "
                              "(each process needs at least one)")
        self.num_examples, self.rank, self.world_size, self.shuffle = num_examples, r, w, shuffle
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        n, w = self.num_examples, self.world_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        yield from order[self.rank: n - n % w: w].tolist()

    def __len__(self) -> int:
        return self.num_examples // self.world_size
