"""Tiny helpers for "parameter trees": ordered ``dict[str, Tensor]``.

Every problem's parameters, every adjoint and every hypergradient is such a dict;
keeping one representation makes the engines short.
"""
from __future__ import annotations

import torch
from torch import Tensor

Tree = dict[str, Tensor]


def detach(tree: Tree, requires_grad: bool = False) -> Tree:
    """Detached views (no copy); optionally fresh leaves that require grad."""
    out = {}
    for k, v in tree.items():
        d = v.detach()
        out[k] = d.requires_grad_(True) if requires_grad else d
    return out


def clone(tree: Tree) -> Tree:
    return {k: v.detach().clone() for k, v in tree.items()}


def add_(acc: Tree | None, tree: Tree) -> Tree:
    """Accumulate ``tree`` into ``acc`` (returns the accumulator)."""
    if acc is None:
        return {k: v.clone() for k, v in tree.items()}
    keys = list(tree)
    torch._foreach_add_([acc[k] for k in keys], [tree[k] for k in keys])
    return acc


def dot(x: Tree, y: Tree) -> Tensor:
    return sum((x[k] * y[k]).sum() for k in x)


def norm(x: Tree) -> Tensor:
    if not x:
        return torch.zeros(())
    if len(x) == 1:
        return torch.linalg.vector_norm(next(iter(x.values())))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(x.values()))))


def grads(outputs, inputs: Tree, grad_outputs=None, create_graph: bool = False,
          retain_graph: bool | None = None) -> Tree:
    """``torch.autograd.grad`` over a tree; unused inputs get zeros, never ``None``."""
    keys = list(inputs)
    gs = torch.autograd.grad(outputs, [inputs[k] for k in keys], grad_outputs=grad_outputs,
                             create_graph=create_graph, retain_graph=retain_graph,
                             allow_unused=True, materialize_grads=True)
    return dict(zip(keys, gs))


def all_finite(x: Tree) -> Tensor:
    """One device-side boolean: every entry of every tensor is finite (no host sync)."""
    if not x:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(v).all() for v in x.values()]).all()
