"""Row-sparse problem parameters: a table of rows of which each batch reads a few.

A problem declared with ``rows=fn`` (``fn(batch) -> integer tensor``) owns
tables whose first dimension indexes examples (a per-example explanation bank,
per-example weights). Each step only the rows its batch names are live: the
objective, its readers and the engines see gathered copies of those rows
(``ctx[name]`` is a ``RowView``: index it with the batch's row indices), every
gradient, adjoint and record is batch-sized (a ``RowTree``: values for the
sorted unique ``rows``), and the optimizer update is scattered into the table.
The tables themselves, the optimizer state and checkpoints stay whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError, InputTypeError, MLOError
from .tree import Tree, add_, detach


@dataclass(frozen=True, eq=False)
class Rows:
    """The rows one batch touches: ``index`` sorted and unique; ``source`` the tensor
    ``rows(batch)`` returned and ``local`` its entries' positions in ``index``."""

    index: Tensor
    source: object = None
    local: Tensor | None = None

    def positions(self, idx) -> Tensor:
        """Positions in ``index`` of the row numbers ``idx`` (any shape)."""
        if idx is self.source and self.local is not None:
            return self.local
        t = torch.as_tensor(idx, device=self.index.device)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise InputTypeError(f"a row-sparse table is indexed by integer row numbers, got {t.dtype}")
        flat = t.reshape(-1).long()
        pos = torch.searchsorted(self.index, flat).clamp_(max=max(self.index.numel() - 1, 0))
        if flat.numel() and (self.index.numel() == 0 or not bool((self.index[pos] == flat).all())):
            raise MLOError("a row-sparse table was indexed with rows its batch does not name "
                           "(Problem.rows(batch) must list every row the objective reads)")
        return pos.reshape(t.shape)


def of_batch(problem, batch) -> Rows:
    """The rows ``problem.rows(batch)`` names, deduplicated and sorted."""
    src = problem.rows(batch)
    t = torch.as_tensor(src)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise MLOError(f"problem {problem.name!r}: rows(batch) must return integer row numbers, got {t.dtype}")
    table = next(iter(problem.params_tree.values()))
    index, inverse = torch.unique(t.reshape(-1).to(table.device, torch.int64), sorted=True, return_inverse=True)
    return Rows(index, src, inverse.reshape(t.shape))


def union(rows: list[Rows]) -> Rows:
    """The rows any of ``rows`` names (the first one itself when there is one)."""
    if len(rows) == 1:
        return rows[0]
    return Rows(torch.unique(torch.cat([r.index for r in rows]), sorted=True))


class RowView:
    """What ``ctx[name]`` gives for a row-sparse parameter: ``view[idx]`` is the rows ``idx``
    (row numbers of the whole table, repeats allowed) of the gathered slice ``values``."""

    def __init__(self, values: Tensor, rows: Rows):
        self.values, self.rows = values, rows

    def __getitem__(self, idx) -> Tensor:
        return self.values[self.rows.positions(idx)]

    def __repr__(self) -> str:
        return f"RowView({self.rows.index.numel()} rows of {tuple(self.values.shape[1:])})"


class RowTree(dict):
    """A batch-sized tree for a row-sparse parameter: ``tree[k][i]`` belongs to table row ``rows.index[i]``."""

    def __init__(self, values: Tree, rows: Rows):
        super().__init__(values)
        self.rows = rows


def like(tree: Tree, values: Tree) -> Tree:
    """``values`` with ``tree``'s rows, when ``tree`` is a ``RowTree``."""
    return RowTree(values, tree.rows) if isinstance(tree, RowTree) else values


def gather(tree: Tree, rows: Rows, requires_grad: bool = False) -> Tree:
    """Copies of the rows ``rows.index`` of every table in ``tree`` (fresh leaves with ``requires_grad``)."""
    return {k: v.detach()[rows.index].requires_grad_(requires_grad) for k, v in tree.items()}


def add(acc: Tree | None, tree: Tree) -> Tree:
    """``add_`` for trees that may be ``RowTree``s: rows named by either are summed."""
    if not isinstance(tree, RowTree):
        return add_(acc, tree)
    if acc is None:
        return RowTree({k: v.clone() for k, v in tree.items()}, tree.rows)
    if acc.rows.index is tree.rows.index:
        return RowTree(add_(dict(acc), tree), acc.rows)
    n = acc.rows.index.numel()
    index, inverse = torch.unique(torch.cat([acc.rows.index, tree.rows.index]), sorted=True, return_inverse=True)
    out = {}
    for k, a in acc.items():
        t = a.new_zeros((index.numel(), *a.shape[1:]))
        t.index_add_(0, inverse[:n], a)
        out[k] = t.index_add_(0, inverse[n:], tree[k])
    return RowTree(out, Rows(index))


def project(tree: Tree, rows: Rows) -> Tree:
    """The rows ``rows.index`` of a ``RowTree`` (zeros where it names none), as a plain tree."""
    if tree.rows.index is rows.index:
        return dict(tree)
    have = tree.rows.index
    pos = torch.searchsorted(have, rows.index).clamp_(max=max(have.numel() - 1, 0))
    hit = have[pos] == rows.index if have.numel() else torch.zeros_like(rows.index, dtype=torch.bool)
    out = {}
    for k, v in tree.items():
        mask = hit.view(-1, *([1] * (v.dim() - 1)))
        out[k] = torch.where(mask, v[pos] if have.numel() else v.new_zeros(()), v.new_zeros(()))
    return out


