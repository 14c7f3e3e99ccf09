"""``Direction``: one problem's update direction, as ``Stepper.direction`` returns it."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .engines.base import StepGraph
from .tree import Tree


@dataclass
class Direction:
    """One problem's update direction, computed and not yet applied (signed: a descent direction).

    ``total = direct + hyper``; ``loss`` is the objective's value (unsigned);
    ``metrics`` what the step logs; ``adjoints`` the adjoint that reached each
    problem of the reverse sweep (filled only when asked for); ``checks`` the
    device-side finiteness tests ``(what, edge or None, ok)`` the NaN policy reads.
    """

    total: Tree
    direct: Tree
    hyper: Tree | None
    loss: Tensor
    metrics: dict[str, Tensor]
    adjoints: dict[str, Tree] = field(default_factory=dict)
    checks: list = field(default_factory=list)
    step_graph: StepGraph | None = None   # the gradient with its graph, kept for Unrolled(reuse_step_graph=True)
