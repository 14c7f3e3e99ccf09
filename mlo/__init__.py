"""mlo: multi-level optimization for PyTorch with swappable hypergradient engines.

Declare ``Problem``s, join them in a ``Graph``, pick an engine per edge, run::

    graph = mlo.Graph([inner, outer])
    mlo.Runner(graph).run(steps=100)

See docs/mlo.md for the concepts and each engine's math.
"""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .check import CheckReport, check_hypergradient, hypergradient
from .context import Context
from .engines import CG, ENGINES, Engine, FiniteDifference, FirstOrder, Neumann, Unrolled, make_engine
from .errors import ConfigError, GraphError, MLOError, NonFiniteError
from .graph import Graph
from .metrics import CSVWriter, JSONLWriter, ProgressBar, TensorBoardWriter
from .problem import Problem, SameBatch
from .run import Runner
from .state import graph_state_dict, load_graph_state_dict
from .step import Stepper, preserve_buffers

__version__ = "0.1.0"

__all__ = [
    "Problem", "SameBatch", "Graph", "Context", "Runner", "Stepper",
    "Engine", "FirstOrder", "Unrolled", "FiniteDifference", "Neumann", "CG", "ENGINES", "make_engine",
    "hypergradient", "check_hypergradient", "CheckReport",
    "MLOError", "GraphError", "ConfigError", "NonFiniteError",
    "JSONLWriter", "CSVWriter", "TensorBoardWriter", "ProgressBar",
    "graph_state_dict", "load_graph_state_dict", "save_checkpoint", "load_checkpoint", "CheckpointError",
    "preserve_buffers",
]
