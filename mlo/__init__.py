"""mlo: multi-level optimization for PyTorch with swappable hypergradient engines.

Declare ``Problem``s, join them in a ``Graph``, pick an engine per edge, run::

    graph = mlo.Graph([inner, outer])
    mlo.Runner(graph).run(steps=100)

See docs/mlo.md for the concepts and each engine's math. The submodules
``mlo.distributed`` (torchrun data parallelism), ``mlo.precision`` (bf16
autocast), ``mlo.rng`` (random-state capture and restore) and ``mlo.rows``
(row-sparse tables, ``Problem(rows=...)``) are public too.
"""
from . import distributed, precision, rng, rows
from .checkpoint import CheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from .check import CheckReport, check_hypergradient, draw_batches, hypergradient
from .context import Context
from . import solvers
from .engines import (CG, ENGINES, MINRES, DenseImplicit, Engine, FiniteDifference, FirstOrder, FOMAML, Implicit,
                      Neumann, Unrolled,
                      from_config as engine_from_config, to_config as engine_to_config)
from .errors import ConfigError, GraphError, InputTypeError, MLOError, NonFiniteError
from .graph import Graph
from .metrics import CSVWriter, JSONLWriter, ProgressBar, TensorBoardWriter
from .problem import Accumulated, Problem, SameBatch
from .run import RunCheckpoint, Runner, read_checkpoint
from .state import graph_state_dict, load_graph_state_dict, preserve_buffers
from .step import Direction, Stepper

__version__ = "0.1.0"

__all__ = [
    "Problem", "SameBatch", "Accumulated", "Graph", "Context", "Runner", "Stepper", "Direction",
    "Engine", "FirstOrder", "FOMAML", "Unrolled", "FiniteDifference", "Neumann", "CG", "MINRES", "Implicit", "DenseImplicit", "ENGINES",
    "solvers",
    "engine_from_config", "engine_to_config",
    "hypergradient", "check_hypergradient", "CheckReport", "draw_batches",
    "MLOError", "GraphError", "ConfigError", "InputTypeError", "NonFiniteError",
    "JSONLWriter", "CSVWriter", "TensorBoardWriter", "ProgressBar",
    "graph_state_dict", "load_graph_state_dict", "save_checkpoint", "load_checkpoint", "CheckpointError",
    "RunCheckpoint", "read_checkpoint", "has_checkpoint",
    "preserve_buffers", "distributed", "precision", "rng", "rows",
]
