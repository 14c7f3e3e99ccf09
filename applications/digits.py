"""scikit-learn's bundled 8x8 digits, split deterministically for the small applications.

Everything here is plain NumPy/PyTorch and needs no network: ``load_digits``
ships with scikit-learn. Splits are stratified (every class is cut in the same
proportions) and depend only on the seed, so a run is reproducible from its
config alone.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["NUM_CLASSES", "arrays", "load", "stratified_split", "standardize", "to_tensors", "balanced_accuracy"]

NUM_CLASSES = 10


def arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``(pixels (1797, 64) in 0..16, labels (1797,))``.

    Reads the CSV that scikit-learn ships (what ``load_digits`` reads) without
    importing scikit-learn, which saves seconds of start-up; falls back to
    ``sklearn.datasets.load_digits`` if the file is not where expected.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = np.loadtxt(path, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.data), np.asarray(bunch.target, dtype=np.int64)


def load() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: features in [0, 1] (float32, 64 pixels) and labels (int64)."""
    pixels, labels = arrays()
    return (pixels / 16.0).astype(np.float32), labels


def stratified_split(labels: Sequence[int], parts: Mapping[str, float | int] | Sequence[float],
                     seed: int) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Cut the indices of ``labels`` into parts, class by class (every class in the same proportions).

    ``parts`` maps a name to a fraction of each class (a float in (0, 1]) or a count
    per class (an int); a plain list of fractions gives a list of parts instead of a
    dict. Parts are filled in order and may leave examples unused; a part named
    ``"rest"`` takes whatever is left. A fraction part gets at least one example of
    each class that has one left; a count part that does not fit is an error.
    Within a class the order is a permutation drawn from ``seed``, so the same seed
    always gives the same split. Indices come back sorted.
    """
    named = isinstance(parts, Mapping)
    sizes = dict(parts) if named else {k: float(f) for k, f in enumerate(parts)}
    fractions = [v for k, v in sizes.items() if k != "rest" and not isinstance(v, int)]
    if sum(fractions) > 1.0 + 1e-9:
        raise ValueError(f"fractions sum to more than 1: {fractions}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out: dict = {name: [] for name in sizes}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n, frac, count, lo = len(idx), 0.0, 0, 0
        for name, size in sizes.items():
            if name == "rest":
                continue
            if isinstance(size, int):
                count += size
            else:
                frac += size
            hi = int(round(frac * n)) + count       # cumulative cut points: rounding errors do not add up
            if isinstance(size, int) and hi > n:
                raise ValueError(f"split part {name!r}: class {c} has only {n - lo} examples left, asked for {size}")
            if hi <= lo and not isinstance(size, int) and size > 0 and lo < n:
                hi = lo + 1                          # at least one per fraction part when possible
            out[name].append(idx[lo:hi])
            lo = max(lo, hi)
        if "rest" in out:
            out["rest"].append(idx[lo:])
    split = {name: np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)
             for name, chunks in out.items()}
    return split if named else list(split.values())


def standardize(reference: np.ndarray, *arrays: np.ndarray, dtype=np.float32) -> list[np.ndarray]:
    """Scale every array with the mean and standard deviation of ``reference``'s columns.

    Constant columns (several digit pixels are always blank) keep a scale of 1.
    """
    mean = reference.mean(axis=0, keepdims=True)
    std = reference.std(axis=0, keepdims=True)
    std = np.where(std > 1e-6, std, 1.0)
    return [((a - mean) / std).astype(dtype) for a in (reference, *arrays)]


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
