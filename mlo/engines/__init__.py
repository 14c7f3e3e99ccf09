"""Hypergradient engines: each is a typed config with one method, ``vjp``.

``from_config`` / ``to_config`` (``mlo.engine_from_config`` / ``mlo.engine_to_config``)
convert between engines and plain configuration; ``ENGINES`` maps names to classes.
"""
from .base import Engine, RunRecord, StepRecord
from .finite_difference import FiniteDifference
from .first_order import FirstOrder
from .identity import FOMAML
from .implicit import CG, DenseImplicit, Neumann
from .spec import ENGINES, from_config, to_config
from .unrolled import Unrolled

__all__ = ["Engine", "RunRecord", "StepRecord", "FirstOrder", "FOMAML", "Unrolled", "FiniteDifference", "Neumann", "CG",
           "DenseImplicit", "ENGINES", "from_config", "to_config"]
