"""scikit-learn's bundled 8x8 digits, split deterministically for the small applications.

Everything here is plain NumPy/PyTorch and needs no network: ``load_digits``
ships with scikit-learn. Splits are stratified (every class is cut in the same
proportions) and depend only on the seed, so a run is reproducible from its
config alone.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

__all__ = ["NUM_CLASSES", "load", "stratified_split", "standardize", "to_tensors", "balanced_accuracy"]

NUM_CLASSES = 10


def load() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: features in [0, 1] (float32, 64 pixels) and labels (int64)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def stratified_split(y: np.ndarray, parts: Mapping[str, float | int], seed: int) -> dict[str, np.ndarray]:
    """Cut the indices of ``y`` into named parts, class by class.

    ``parts`` maps a name to a fraction of each class (a float in (0, 1]) or a
    count per class (an int). Parts are filled in the order given; a part named
    ``"rest"`` (if present) takes whatever is left. Within a class the order is a
    permutation drawn from ``seed``, so the same seed always gives the same split.
    """
    rng = np.random.RandomState(seed)
    out: dict[str, list[np.ndarray]] = {name: [] for name in parts}
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for name, size in parts.items():
            if name == "rest":
                continue
            n = size if isinstance(size, int) else int(round(float(size) * len(idx)))
            if start + n > len(idx):
                raise ValueError(f"split part {name!r}: class {c} has only {len(idx) - start} examples left, "
                                 f"asked for {n}")
            out[name].append(idx[start:start + n])
            start += n
        if "rest" in out:
            out["rest"].append(idx[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in out.items()}


def standardize(reference: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Scale every array with the mean and standard deviation of ``reference``'s columns.

    Constant columns (several digit pixels are always blank) keep a scale of 1.
    """
    mean = reference.mean(axis=0, keepdims=True)
    std = reference.std(axis=0, keepdims=True)
    std = np.where(std > 1e-6, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (reference, *arrays)]


def to_tensors(x: np.ndarray, y: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(x, dtype=torch.float32, device=device), torch.as_tensor(y, dtype=torch.int64, device=device)


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int = NUM_CLASSES) -> float:
    """Mean over classes of the per-class recall (plain accuracy on a balanced set)."""
    recalls = []
    for c in range(num_classes):
        mask = y == c
        if bool(mask.any()):
            recalls.append(float((pred[mask] == c).float().mean()))
    return float(np.mean(recalls))
