"""Hypergradient engines: each is a typed config with one method, ``vjp``.

The implicit engines (``Neumann``, ``CG``, ``MINRES``, ``DenseImplicit``,
``Implicit(solver=...)``) are one implicit VJP with a solver from ``mlo.solvers``.

``from_config`` / ``to_config`` (``mlo.engine_from_config`` / ``mlo.engine_to_config``)
convert between engines and plain configuration; ``ENGINES`` maps names to classes.
"""
from .base import Engine, RunRecord, StepRecord
from .finite_difference import FiniteDifference
from .first_order import FirstOrder
from .identity import FOMAML
from .implicit import CG, MINRES, DenseImplicit, Implicit, Neumann, observe_solves
from .spec import ENGINES, from_config, to_config
from .unrolled import Unrolled

__all__ = ["Engine", "RunRecord", "StepRecord", "FirstOrder", "FOMAML", "Unrolled", "FiniteDifference", "Neumann", "CG",
           "MINRES", "Implicit", "DenseImplicit", "observe_solves", "ENGINES", "from_config", "to_config"]
