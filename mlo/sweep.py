"""The differentiation of one real step (docs/mlo.md §2, moves 2 and 3).

``seeds``: the gradient of a problem's signed objective w.r.t. its own parameters
(the direct part) and w.r.t. the adjoint seeds, the reads whose updated solutions
later problems differentiate; ``sweep``: the reverse sweep back through those
problems, one engine VJP per edge, adjoints summed where paths meet; ``total``:
direct part plus hypergradient, combined across processes by a ``reduce_fn``;
``record_loss``: the signed objective a ``RunRecord`` hands the engines.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import nested, rng, rows as rowsmod
from .context import Context
from .engines.base import StepGraph
from .state import preserve_buffers
from .tree import Tree, all_finite, detach


def signed(problem, objective: Tensor) -> Tensor:
    """The objective as a 0-d tensor, negated for a ``max`` problem (no op for a ``min`` one)."""
    value = objective if objective.dim() == 0 else objective.reshape(())
    return value if problem.sign == 1.0 else -value


def seeds(loss: Tensor, own: Tree, leaves: dict[str, Tree], kept: dict[str, Tree]):
    """``(direct, adjoint seeds, step graph)``: ``∂loss/∂own`` and ``∂loss/∂leaves[r]``; with ``kept``
    (``{read: leaves}``) the gradient keeps its graph in a ``StepGraph`` and the returned ones are copies."""
    targets = list(own.values()) + [v for t in leaves.values() for v in t.values()]
    step_graph = None
    if loss.requires_grad:
        gs = torch.autograd.grad(loss, targets, allow_unused=True, materialize_grads=True, create_graph=bool(kept))
        if kept:
            step_graph = StepGraph(dict(zip(own, gs)), kept, own)   # own: the point's leaves
            gs = [g.detach().clone() for g in gs]   # the update clips in place; the kept values must stay
    else:  # the objective does not depend on anything this problem can change
        gs = [torch.zeros_like(t) for t in targets]
    direct, adjoints, i = dict(zip(own, gs)), {}, len(own)
    for r, t in leaves.items():
        adjoints[r] = dict(zip(t, gs[i:i + len(t)]))
        i += len(t)
    return direct, adjoints, step_graph


def sweep(stepper, problem, calls, adjoints: dict[str, Tree], checks: list, seen: dict | None, direct: Tree) -> Tree:
    """Reverse accumulation along ``calls`` (a ``stepplan.SweepCall`` per problem of the sweep): each
    edge's VJP once, adjoints summed per problem; returns what reaches ``problem`` (its hypergradient).
    Appends a finiteness check per edge to ``checks`` (unless the stepper's NaN policy is off) and,
    with ``seen``, records each adjoint."""
    graph, runs, hyper = stepper.graph, stepper.runs, None
    check = stepper.nan_policy != "off"
    with preserve_buffers(stepper._plan.modules):
        for s in calls:
            u = adjoints.pop(s.problem, None)
            if u is None:
                continue
            if seen is not None:
                seen[s.problem] = rowsmod.like(u, detach(u))
            run = runs[s.problem]
            if run.rows and s.problem in run.rows:   # a row-sparse problem's edges see the rows its step updated
                u = rowsmod.project(u, run.rows[s.problem])
            for call in s.calls:
                stepper.vjp_calls[call.label] += 1
                site = nested.site(graph, runs, s.problem) if call.nested else run
                for r, contrib in call.engine.vjp(site, u, call.reads).items():
                    if run.rows and r in run.rows:
                        contrib = rowsmod.RowTree(contrib, run.rows[r])
                    if check:
                        checks.append(("hypergradient", f"{s.problem}->{r}", all_finite(contrib)))
                    if r == problem.name:
                        hyper = _plus(hyper, contrib)
                    else:
                        adjoints[r] = _plus(adjoints.get(r), contrib)
    if hyper is None:
        hyper = rowsmod.like(direct, {k: torch.zeros_like(v) for k, v in direct.items()})
    return hyper


def _plus(acc: Tree | None, tree: Tree) -> Tree:
    """``acc + tree``; ``tree`` itself when there is no ``acc`` yet (a dense one is then never
    changed in place: a second contribution makes a new sum), row trees through ``rows.add``."""
    if isinstance(tree, rowsmod.RowTree) or isinstance(acc, rowsmod.RowTree):
        return rowsmod.add(acc, tree)
    if acc is None:
        return tree
    out = dict(acc)
    for k, v in tree.items():
        out[k] = acc[k] + v
    return out


def total(problem, direct: Tree, hyper: Tree | None, checks: list, reduce_fn, check: bool) -> Tree:
    """``direct + hyper``, through ``reduce_fn`` when there is one (a direction that failed a local
    check is NaN there, so that every process sees the failure)."""
    if isinstance(direct, rowsmod.RowTree):
        out = direct if hyper is None else rowsmod.add(rowsmod.add(None, direct), hyper)
    else:
        out = direct if hyper is None else {k: direct[k] + hyper[k] for k in direct}
    if reduce_fn is None:
        return out
    if check:   # processes must agree: a local failure poisons the combined update
        ok = torch.stack([f for _, _, f in checks]).all()
        out = rowsmod.like(out, {k: torch.where(ok, v, v.new_full((), float("nan"))) for k, v in out.items()})
    out = reduce_fn(problem, out)
    if check:
        checks.append(("update from another process", None, all_finite(out)))
    return out


def record_loss(graph, problem, constants: dict[str, Tree], rows: dict | None, step: int):
    """``loss(params, reads, record, shared=None)`` of a ``RunRecord``: the signed objective on the
    record's batch with its RNG state replayed (``mlo.engines.base.RunRecord``)."""
    def loss(params: Tree, reads: dict[str, Tree], record, shared=None) -> Tensor:
        ctx = Context(graph, problem, {**constants, problem.name: params, **reads}, step=step,
                      real_step=False, shared=shared, rows=rows or None)
        with rng.replay(record.rng):
            return signed(problem, problem.objective(ctx, record.batch))
    return loss