def dense(tree: Tree, tables: Tree) -> Tree:
    """A ``RowTree`` written into zero tables shaped like ``tables`` (repeats summed)."""
    if not isinstance(tree, RowTree):
        return tree
    return {k: torch.zeros_like(tables[k]).index_add_(0, tree.rows.index, v) for k, v in tree.items()}


def batch_rows(graph, problem, batch) -> dict[str, Rows]:
    """``{name: Rows}`` for every row-sparse problem ``problem`` touches (itself, reads, constants)."""
    out = {}
    for name in (problem.name, *problem.reads, *problem.constants):
        p = graph.problems[name]
        if p.rows is not None:
            out[name] = of_batch(p, batch)
    return out


# --------------------------------------------------------------------- the run record
def run_rows(problem, records: list, reads: dict, constants: dict) -> tuple[dict, dict, dict, Tree]:
    """``(rows, reads, constants, solution)`` of a run record: the problem's own rows are those of
    its last step; a row-sparse read or constant is gathered at the rows any kept step named."""
    names = {n for rec in records for n in rec.rows}
    if not names:
        return {}, reads, constants, detach(problem.params_tree)
    rows = {n: records[-1].rows[n] if n == problem.name else union([rec.rows[n] for rec in records])
            for n in names}
    pick = lambda vals: {n: gather(t, rows[n]) if n in rows else t for n, t in vals.items()}  # noqa: E731
    own = gather(problem.params_tree, rows[problem.name]) if problem.name in rows else detach(problem.params_tree)
    return rows, pick(reads), pick(constants), own


# --------------------------------------------------------------------- the update
def step(problem, total: Tree) -> None:
    """Apply the update direction ``total`` (a ``RowTree``) to the rows it names.

    ``torch.optim.SGD`` (weight decay, momentum, Nesterov, maximize) is applied to
    those rows only, with *lazy* momentum: a row's buffer (a whole-table tensor
    in the optimizer's state, zero at first) changes only when the row is
    visited. Other optimizers provide ``row_step(group, param, rows, grad)``.
    """
    opt = problem.torch_optimizer
    rows = total.rows.index
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    with torch.no_grad():
        for k, p in problem.params_tree.items():
            g, group = total[k].detach(), group_of[id(p)]
            if hasattr(opt, "row_step"):
                opt.row_step(group, p, rows, g)
            else:
                _sgd_rows(opt, group, p, rows, g)


def _sgd_rows(opt, group: dict, p: Tensor, rows: Tensor, g: Tensor) -> None:
    """``torch.optim.SGD``'s arithmetic, op for op, on the rows ``rows`` of ``p``."""
    d = -g if group["maximize"] else g
    w = p[rows]
    if group["weight_decay"]:
        d = d.add(w, alpha=group["weight_decay"])
    mu = group["momentum"]
    if mu:
        state = opt.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        full = state["momentum_buffer"]
        buf = full[rows].mul_(mu).add_(d)
        full[rows] = buf
        d = d.add(buf, alpha=mu) if group["nesterov"] else buf
    p[rows] = w.add(d, alpha=-float(group["lr"]))


# --------------------------------------------------------------------- validation
def validate(problem, where: str) -> None:
    """Raise ``ConfigError`` unless ``problem`` can be run row-sparse."""
    if not callable(problem.rows):
        raise ConfigError(f"{where}: rows: expected a function batch -> row indices, got {problem.rows!r}")
    if isinstance(problem.params, nn.Module):
        raise ConfigError(f"{where}: rows: params must be tensors (a table, a dict or a list of tables), "
                          "not a module: its objective reads them with ctx[name][rows]")
    n = None
    for k, t in problem.params_tree.items():
        if t.dim() == 0 or (n is not None and t.shape[0] != n):
            raise ConfigError(f"{where}: rows: parameter {k!r} of shape {tuple(t.shape)} is not a table "
                              f"of {n if n is not None else 'N'} rows like the others")
        n = t.shape[0]
    if problem.grad_clip is not None:
        raise ConfigError(f"{where}: rows: grad_clip is not supported on a row-sparse problem")
    opt = problem.torch_optimizer
    if hasattr(opt, "row_step"):
        return
    if type(opt) is not torch.optim.SGD:
        raise ConfigError(f"{where}: rows: the optimizer must be torch.optim.SGD or define "
                          f"row_step(group, param, rows, grad); got {type(opt).__name__}")
    if any(g["dampening"] for g in opt.param_groups):
        raise ConfigError(f"{where}: rows: SGD dampening is not supported on a row-sparse problem")


def validate_engines(graph) -> None:
    """One-step engines only on a row-sparse problem's edges (its record holds one batch's rows)."""
    from .engines.unrolled import Unrolled
    from .errors import GraphError
    for (q, r), eng in graph.engines.items():
        p = graph.problems[q]
        if p.rows is None or q not in graph.differentiated or not graph._passes(q, r):
            continue
        if eng.reference() != Unrolled(steps=1):
            raise GraphError(f"problem {q!r}: edge {q}->{r} uses {eng!r}; a row-sparse problem's edges take "
                             "FirstOrder(), FiniteDifference() or Unrolled(steps=1)")
        if type(p.torch_optimizer) is not torch.optim.SGD:
            raise GraphError(f"problem {q!r}: edge {q}->{r} differentiates the update of a row-sparse "
                             f"problem, which is known for torch.optim.SGD only; got "
                             f"{type(p.torch_optimizer).__name__}")
