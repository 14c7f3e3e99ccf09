"""Few-shot digits: episodes, the meta-learning graphs (MAML, iMAML, FOMAML), the baseline, meta-test.

The ten digit classes are split: meta-training draws N-way K-shot episodes from
``train_classes`` only, meta-testing from the other classes only (never seen in
training). An episode relabels its N classes 0..N-1 in a random order and holds
K support and Q query examples per class.

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

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import mlo
from applications import digits

Episode = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]   # support x, y, query x, y


@dataclass
class Data:
    """Standardized digits grouped by class: the meta-train and the meta-test pools."""

    train: dict[int, torch.Tensor]
    test: dict[int, torch.Tensor]

    @property
    def features(self) -> int:
        return next(iter(self.train.values())).shape[1]


def load_data(test_classes: list[int], device: torch.device | str = "cpu") -> Data:
    """Every digit, standardized with the meta-train classes' statistics, split by class."""
    x, y = digits.load()
    train_mask = ~torch.isin(torch.as_tensor(y), torch.as_tensor(test_classes)).numpy()
    xtr, xall = digits.standardize(x[train_mask], x)
    xall = torch.as_tensor(xall, device=device)
    pools = {int(c): xall[torch.as_tensor(y == c)] for c in sorted(set(y.tolist()))}
    return Data({c: v for c, v in pools.items() if c not in test_classes},
                {c: v for c, v in pools.items() if c in test_classes})


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
