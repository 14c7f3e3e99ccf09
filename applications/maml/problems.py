"""Few-shot digits: episodes, the meta-learning graphs (MAML, iMAML, FOMAML), the baseline, meta-test.

The ten digit classes are split: meta-training draws N-way K-shot episodes from
the meta-train classes only, meta-testing from ``test_classes`` only (never seen
in training). Meta-validation, used only to choose settings, draws either from
its own ``val_classes`` or, when none are given, from a held-out part of each
meta-train class's examples that meta-training and the baseline never see. An
episode relabels its N classes 0..N-1 in a random order and holds K support and
Q query examples per class.

A meta-learner is the graph::

    task0 .. task{B-1}   restart from meta (init_from), ``inner_steps`` SGD steps on their
                         episode's support loss (+ λ/2‖φ − θ‖² for iMAML)
    meta                 mean query loss of the adapted task models; reads every task

with the engine on each task→meta edge deciding the algorithm: ``Unrolled``
(MAML), ``CG`` (iMAML), ``FOMAML``. The first task draws the meta-batch (B
episodes) and the others share it (``SameBatch``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import mlo
from applications import digits

Episode = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]   # support x, y, query x, y


@dataclass
class Data:
    """Standardized digits grouped by class: the meta-train, meta-validation and meta-test pools."""

    train: dict[int, torch.Tensor]
    val: dict[int, torch.Tensor]
    test: dict[int, torch.Tensor]

    @property
    def features(self) -> int:
        return next(iter(self.train.values())).shape[1]


SPLIT_SEED = 0          # the fixed permutation that holds out meta-validation examples


def split_indices(labels, test_classes: list[int], val_classes: list[int] = (),
                  val_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """Indices of the examples in each pool, ``{"train", "val", "test"}``, pairwise disjoint.

    ``test``: every example of ``test_classes``. ``val``: every example of
    ``val_classes`` when given, otherwise ``val_fraction`` of each remaining class's
    examples (a fixed per-class permutation). ``train``: the rest.
    """
    labels = np.asarray(labels)
    test_mask = np.isin(labels, list(test_classes))
    if set(val_classes) & set(test_classes):
        raise ValueError(f"val_classes {sorted(val_classes)} overlap test_classes {sorted(test_classes)}")
    if val_classes:
        val_mask = np.isin(labels, list(val_classes))
        rest = np.flatnonzero(~test_mask & ~val_mask)
        return {"train": rest, "val": np.flatnonzero(val_mask), "test": np.flatnonzero(test_mask)}
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    seen = np.flatnonzero(~test_mask)
    parts = digits.stratified_split(labels[seen], {"val": float(val_fraction), "rest": 0.0}, seed=SPLIT_SEED)
    return {"train": seen[parts["rest"]], "val": seen[parts["val"]], "test": np.flatnonzero(test_mask)}


def load_data(test_classes: list[int], device: torch.device | str = "cpu", val_classes: list[int] = (),
              val_fraction: float = 0.3) -> Data:
    """Every digit, standardized with the meta-train pool's statistics, split into the three pools
    of ``split_indices``."""
    x, y = digits.load()
    idx = split_indices(y, test_classes, val_classes, val_fraction)
    _, xall = digits.standardize(x[idx["train"]], x)
    xall = torch.as_tensor(xall, device=device)

    def pool(part: str) -> dict[int, torch.Tensor]:
        ids = idx[part]
        return {int(c): xall[torch.as_tensor(ids[y[ids] == c])] for c in sorted(set(y[ids].tolist()))}

    return Data(pool("train"), pool("val"), pool("test"))


def sample_episode(pool: dict[int, torch.Tensor], n_way: int, k_shot: int, n_query: int,
                   gen: torch.Generator) -> Episode:
    classes = sorted(pool)
    chosen = [classes[i] for i in torch.randperm(len(classes), generator=gen)[:n_way].tolist()]
    xs, ys, xq, yq = [], [], [], []
    for label, c in enumerate(chosen):
        ex = pool[c]
        idx = torch.randperm(len(ex), generator=gen)[:k_shot + n_query].to(ex.device)
        xs.append(ex[idx[:k_shot]])
        xq.append(ex[idx[k_shot:]])
        ys += [label] * k_shot
        yq += [label] * n_query
    dev = xs[0].device
    return (torch.cat(xs), torch.tensor(ys, device=dev), torch.cat(xq), torch.tensor(yq, device=dev))


def episodes(pool: dict[int, torch.Tensor], count: int, n_way: int, k_shot: int, n_query: int,
             seed: int) -> list[Episode]:
    gen = torch.Generator().manual_seed(seed)
    return [sample_episode(pool, n_way, k_shot, n_query, gen) for _ in range(count)]


def make_net(features: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def _prox(phi: dict, theta: dict) -> torch.Tensor:
    return sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)


def build_meta_graph(engine: mlo.Engine, meta_batches: list[list[Episode]], features: int, hidden: int,
                     n_way: int, inner_lr: float, inner_steps: int, meta_lr: float, lam: float = 0.0):
    """The meta-learning graph (module docstring); returns ``(graph, meta_net)``."""
    meta_net = make_net(features, hidden, n_way)
    size = len(meta_batches[0])
    task_nets = [copy.deepcopy(meta_net) for _ in range(size)]

    def task_objective(t: int):
        def objective(ctx, batch):
            xs, ys, _, _ = batch[t]
            loss = F.cross_entropy(ctx.forward(task_nets[t], xs), ys)
            return loss + 0.5 * lam * _prox(ctx[f"task{t}"], ctx["meta"]) if lam else loss
        return objective

    def meta_objective(ctx, batch):
        losses = [F.cross_entropy(ctx.forward(task_nets[t], batch[t][2]), batch[t][3]) for t in range(size)]
        return sum(losses) / size

    tasks = [mlo.Problem(f"task{t}", task_nets[t], task_objective(t),
                         lambda p: torch.optim.SGD(p, lr=inner_lr),
                         data=meta_batches if t == 0 else mlo.SameBatch("task0"), steps=inner_steps,
                         init_from="meta", engine=engine)
             for t in range(size)]
    meta = mlo.Problem("meta", meta_net, meta_objective, lambda p: torch.optim.Adam(p, lr=meta_lr),
                       data=mlo.SameBatch("task0"), reads=[f"task{t}" for t in range(size)])
    return mlo.Graph(tasks + [meta]), meta_net


def build_batched_meta_graph(engine: mlo.Engine, meta_batches: list[list[Episode]], features: int, hidden: int,
                             n_way: int, inner_lr: float, inner_steps: int, meta_lr: float, lam: float = 0.0):
    """``build_meta_graph`` with the B tasks as one task-batched problem (``Problem(tasks=B)``, vmapped)."""
    meta_net = make_net(features, hidden, n_way)
    size = len(meta_batches[0])
    stacked_batches = [tuple(torch.stack(part) for part in zip(*mb)) for mb in meta_batches]
    stacked = {k: torch.zeros(size, *v.shape, device=v.device, requires_grad=True)
               for k, v in meta_net.named_parameters()}

    def task_objective(ctx, batch):             # one task: ctx["tasks"] is its slice
        xs, ys, _, _ = batch
        loss = F.cross_entropy(functional_call(meta_net, ctx["tasks"], (xs,)), ys)
        return loss + 0.5 * lam * _prox(ctx["tasks"], ctx["meta"]) if lam else loss

    def meta_objective(ctx, batch):
        _, _, xq, yq = batch
        losses = vmap(lambda p, x, y: F.cross_entropy(functional_call(meta_net, p, (x,)), y))(ctx["tasks"], xq, yq)
        return losses.mean()

    tasks = mlo.Problem("tasks", stacked, task_objective, lambda p: torch.optim.SGD(p, lr=inner_lr),
                        data=stacked_batches, steps=inner_steps, init_from="meta", engine=engine, tasks=size)
    meta = mlo.Problem("meta", meta_net, meta_objective, lambda p: torch.optim.Adam(p, lr=meta_lr),
                       data=mlo.SameBatch("tasks"), reads=["tasks"])
    return mlo.Graph([tasks, meta]), meta_net


def build_pretrain_graph(data: Data, features: int, hidden: int, lr: float, batch_size: int, steps: int,
                         seed: int):
    """The no-meta-learning baseline: one classifier over every meta-train class; ``(graph, net)``."""
    classes = sorted(data.train)
    x = torch.cat([data.train[c] for c in classes])
    y = torch.cat([torch.full((len(data.train[c]),), i, dtype=torch.int64, device=x.device)
                   for i, c in enumerate(classes)])
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(x), generator=gen) for _ in range(steps * batch_size // len(x) + 1)])
    batches = [(x[order[i * batch_size:(i + 1) * batch_size]], y[order[i * batch_size:(i + 1) * batch_size]])
               for i in range(max(steps, 1))]
    net = make_net(features, hidden, len(classes))
    problem = mlo.Problem("net", net, lambda ctx, b: F.cross_entropy(ctx.forward(net, b[0]), b[1]),
                          lambda p: torch.optim.Adam(p, lr=lr), data=batches)
    return mlo.Graph([problem]), net


def start_params(net: nn.Module, n_way: int, fresh_head: bool) -> dict[str, torch.Tensor]:
    """The point test-time adaptation starts from; ``fresh_head``: the last layer replaced by zeros
    with ``n_way`` outputs (the pre-trained baseline's body with a new head)."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    if fresh_head:
        last = [k for k in params if k.endswith("weight")][-1].rsplit(".", 1)[0]
        params[f"{last}.weight"] = params[f"{last}.weight"].new_zeros(n_way, params[f"{last}.weight"].shape[1])
        params[f"{last}.bias"] = params[f"{last}.bias"].new_zeros(n_way)
    return params


def meta_test(template: nn.Module, start: dict[str, torch.Tensor], tasks: list[Episode], lr: float, steps: int,
              lam: float = 0.0) -> float:
    """Mean query accuracy after ``steps`` SGD steps from ``start`` on each task's support set
    (with the proximal term λ/2‖φ − start‖² when ``lam`` > 0, as iMAML adapts)."""
    correct = total = 0
    for xs, ys, xq, yq in tasks:
        phi = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(template, phi, (xs,)), ys)
            if lam:
                loss = loss + 0.5 * lam * _prox(phi, start)
            grads = torch.autograd.grad(loss, list(phi.values()))
            phi = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(phi.items(), grads)}
        with torch.no_grad():
            correct += int((functional_call(template, phi, (xq,)).argmax(1) == yq).sum())
            total += len(yq)
    return correct / total
