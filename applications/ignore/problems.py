"""Learning by ignoring (Zhao & Xie, 2021): a three-level program, and its two-level ablation.

A source dataset (plain digits, many labels corrupted) helps a target task
(digits seen by a different "scanner": shifted one pixel to the right) that has
few labels. Every source example i gets an ignoring weight a_i = sigmoid(α_i)::

    α*  = argmin_α  L_val^t(W*(V*(α)))                                     (ignore,   level 3)
    W*(V) = argmin_W  L_train^t(W) + (γ/2)‖W − V‖²                         (finetune, level 2)
    V*(α) = argmin_V  Σ_i a_i ℓ(V; s_i) / Σ_i a_i + (λ/2)‖V‖²              (pretrain, level 1)

Execution order is pretrain → finetune → ignore. ``pretrain`` reads ``ignore``
(later: the current α, a constant); ``finetune`` reads ``pretrain`` and
``ignore`` reads ``finetune`` (earlier: the updated V and W). Each problem's
engine differentiates its own solution with respect to what it reads
(pretrain's: ∂V'/∂α, finetune's: ∂W'/∂V); mlo chains them in one reverse
sweep:  g_α = (∂V'/∂α)ᵀ (∂W'/∂V)ᵀ ∇_W L_val^t.

The two-level ablation drops the finetuning level from the hypergradient:
``ignore`` reads ``pretrain`` directly, min_α L_val^t(V*(α)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mlo
from applications import digits

METHODS = ("no_ignore", "two_level", "three_level")


@dataclass
class Data:
    source: tuple[torch.Tensor, torch.Tensor]        # plain digits, labels partly corrupted
    target_train: tuple[torch.Tensor, torch.Tensor]  # shifted digits, few, clean
    target_val: tuple[torch.Tensor, torch.Tensor]
    target_test: tuple[torch.Tensor, torch.Tensor]
    corrupted: torch.Tensor                          # bool per source example


def shift_right(x: np.ndarray, pixels: int = 1) -> np.ndarray:
    """The target domain: every 8x8 image moved ``pixels`` to the right (blank columns enter on the left)."""
    img = x.reshape(-1, 8, 8)
    out = np.zeros_like(img)
    out[:, :, pixels:] = img[:, :, :8 - pixels]
    return out.reshape(-1, 64)


def load_data(seed: int, source_per_class: int, corrupt: float, target_train_per_class: int,
              target_val_per_class: int, shift: int, device: torch.device | str = "cpu") -> Data:
    """Disjoint stratified parts of digits; pixel values stay in [0, 1] (no per-pixel scaling,
    which would blow up pixels that are blank in the source but not in the shifted target)."""
    x, y = digits.load()
    parts = digits.stratified_split(y, {"source": source_per_class, "train": target_train_per_class,
                                        "val": target_val_per_class, "rest": 0}, seed)
    rng = np.random.RandomState(seed)
    ys = y[parts["source"]].copy()
    bad = rng.rand(len(ys)) < corrupt
    ys[bad] = (ys[bad] + rng.randint(1, digits.NUM_CLASSES, int(bad.sum()))) % digits.NUM_CLASSES

    def target(name):
        return digits.to_tensors(shift_right(x[parts[name]], shift), y[parts[name]], device)

    return Data(digits.to_tensors(x[parts["source"]], ys, device), target("train"), target("val"), target("rest"),
                torch.as_tensor(bad, device=device))


def make_model(device, dtype=torch.float32) -> nn.Linear:
    model = nn.Linear(64, digits.NUM_CLASSES).to(device, dtype)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def proximity(w: dict, v: dict) -> torch.Tensor:
    return sum((w[k] - v[k]).pow(2).sum() for k in w)


# ----------------------------------------------------------------- the declarations
def build_graph(data: Data, method: str, *, pretrain_engine: mlo.Engine, finetune_engine: mlo.Engine,
                pretrain_steps: int, finetune_steps: int, lr: float, momentum: float, ignore_lr: float,
                gamma: float, source_decay: float) -> tuple[mlo.Graph, nn.Linear, nn.Linear, torch.Tensor]:
    """One arm. Returns the graph, V (pretrained), W (finetuned; unused by the ablations) and α."""
    device, dtype = data.source[0].device, data.source[0].dtype
    V, W = make_model(device, dtype), make_model(device, dtype)
    alpha = torch.zeros(len(data.source[1]), device=device, dtype=dtype, requires_grad=True)

    def pretrain_objective(ctx, batch):
        x, y = batch
        losses = F.cross_entropy(ctx.forward(V, x), y, reduction="none")
        a = torch.sigmoid(ctx["ignore"]) if method != "no_ignore" else torch.ones_like(losses)
        return (a * losses).sum() / a.sum() + 0.5 * source_decay * ctx["pretrain"]["weight"].pow(2).sum()

    def finetune_objective(ctx, batch):
        x, y = batch
        return F.cross_entropy(ctx.forward(W, x), y) + 0.5 * gamma * proximity(ctx["finetune"], ctx["pretrain"])

    def ignore_objective(ctx, batch):
        x, y = batch
        model = W if method == "three_level" else V        # the ablation scores V itself
        return F.cross_entropy(ctx.forward(model, x), y)

    def sgd(params):
        return torch.optim.SGD(params, lr=lr, momentum=momentum)

    pretrain = mlo.Problem("pretrain", V, pretrain_objective, sgd, data=[data.source],
                           reads=["ignore"] if method != "no_ignore" else [],
                           steps=pretrain_steps, engine=pretrain_engine)      # dV/dα
    finetune = mlo.Problem("finetune", W, finetune_objective, sgd, data=[data.target_train],
                           reads=["pretrain"], steps=finetune_steps, engine=finetune_engine)  # dW/dV
    ignore = mlo.Problem("ignore", alpha, ignore_objective, lambda p: torch.optim.Adam(p, lr=ignore_lr),
                         data=[data.target_val],
                         reads=["finetune"] if method == "three_level" else ["pretrain"])
    if method == "three_level":
        problems = [pretrain, finetune, ignore]
    elif method == "two_level":
        problems = [pretrain, ignore]       # a problem nobody reads may not join a graph: W is left out
    else:
        problems = [pretrain]
    return mlo.Graph(problems), V, W, alpha


def finetune_from(V: nn.Module | None, data: Data, *, steps: int, lr: float, momentum: float,
                  gamma: float) -> nn.Linear:
    """The evaluation protocol shared by every arm: fine-tune a fresh W from V (or from 0)."""
    W = make_model(data.target_train[0].device, data.target_train[0].dtype)
    anchor = {k: torch.zeros_like(p) for k, p in W.named_parameters()}
    if V is not None:
        with torch.no_grad():
            for k, p in W.named_parameters():
                anchor[k] = dict(V.named_parameters())[k].detach().clone()
                p.copy_(anchor[k])
    opt = torch.optim.SGD(W.parameters(), lr=lr, momentum=momentum)
    x, y = data.target_train
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(W(x), y) + 0.5 * gamma * proximity(dict(W.named_parameters()), anchor)
        loss.backward()
        opt.step()
    return W


@torch.no_grad()
def accuracy(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = split
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def evaluate(V: nn.Module, data: Data, W: nn.Module | None = None) -> dict[str, float]:
    """Logged during the search: target validation loss and target test accuracy of V (and W)."""
    xv, yv = data.target_val
    out = {"pretrain_val_loss": float(F.cross_entropy(V(xv), yv)), "pretrain_test_acc": accuracy(V, data.target_test)}
    if W is not None:
        out.update(finetune_val_loss=float(F.cross_entropy(W(xv), yv)), finetune_test_acc=accuracy(W, data.target_test))
    return out
