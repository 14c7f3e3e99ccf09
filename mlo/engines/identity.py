"""First-order MAML: the identity-Jacobian approximation of an inner run restarted from its reader."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import GraphError
from ..tree import Tree
from .base import Engine, RunRecord


@dataclass(frozen=True)
class FOMAML(Engine):
    """``(∂φ'/∂θ)ᵀ u ≈ u`` for the problem φ was reset from (``Problem.init_from=θ``); 0 for other reads.

    φ' = U(...U(θ, g(θ))...) is the inner solution started at θ. Its exact
    Jacobian is ∏ (I − η H_j) for plain SGD (what ``Unrolled(steps=K)`` applies);
    first-order MAML drops every second-derivative term, keeping ``I``: the
    adjoint at φ' passes through unchanged to θ. The path through the inner
    objective's own reads (e.g. an iMAML proximal term) is second order too and
    is dropped. Free: no objective evaluation, no records.

    Unlike ``FirstOrder`` (``∂w'/∂R = 0``: the edge is cut, DARTS-1st), this
    engine sends the adjoint on; on an edge without ``init_from`` it would be
    ``FirstOrder``, so the graph refuses it there.
    """

    #: ``Problem.init_from``: the start value's Jacobian is taken as I, and so is the whole run's
    init_path = "identity"

    def validate_for(self, problem, where: str) -> None:
        if problem.init_from is None:
            raise GraphError(f"{where}: FOMAML needs Problem.init_from (the inner problem restarts from the "
                             "problem the adjoint passes to); without it use FirstOrder")

    def reference(self) -> Engine:
        from .unrolled import Unrolled
        return Unrolled()

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        if site.init_from not in wrt:
            return {}
        theta = site.reads[site.init_from]
        # a task-batched problem (Problem.tasks): every task started at θ, so the tasks' adjoints add up
        return {site.init_from: {k: v if v.shape == theta[k].shape else v.sum(0) for k, v in u.items()}}
