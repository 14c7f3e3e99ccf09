"""Whole-graph state (parameters, optimizers, schedulers, data positions, buffers, RNG)
and crash-safe checkpoint files."""
from __future__ import annotations

import copy
import os
import tempfile
import warnings

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


def save_checkpoint(obj, path: str | os.PathLike) -> None:
    """Write atomically: temp file, fsync, rename; the previous file is kept as ``<path>.prev``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, path + ".prev")
        os.replace(tmp, path)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu"):
    """Load with ``weights_only=True``; fall back to ``<path>.prev`` if the file is damaged."""
    path = os.fspath(path)
    errors = []
    for candidate in (path, path + ".prev"):
        if not os.path.exists(candidate):
            errors.append(f"{candidate}: missing")
            continue
        try:
            obj = torch.load(candidate, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated or corrupt file
            errors.append(f"{candidate}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if candidate != path:
            warnings.warn(f"checkpoint {path} could not be read; resumed from the previous one ({candidate})")
        return obj
    raise MLOError("no readable checkpoint: " + "; ".join(errors))
