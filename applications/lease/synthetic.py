"""A known-answer task for the architecture search: textures whose class only a wide op sees.

Each 8x8 grey image is Gaussian noise correlated at a distance of exactly
``LAG`` = 4 pixels, either along rows or along columns, with a positive or a
negative sign: four classes. Every pixel has the same variance and every
distance other than 4 is uncorrelated, so nothing a 3x3 window sees tells the
classes apart; a unit must combine two pixels 4 apart. Among the DARTS ops the
ones whose kernel spans 4 pixels are ``sep_conv_5x5`` (offsets -2..2),
``dil_conv_3x3`` (dilation 2: offsets -2, 0, 2) and ``dil_conv_5x5`` (dilation
2: offsets -4..4) — :data:`TARGET_OPS`. Pooling, skip and the 3x3 convolutions
see it only through a stack of ops. A search that learns from the data should
therefore put more weight on :data:`TARGET_OPS` than a random cell does
(3 of the 7 non-``none`` ops: 43 %).

The images are a fixed draw (seed :data:`DATA_SEED`); ``applications.lease.data``
splits them like the digits (``load_dataset("synthetic", ...)``): 50 % train / 25 % val /
25 % test, stratified, the split fixed by ``seed``. This module only makes the arrays (it
imports nothing from the package).
"""
from __future__ import annotations

import numpy as np

LAG = 4
SIZE = 8
PER_CLASS = 450
CORRELATION = 0.45          # of two pixels LAG apart along the class's direction
DATA_SEED = 20240601
TARGET_OPS = ("sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
CLASSES = ("rows +", "rows -", "columns +", "columns -")


def synthetic_arrays(per_class: int = PER_CLASS, seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 1, SIZE, SIZE) float32, labels (N,))``, zero mean and unit variance per pixel.

    ``x[c] = (z[c] + s z[c + LAG]) / sqrt(1 + s^2)`` along the class's direction,
    with ``s`` chosen so that the correlation at distance ``LAG`` is
    ``±CORRELATION`` and every other distance has none.
    """
    rng = np.random.default_rng(seed)
    rho = CORRELATION
    s = (1 - np.sqrt(1 - 4 * rho * rho)) / (2 * rho)        # s / (1 + s^2) = rho, |s| < 1
    images, labels = [], []
    for label in range(len(CLASSES)):
        sign = 1.0 if label % 2 == 0 else -1.0
        z = rng.standard_normal((per_class, SIZE, SIZE + LAG))
        x = (z[:, :, :SIZE] + sign * s * z[:, :, LAG:]) / np.sqrt(1 + s * s)
        if label >= 2:
            x = x.transpose(0, 2, 1)                          # correlated along columns
        images.append(x)
        labels.append(np.full(per_class, label))
    return (np.concatenate(images)[:, None].astype(np.float32), np.concatenate(labels).astype(np.int64))

