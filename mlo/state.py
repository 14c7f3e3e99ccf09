"""Whole-graph state (parameters, optimizers, schedulers, data positions, buffers, RNG);
the files it goes into are written by ``mlo.checkpoint``."""
from __future__ import annotations

import copy
import torch

from . import rng
from .errors import MLOError
from .graph import Graph


def graph_state_dict(graph: Graph) -> dict:
    """Everything needed to continue a run exactly, as tensors and plain values."""
    problems = {}
    for name, p in graph.problems.items():
        problems[name] = {
            "params": {k: v.detach().clone() for k, v in p.params_tree.items()},
            "optimizer": copy.deepcopy(p.optimizer.state_dict()),   # state_dict() aliases live buffers
            "scheduler": copy.deepcopy(p.scheduler_obj.state_dict()) if p.scheduler_obj is not None else None,
            "data": p.stream.state_dict(),
        }
    buffers = [{k: b.detach().clone() for k, b in m.named_buffers()} for m in graph.modules()]
    return {"problems": problems, "buffers": buffers, "rng": rng.capture_all()}


def load_graph_state_dict(graph: Graph, state: dict, data: bool = True) -> None:
    """Inverse of ``graph_state_dict``; the graph must be built the same way.

    ``data=False`` leaves the data streams where they are (used to undo a trial step).
    """
    missing = set(graph.problems) ^ set(state["problems"])
    if missing:
        raise MLOError(f"checkpoint does not match the graph: problems differ ({sorted(missing)})")
    with torch.no_grad():
        for name, p in graph.problems.items():
            s = state["problems"][name]
            for k, v in p.params_tree.items():
                if k not in s["params"] or s["params"][k].shape != v.shape:
                    raise MLOError(f"checkpoint does not match problem {name!r}: parameter {k!r}")
                v.copy_(s["params"][k])
            p.optimizer.load_state_dict(copy.deepcopy(s["optimizer"]))   # load_state_dict would alias them
            if p.scheduler_obj is not None and s["scheduler"] is not None:
                p.scheduler_obj.load_state_dict(copy.deepcopy(s["scheduler"]))
        for m, saved in zip(graph.modules(), state["buffers"]):
            for k, b in m.named_buffers():
                if k in saved:
                    b.copy_(saved[k])
    if data:
        for name, p in graph.problems.items():
            p.stream.load_state_dict(state["problems"][name]["data"])
    rng.restore_all(state["rng"])
