"""A LeaSE-shaped four-problem graph on small linear models (no BatchNorm), for the scale tests.

explainer (weights of f, reads architecture) -> explanation (per-example bank, max, summed loss,
reads explainer) -> audience (g on x * delta, same batch, reads explanation) -> architecture
(input gates of f, reads explainer and audience). Data come from ``ShardedSampler`` loaders, so a
run with W processes and per-process batch b sees, step by step, the examples that one process
with batch W*b sees.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlo
import mlo.distributed

N, D, C = 48, 6, 3


class Explainer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)
        self.alpha = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return self.lin(x * 2 * torch.sigmoid(self.alpha))


def _data(dtype):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, D, generator=g).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    xv = torch.randn(N, D, generator=g).to(dtype)
    yv = torch.randint(0, C, (N,), generator=g)
    return TensorDataset(x, y, torch.arange(N)), TensorDataset(xv, yv, torch.arange(N))


def loader(ds, batch, seed, rank, world):
    gen = torch.Generator().manual_seed(seed)
    sampler = mlo.distributed.ShardedSampler(len(ds), rank=rank, world_size=world, generator=gen)
    return DataLoader(ds, batch_size=batch, sampler=sampler, generator=gen, drop_last=True)


def build(batch, rank=0, world=1, second_order=False, dtype=torch.float64, nan=None):
    """The graph and its modules. ``nan=(rank, step, problem)`` makes that problem's objective NaN
    on that process at that outer step."""
    train, val = _data(dtype)
    torch.manual_seed(0)
    f, g = Explainer().to(dtype), nn.Linear(D, C).to(dtype)
    bank = (torch.rand(N, D, generator=torch.Generator().manual_seed(1)) * 0.2 - 0.1).to(dtype).requires_grad_()

    def poison(ctx, name, loss):
        if nan is not None and ctx.real_step and nan[0] == rank and nan[1] == ctx.step and nan[2] == name:
            return loss * float("nan")
        return loss

    def explainer_loss(ctx, batch):
        x, y, _ = batch
        return poison(ctx, "explainer", F.cross_entropy(ctx.forward(f, x), y))

    def explanation_loss(ctx, batch):
        x, _, idx = batch
        d = ctx["explanation"][idx]
        clean, pert = ctx.forward(f, x), ctx.forward(f, x + d)
        return poison(ctx, "explanation", -(F.softmax(clean, 1) * F.log_softmax(pert, 1)).sum())

    def audience_loss(ctx, batch):
        x, y, idx = batch
        return poison(ctx, "audience", F.cross_entropy(ctx.forward(g, x * ctx["explanation"][idx]), y))

    def architecture_loss(ctx, batch):
        x, y, _ = batch
        loss = F.cross_entropy(ctx.forward(f, x), y) + F.cross_entropy(ctx.forward(g, x), y)
        return poison(ctx, "architecture", loss)

    eng = (lambda e: e) if second_order else (lambda e: mlo.FirstOrder())
    sgd = lambda lr, m=0.9: (lambda p: torch.optim.SGD(p, lr=lr, momentum=m, weight_decay=1e-3))  # noqa: E731
    problems = [
        mlo.Problem("explainer", {"lin.weight": f.lin.weight, "lin.bias": f.lin.bias}, explainer_loss, sgd(0.1),
                    data=loader(train, batch, 10, rank, world), reads=["architecture"], engine=eng(mlo.Unrolled()),
                    grad_clip=5.0, modules=[f]),
        mlo.Problem("explanation", bank, explanation_loss, lambda p: torch.optim.SGD(p, lr=0.5),
                    data=loader(train, batch, 11, rank, world), reads=["explainer"], mode="max",
                    engine=eng(mlo.FiniteDifference(eps=1e-4))),
        mlo.Problem("audience", g, audience_loss, sgd(0.2), data=mlo.SameBatch("explanation"), reads=["explanation"],
                    engine=eng(mlo.Unrolled())),
        mlo.Problem("architecture", {"alpha": f.alpha}, architecture_loss, lambda p: torch.optim.Adam(p, lr=0.05),
                    data=loader(val, batch, 12, rank, world), reads=["explainer", "audience"]),
    ]
    return mlo.Graph(problems)


def data_parallel(graph):
    return mlo.distributed.DataParallel(graph, reduce={"explanation": "sum"},
                                        rows={"explanation": lambda batch: batch[2]})


def params(graph):
    return {f"{n}/{k}": v.detach().clone() for n, p in graph.problems.items() for k, v in p.params_tree.items()}
