"""Per-feature weight decay learned on validation loss: the problem declarations.

Two levels on a logistic-regression classifier of the 8x8 digits::

    θ* = argmin_θ  L_val(w*(θ))                                     (hyper, upper)
    w*(θ) = argmin_w  L_train(w) + ½ Σ_j exp(θ_j) ‖w_j‖²            (train, lower)

``w_j`` is the row of class weights attached to input feature ``j``, so every
feature (pixel, or appended noise column) gets its own decay ``exp(θ_j)``.
The engine on ``train`` says how ``dw*/dθ`` is computed; swapping it is the only
difference between the compared arms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mlo
from applications import digits


@dataclass
class Data:
    """Standardized features; the last ``noise`` columns are pure noise."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    noise: int

    @property
    def features(self) -> int:
        return self.train[0].shape[1]


def load_data(seed: int, train_per_class: int, val_per_class: int, noise_features: int,
              device: torch.device | str = "cpu") -> Data:
    """Stratified split of digits (the rest is the test set), plus uniform-noise columns."""
    x, y = digits.load()
    if noise_features:
        noise = np.random.RandomState(seed + 1000).rand(len(x), noise_features).astype(np.float32)
        x = np.concatenate([x, noise], axis=1)
    idx = digits.stratified_split(y, {"train": train_per_class, "val": val_per_class, "rest": 0}, seed)
    tr, va, te = digits.standardize(x[idx["train"]], x[idx["val"]], x[idx["rest"]])
    return Data(digits.to_tensors(tr, y[idx["train"]], device), digits.to_tensors(va, y[idx["val"]], device),
                digits.to_tensors(te, y[idx["rest"]], device), noise_features)


def make_classifier(features: int, device: torch.device | str = "cpu") -> nn.Linear:
    """Logistic regression, started at zero so every arm starts from the same point."""
    model = nn.Linear(features, digits.NUM_CLASSES).to(device)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


# ----------------------------------------------------------------- the declarations
def build_graph(data: Data, engine: mlo.Engine, *, inner_lr: float, momentum: float, inner_steps: int,
                hyper_lr: float, init_weight_decay: float) -> tuple[mlo.Graph, nn.Linear, torch.Tensor]:
    """The bilevel program; returns the graph, the classifier and the log-decays θ."""
    device = data.train[0].device
    model = make_classifier(data.features, device)
    log_decay = torch.full((data.features,), math.log(init_weight_decay), device=device, requires_grad=True)

    def train_objective(ctx, batch):
        x, y = batch
        weight = ctx["train"]["weight"]          # (classes, features)
        decay = ctx["hyper"].exp()               # one decay per input feature
        penalty = 0.5 * (decay * weight.pow(2)).sum()
        return F.cross_entropy(ctx.forward(model, x), y) + penalty

    def val_objective(ctx, batch):
        x, y = batch
        return F.cross_entropy(ctx.forward(model, x), y)   # model at the updated w (train ran first)

    train = mlo.Problem(
        "train", model, train_objective,
        optimizer=lambda p: torch.optim.SGD(p, lr=inner_lr, momentum=momentum),
        data=[data.train],                       # full batch, cycled
        reads=["hyper"],                         # later in the order: read as a hyperparameter
        steps=inner_steps,                       # warm-started: w keeps tracking w*(θ)
        engine=engine,                           # how dw*/dθ is computed
    )
    hyper = mlo.Problem(
        "hyper", log_decay, val_objective,
        optimizer=lambda p: torch.optim.Adam(p, lr=hyper_lr),
        data=[data.val],
        reads=["train"],                         # earlier in the order: hypergradient flows through it
    )
    return mlo.Graph([train, hyper]), model, log_decay


def build_fixed(data: Data, weight_decay: float, *, inner_lr: float, momentum: float,
                inner_steps: int) -> tuple[mlo.Graph, nn.Linear]:
    """The baseline: one problem, the same objective with one fixed decay for every feature."""
    device = data.train[0].device
    model = make_classifier(data.features, device)

    def train_objective(ctx, batch):
        x, y = batch
        weight = ctx["train"]["weight"]
        return F.cross_entropy(ctx.forward(model, x), y) + 0.5 * weight_decay * weight.pow(2).sum()

    train = mlo.Problem("train", model, train_objective,
                        optimizer=lambda p: torch.optim.SGD(p, lr=inner_lr, momentum=momentum),
                        data=[data.train], steps=inner_steps)
    return mlo.Graph([train]), model


@torch.no_grad()
def evaluate(model: nn.Module, data: Data) -> dict[str, float]:
    """Validation loss and test accuracy of the classifier as it is now."""
    xv, yv = data.val
    xt, yt = data.test
    return {"val_loss": float(F.cross_entropy(model(xv), yv)),
            "test_acc": float((model(xt).argmax(1) == yt).float().mean())}
