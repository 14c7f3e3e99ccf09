"""``Binding``: how one real step of a problem sees, differentiates and updates its parameters.

Dense and row-sparse parameters (``mlo.rows``) look the same to the ``Stepper``: a
binding is made per step and does the parameter side of the four moves of a step
(docs/mlo.md §2):

* ``bind`` — the values the objective sees: the problem's own parameters (the leaves
  its gradient is taken for), its reads (fresh leaves for the adjoint seeds and for
  the reads a kept step graph holds; detached values otherwise) and its constants;
* ``tag`` — the gradient and the adjoint seeds, marked with the batch's rows where a
  problem is row-sparse;
* ``record`` — what the step record keeps for the engines: the pre-step point, the
  optimizer snapshot and the direction (the batch's rows only for a row-sparse problem);
* ``apply`` — the optimizer update (scattered into the rows for a row-sparse problem).
"""
from __future__ import annotations

import torch

from . import rows as rowsmod, updates
from .tree import Tree, clone, detach


class Binding:
    """One step's view of ``problem``: ``rows`` maps each row-sparse problem it touches
    (itself, its reads, its constants) to the rows the step's batch names (``{}``: all dense)."""

    def __init__(self, problem, rows: dict[str, rowsmod.Rows]):
        self.problem = problem
        self.rows = rows

    @classmethod
    def of(cls, graph, problem, batch, sparse: bool) -> "Binding":
        """The binding of ``problem`` for ``batch`` (``sparse``: the graph has row-sparse problems)."""
        return cls(problem, rowsmod.batch_rows(graph, problem, batch) if sparse else {})

    def keeps(self, reads) -> list[str]:
        """The reads of ``reads`` whose leaves a kept step graph can hold (not row-sparse ones)."""
        return [r for r in reads if r not in self.rows]

    def bind(self, graph, constants: dict[str, Tree], seeds, kept) -> tuple[Tree, dict, dict]:
        """``(own, values, seed leaves)``: the own parameters, everything the objective sees, and
        fresh leaves for the reads in ``seeds``. Reads in ``kept`` are bound as copies (the kept
        graph must survive later in-place updates) and so is ``own`` then (the update must not
        touch that graph)."""
        name, rows = self.problem.name, self.rows
        own = self.problem.params_tree
        if name in rows:
            own = rowsmod.gather(own, rows[name], requires_grad=True)
        elif kept:
            own = {k: v.detach().clone().requires_grad_(True) for k, v in own.items()}
        values: dict[str, Tree] = {c: rowsmod.gather(t, rows[c]) if c in rows else t for c, t in constants.items()}
        values[name] = own
        leaves: dict[str, Tree] = {}
        for r in self.problem.reads:
            live = graph.problems[r].params_tree
            if r in rows:
                live = rowsmod.gather(live, rows[r])
            if r in seeds:
                values[r] = leaves[r] = detach(live, requires_grad=True)
            elif r in kept:
                values[r] = {k: v.detach().clone().requires_grad_(True) for k, v in live.items()}
            else:
                values[r] = detach(live)
        return own, values, leaves

    def tag(self, direct: Tree, adjoints: dict[str, Tree]) -> tuple[Tree, dict[str, Tree]]:
        """The step's gradient and adjoint seeds, as ``RowTree``s for the row-sparse problems."""
        if not self.rows:
            return direct, adjoints
        rows, name = self.rows, self.problem.name
        if name in rows:
            direct = rowsmod.RowTree(direct, rows[name])
        return direct, {r: rowsmod.RowTree(t, rows[r]) if r in rows else t for r, t in adjoints.items()}

    def record(self, total: Tree, keep: int) -> tuple:
        """``(params, snapshot, grad)`` for the step record (``None`` each when ``keep`` is 0):
        the parameters before the update, the optimizer's snapshot and the update direction."""
        if not keep:
            return None, None, None
        p = self.problem
        own = self.rows.get(p.name)
        if own is not None:
            return (rowsmod.gather(p.params_tree, own), updates.snapshot(p.torch_optimizer, p.params_tree, None, own),
                    rowsmod.project(total, own))
        # a copy of the direction: clipping in ``apply`` works in place
        return clone(p.params_tree), updates.snapshot(p.torch_optimizer, p.params_tree, p.grad_clip), clone(total)

    def apply(self, total: Tree) -> None:
        """One optimizer update along ``total`` (a ``RowTree``: on the rows it names)."""
        p = self.problem
        if isinstance(total, rowsmod.RowTree):
            rowsmod.step(p, total)
            return
        params = p.params_tree
        for k, t in params.items():
            t.grad = total[k].detach()
        if p.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), p.grad_clip)
        p.torch_optimizer.step()
        for t in params.values():   # = zero_grad(set_to_none=True): it holds exactly these
            t.grad = None


def read_values_of(graph, problem, names, copy_later: bool) -> dict[str, Tree]:
    """The values of the problems in ``names`` as ``problem``'s run starts: copies of those that
    run later (and will still change) when ``copy_later``, detached values otherwise."""
    idx = graph.index
    return {r: clone(graph.problems[r].params_tree) if copy_later and idx[r] > idx[problem.name]
            else detach(graph.problems[r].params_tree) for r in names}
