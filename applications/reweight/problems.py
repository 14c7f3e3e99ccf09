"""Meta-Weight-Net data reweighting on a long-tailed, label-noised digits split: the declarations.

Two levels (Shu et al., 2019, "Meta-Weight-Net")::

    φ* = argmin_φ  L_val(w*(φ))                                            (weights, upper)
    w*(φ) = argmin_w  Σ_i V(ℓ_i(w); φ) ℓ_i(w) / Σ_i V(ℓ_i(w); φ)          (classifier, lower)

``ℓ_i`` is example i's cross-entropy, ``V`` a small network (loss -> weight in
(0, 1)) whose input is the loss *value* (detached, as in the paper), and the
validation set is small, clean and class-balanced. The hypergradient is the
paper's one-step look-ahead: ``Unrolled(steps=1)`` on the classifier.

The ``weight_table`` method replaces ``V`` by one learned logit ``θ_i`` per
training example (learning to reweight with a persistent table): the weight of
example i in a batch B is ``σ(θ_i) / Σ_{j∈B} σ(θ_j)``. The table is declared
row-sparse (``mlo.Problem(rows=...)``): each step gathers, differentiates and
updates only the batch's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo
from applications import digits

METHODS = ("uniform", "class_balanced", "meta_weight_net", "weight_table")


@dataclass
class Data:
    train: tuple[torch.Tensor, torch.Tensor]     # long-tailed, labels partly flipped
    val: tuple[torch.Tensor, torch.Tensor]       # clean, balanced, small
    test: tuple[torch.Tensor, torch.Tensor]      # clean, balanced
    noisy: torch.Tensor                          # bool per training example: label was flipped
    class_counts: list[int]                      # training examples per class, before the flips


def load_data(seed: int, imbalance: float, noise: float, val_per_class: int, test_fraction: float,
              device: torch.device | str = "cpu") -> Data:
    """Split digits by ``seed``; make the training part long-tailed and flip ``noise`` of its labels.

    Class ``order[r]`` keeps ``n_max · imbalance^(−r/9)`` examples, with a random class
    order per seed, so the largest class has ``imbalance`` times more than the smallest.
    Flipped labels go to a uniformly drawn *other* class.
    """
    x, y = digits.load()
    parts = digits.stratified_split(y, {"test": test_fraction, "val": val_per_class, "rest": 0}, seed)
    rng = np.random.RandomState(seed)
    order = rng.permutation(digits.NUM_CLASSES)
    pool = parts["rest"]
    n_max = min(int((y[pool] == c).sum()) for c in range(digits.NUM_CLASSES))
    keep, counts = [], [0] * digits.NUM_CLASSES
    for rank, c in enumerate(order):
        n = max(1, int(round(n_max * imbalance ** (-rank / (digits.NUM_CLASSES - 1)))))
        keep.append(pool[y[pool] == c][:n])
        counts[c] = n
    train = np.sort(np.concatenate(keep))
    labels = y[train].copy()
    flip = rng.rand(len(train)) < noise
    labels[flip] = (labels[flip] + rng.randint(1, digits.NUM_CLASSES, int(flip.sum()))) % digits.NUM_CLASSES
    tr, va, te = digits.standardize(x[train], x[parts["val"]], x[parts["test"]])
    return Data(digits.to_tensors(tr, labels, device), digits.to_tensors(va, y[parts["val"]], device),
                digits.to_tensors(te, y[parts["test"]], device), torch.as_tensor(flip, device=device), counts)


def make_classifier(hidden: int, device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Logistic regression (``hidden=0``) or a one-hidden-layer MLP."""
    if hidden:
        net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, digits.NUM_CLASSES))
    else:
        net = nn.Linear(64, digits.NUM_CLASSES)
    return net.to(device, dtype)


