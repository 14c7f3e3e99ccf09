"""Capture and replay random-number state (CPU and CUDA, torch/numpy/random)."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def capture_torch() -> dict:
    """Torch generator states (cheap; no device synchronisation)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextlib.contextmanager
def replay(state: dict | None):
    """Run the block with ``state`` as the torch RNG state, then restore the current one."""
    if state is None:
        yield
        return
    cuda = "cuda" in state
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state["cpu"])
        if cuda:
            torch.cuda.set_rng_state_all(state["cuda"])
        yield


def capture_all() -> dict:
    """Everything a resumed run needs: torch (CPU, CUDA), numpy and Python ``random``."""
    state = capture_torch()
    state["numpy"] = _np_state_to_tensors(np.random.get_state())
    state["python"] = _py_state_to_list(random.getstate())
    return state


def restore_all(state: dict) -> None:
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
