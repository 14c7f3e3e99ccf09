"""Whole-graph state (parameters, optimizers, schedulers, data positions, buffers, RNG);
the files it goes into are written by ``mlo.checkpoint``."""
from __future__ import annotations

import contextlib
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
            "optimizer": copy.deepcopy(p.torch_optimizer.state_dict()),   # state_dict() aliases live buffers
            "scheduler": (copy.deepcopy(p.torch_scheduler.state_dict()) if p.torch_scheduler is not None
                          else None),
            "data": p.stream.state_dict(),
        }
    buffers = [{k: b.detach().clone() for k, b in m.named_buffers()} for m in graph.modules()]
    return {"problems": problems, "buffers": buffers, "rng": rng.capture_all()}


def load_graph_state_dict(graph: Graph, state: dict, data: bool = True, rng_state: bool = False) -> None:
    """Inverse of ``graph_state_dict``; the graph must be built the same way.

    ``data=False`` leaves the data streams where they are (used to undo a trial step).
    The global random generators (torch, numpy, Python) are left alone unless
    ``rng_state=True`` (what a resumed run wants: ``Runner`` passes it).
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
            p.torch_optimizer.load_state_dict(copy.deepcopy(s["optimizer"]))   # load_state_dict would alias them
            if p.torch_scheduler is not None and s["scheduler"] is not None:
                p.torch_scheduler.load_state_dict(copy.deepcopy(s["scheduler"]))
        for m, saved in zip(graph.modules(), state["buffers"]):
            for k, b in m.named_buffers():
                if k in saved:
                    b.copy_(saved[k])
    if data:
        with rng.preserved():    # replaying a loader's position draws from the global generator
            for name, p in graph.problems.items():
                p.stream.load_state_dict(state["problems"][name]["data"])
    if rng_state:
        rng.restore_all(state["rng"])


@contextlib.contextmanager
def preserve_buffers(modules):
    """Restore every buffer (BatchNorm statistics, ...) of ``modules`` on exit."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy_ in saved:
                b.copy_(copy_)