def make_weight_net(hidden: int, device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """V(ℓ; φ): one loss value in, one weight in (0, 1) out (MLP with one hidden layer)."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()).to(device, dtype)


def train_loader(data: Data, batch_size: int, seed: int) -> DataLoader:
    """Shuffled ``(x, y, index)`` minibatches; the seeded generator makes the order (and a resume)
    reproducible. ``index`` (the examples' rows in ``data.train``) is what the weight table reads."""
    x, y = data.train
    index = torch.arange(len(y), device=y.device)
    return DataLoader(TensorDataset(x, y, index), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def example_rows(batch) -> torch.Tensor:
    """The weight-table rows an ``(x, y, index)`` batch reads: its examples' indices."""
    return batch[2]


# ----------------------------------------------------------------- the declarations
def build_graph(data: Data, method: str, *, seed: int, hidden: int, lr: float, momentum: float,
                batch_size: int, weight_net_hidden: int = 32, weight_net_lr: float = 1e-2,
                weight_net_decay: float = 1e-4, normalize: bool = True,
                table_lr: float = 3000.0, table_init: float = 0.0, sparse_table: bool = True,
                engine: mlo.Engine | None = None) -> tuple[mlo.Graph, nn.Module, nn.Module | torch.Tensor | None]:
    """One arm: the classifier's problem, plus the weighting net's problem for Meta-Weight-Net
    or the weight table's problem (``sparse_table=False``: the same table declared dense).
    Returns the graph, the classifier and the weighting net or table (None for the baselines)."""
    device, dtype = data.train[0].device, data.train[0].dtype
    torch.manual_seed(seed)
    classifier = make_classifier(hidden, device, dtype)
    weight_net = make_weight_net(weight_net_hidden, device, dtype) if method == "meta_weight_net" else None
    table = (torch.full((len(data.train[1]),), float(table_init), device=device, dtype=dtype).requires_grad_()
             if method == "weight_table" else None)
    counts = torch.bincount(data.train[1], minlength=digits.NUM_CLASSES).float()
    class_weight = len(data.train[1]) / (digits.NUM_CLASSES * counts.clamp(min=1))   # mean weight 1

    def classifier_objective(ctx, batch):
        x, y, idx = batch
        losses = F.cross_entropy(ctx.forward(classifier, x), y, reduction="none")
        if method == "uniform":
            return losses.mean()
        if method == "class_balanced":
            return (class_weight[y] * losses).mean()
        if method == "weight_table":
            weights = torch.sigmoid(ctx["weights"][idx])                         # σ(θ_i), the batch's rows
            ctx.log("mean_weight", weights.mean())
            return (weights * losses).sum() / weights.sum()
        weights = ctx.forward(weight_net, losses.detach().unsqueeze(1)).squeeze(1)   # V(ℓ_i; φ)
        ctx.log("mean_weight", weights.mean())
        if normalize:
            return (weights * losses).sum() / weights.sum()
        return (weights * losses).mean()

    def weight_net_objective(ctx, batch):
        x, y = batch
        return F.cross_entropy(ctx.forward(classifier, x), y)   # at the classifier's look-ahead step

    def table_objective(ctx, batch):   # batch: the classifier's, which names the rows to update
        return F.cross_entropy(ctx.forward(classifier, data.val[0]), data.val[1])

    problems = [mlo.Problem(
        "classifier", classifier, classifier_objective,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
        data=train_loader(data, batch_size, seed),
        reads=["weights"] if method in ("meta_weight_net", "weight_table") else [],
        engine=engine or mlo.Unrolled(steps=1),   # d(classifier after its step)/dφ, exactly
    )]
    if weight_net is not None:
        problems.append(mlo.Problem(
            "weights", weight_net, weight_net_objective,
            optimizer=lambda p: torch.optim.Adam(p, lr=weight_net_lr, weight_decay=weight_net_decay),
            data=[data.val],
            reads=["classifier"],
        ))
    if table is not None:
        problems.append(mlo.Problem(
            "weights", table, table_objective,
            optimizer=lambda p: torch.optim.SGD(p, lr=table_lr),
            data=mlo.SameBatch("classifier"),   # the rows the classifier's step weighted
            reads=["classifier"],
            rows=example_rows if sparse_table else None,
        ))
    return mlo.Graph(problems), classifier, weight_net if table is None else table


@torch.no_grad()
def evaluate(classifier: nn.Module, data: Data) -> dict[str, float]:
    """Validation loss and balanced test accuracy (mean per-class recall)."""
    xv, yv = data.val
    xt, yt = data.test
    return {"val_loss": float(F.cross_entropy(classifier(xv), yv)),
            "balanced_test_acc": digits.balanced_accuracy(classifier(xt).argmax(1), yt)}


@torch.no_grad()
def table_profile(table: torch.Tensor, data: Data) -> dict[str, float | list[float]]:
    """The table's logits and the mean weight σ(θ_i) of clean vs flipped training examples."""
    w = torch.sigmoid(table)
    out: dict[str, float | list[float]] = {"logits": table.tolist(),
                                            "mean_weight_clean": float(w[~data.noisy].mean())}
    if bool(data.noisy.any()):
        out["mean_weight_noisy"] = float(w[data.noisy].mean())
    return out


@torch.no_grad()
def weight_profile(classifier: nn.Module, weight_net: nn.Module, data: Data,
                   grid: torch.Tensor) -> dict[str, float | list[float]]:
    """The learned loss -> weight curve on ``grid`` and the mean weight of clean vs flipped examples."""
    x, y = data.train
    w = weight_net(F.cross_entropy(classifier(x), y, reduction="none").unsqueeze(1)).squeeze(1)
    out: dict[str, float | list[float]] = {"curve": weight_net(grid.unsqueeze(1)).squeeze(1).tolist()}
    out["mean_weight_clean"] = float(w[~data.noisy].mean())
    if bool(data.noisy.any()):
        out["mean_weight_noisy"] = float(w[data.noisy].mean())
    return out
