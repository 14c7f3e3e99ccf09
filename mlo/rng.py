"""Capture and replay random-number state (CPU and CUDA, torch/numpy/random); the one place
where mlo reads or writes a global generator.

* ``capture_torch`` / ``restore_torch`` / ``replay``: torch's generators (an engine replays
  the RNG state a step ran with, so dropout masks match);
* ``capture_all`` / ``restore_all`` / ``preserved``: torch, numpy and Python ``random``
  (checkpoints; calls that must leave the caller's random streams untouched);
* ``capture_loader`` / ``restore_loader``: what decides a data loader's shuffle (torch's
  global generator and the loader's own ``generator``), for exact data resume.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def capture_torch() -> dict:
    """Torch generator states (cheap; no device synchronisation)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():     # (initialised implies available; is_available() costs more)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_torch(state: dict) -> None:
    """Inverse of ``capture_torch``."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def same_torch_state(a: dict, b: dict) -> bool:
    """Whether two ``capture_torch`` results are the same state."""
    if a.keys() != b.keys() or not torch.equal(a["cpu"], b["cpu"]):
        return False
    return all(torch.equal(x, y) for x, y in zip(a.get("cuda", []), b.get("cuda", [])))


@contextlib.contextmanager
def replay(state: dict | None):
    """Run the block with ``state`` as the torch RNG state, then restore the current one.

    What ``torch.random.fork_rng`` does for these generators, at a fraction of its per-call cost
    (an engine replays once per evaluation, and on small models a step is a few milliseconds)."""
    if state is None:
        yield
        return
    current = {"cpu": torch.get_rng_state()}
    if "cuda" in state:
        current["cuda"] = torch.cuda.get_rng_state_all()
    restore_torch(state)
    try:
        yield
    finally:
        restore_torch(current)


def capture_all() -> dict:
    """Everything a resumed run needs: torch (CPU, CUDA), numpy and Python ``random``."""
    state = capture_torch()
    state["numpy"] = _np_state_to_tensors(np.random.get_state())
    state["python"] = _py_state_to_list(random.getstate())
    return state


@contextlib.contextmanager
def preserved():
    """Run the block, then put torch, numpy and Python ``random`` back as they were."""
    state = capture_all()
    try:
        yield
    finally:
        restore_all(state)


def capture_loader(data) -> dict:
    """What decides the order ``iter(data)`` draws: torch's global state and ``data.generator``."""
    state = {"torch": torch.get_rng_state()}
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator):
        state["generator"] = gen.get_state()
    return state


def restore_loader(data, state: dict) -> None:
    """Inverse of ``capture_loader``."""
    torch.set_rng_state(state["torch"])
    gen = getattr(data, "generator", None)
    if isinstance(gen, torch.Generator) and "generator" in state:
        gen.set_state(state["generator"])


def restore_all(state: dict) -> None:
    """Inverse of ``capture_all``."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        np.random.set_state(_np_state_from_tensors(state["numpy"]))
    if "python" in state:
        random.setstate(_py_state_from_list(state["python"]))


# numpy/random states are converted to tensors and lists so checkpoints load with
# torch.load(weights_only=True).
def _np_state_to_tensors(st):
    return {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
            "has_gauss": int(st[3]), "gauss": float(st[4])}


def _np_state_from_tensors(d):
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def _py_state_to_list(st):
    return [st[0], list(st[1]), st[2]]


def _py_state_from_list(lst):
    return (lst[0], tuple(lst[1]), lst[2])
