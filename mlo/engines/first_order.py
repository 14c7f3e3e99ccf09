"""First-order: treat the lower solution as independent of what it reads."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Engine, RunRecord
from ..tree import Tree


@dataclass(frozen=True)
class FirstOrder(Engine):
    """``(∂w'/∂R)ᵀ u = 0``. Free; DARTS-1st style. No adjoint flows past this edge."""

    passes_adjoint = False

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        return {}
