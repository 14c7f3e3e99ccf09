"""Nested hypergradients: a problem whose update includes a hypergradient, read by a later problem.

When problem Q's update direction is ``∇ loss_Q + (hypergradient of Q)`` and a
later problem reads Q's solution, a hypergradient that passes through Q must
differentiate Q's hypergradient too: it depends on the values the problems of
Q's sweep read (and, for engines that linearize there, on their solutions). For
Q the graph plans (``inputs``) the values its hypergradient depends on beyond
Q's own reads, and where a run record holds each; with exact engines
(``Engine.exact_nested``) everywhere inside, they become dependencies of Q's
update like its reads, and an adjoint reaching Q is passed on by
differentiating Q's whole direction, recomputed here (``site``): Q's objective's
gradient and adjoint seeds with ``create_graph``, then Q's sweep with every
engine's VJP keeping its graph. Where an approximate engine is inside (or serves
Q), the term is dropped and ``Graph.dropped_paths`` names each path that loses it.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .engines.base import RunRecord
from .tree import Tree


@dataclass(frozen=True)
class Input:
    """A value Q's hypergradient depends on, beyond Q's reads: held by the run record of ``source``
    (its ``reads[name]`` for ``kind="read"``, its ``solution`` for ``kind="solution"``); ``via`` are the
    problems of Q's sweep the dependence passes through (outermost last)."""

    source: str
    kind: str
    via: tuple[str, ...]


@dataclass(frozen=True)
class DroppedPath:
    """A path ``problem -> ... -> problem's read`` along which the hypergradient of ``problem`` is not
    exact: one problem on it has an update that includes a hypergradient which is not differentiated."""

    problem: str
    path: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{' -> '.join(self.path)} ({self.reason})"


# ------------------------------------------------------------------ planning
def inputs(graph, q: str) -> dict[str, Input]:
    """The values Q's hypergradient (its sweep, ``graph.plans[q]``) depends on, by problem name.

    A problem Y counts when the value the sweep uses is Y's solution (Y runs before
    the problem whose run reads it) or its current value with Y after Q; a value
    read between the two (Y's pre-step value, Y before Q) is a constant of the step.
    Engines that use no recorded steps (the implicit ones) linearize at the solution
    of their problem, which counts too. Needs the inputs of the problems before Q.
    """
    iq = graph.index[q]
    out: dict[str, Input] = {}
    for s in graph.plans[q].sweep:
        site, i_s = s.problem, graph.index[s.problem]
        for r in graph.problems[site].reads:
            if graph.index[r] < i_s or graph.index[r] > iq:
                out.setdefault(r, Input(site, "read", (site,)))
        if any(getattr(e, "needs_records", 0) == 0 for _, e in s.wrt):
            out.setdefault(site, Input(site, "solution", ()))
        for y, inp in graph.nested_inputs.get(site, {}).items():
            if graph.index[y] < i_s or graph.index[y] > iq:
                out.setdefault(y, Input(inp.source, inp.kind, inp.via + (site,)))
    return out


def inexact(graph, q: str) -> str | None:
    """Why Q's hypergradient cannot be differentiated exactly (None: it can)."""
    for s in graph.plans[q].sweep:
        for r, e in s.wrt:
            if not e.exact_nested:
                return f"{type(e).__name__} on edge {s.problem}->{r} inside the hypergradient of {q!r}"
        if s.problem in graph.nested_inexact:
            return graph.nested_inexact[s.problem]
    sparse = [n for n in (q, *(s.problem for s in graph.plans[q].sweep)) if graph.problems[n].rows is not None]
    if sparse:
        return f"the row-sparse problem {sparse[0]!r} inside the hypergradient of {q!r}"
    return None


def paths(p: str, edges: dict[str, set[str]], links: list[tuple[str, str, tuple[str, ...], str]],
          ends: set[str]) -> list[DroppedPath]:
    """Every path ``p -> ... -> y (-> via) -> q -> ... -> end`` through a dropped link ``(y, q, via, reason)``.

    ``edges[b]``: the problems whose values b's update depends on (for ``p``'s hypergradient);
    ``ends``: the reads of ``p`` that depend on ``p``.
    """
    succ: dict[str, set[str]] = {}
    for b, srcs in edges.items():
        for a in srcs:
            succ.setdefault(a, set()).add(b)

    @functools.lru_cache(maxsize=None)
    def heads(y: str) -> tuple[tuple[str, ...], ...]:
        if y == p:
            return ((p,),)
        return tuple(h + (y,) for a in sorted(edges.get(y, ())) for h in heads(a))

    @functools.lru_cache(maxsize=None)
    def tails(q: str) -> tuple[tuple[str, ...], ...]:
        out = [(q,)] if q in ends else []
        out += [(q,) + t for b in sorted(succ.get(q, ())) for t in tails(b)]
        return tuple(out)

    found: dict[tuple[str, ...], str] = {}
    for y, q, via, reason in links:
        for h in heads(y):
            for t in tails(q):
                found.setdefault(h + tuple(v for v in via if v != y) + t, reason)
    return [DroppedPath(p, path, reason) for path, reason in found.items()]


# ------------------------------------------------------------------ running
def site(graph, runs: dict[str, RunRecord], name: str, values: dict[str, Tree] | None = None,
         parent: str | None = None) -> RunRecord:
    """``runs[name]`` as an exact engine sees it when ``name``'s hypergradient is differentiated.

    Its ``reads`` hold the inputs of its hypergradient too, and ``direction`` recomputes
    its update direction with the graph kept. Inside another problem's direction
    (``values``: that problem's bound reads and inputs, ``parent``: its name) the values
    that are the same quantities as the parent's are substituted, so the result is
    differentiable with respect to them (``differentiable=True``).
    """
    run = runs[name]
    reads = dict(run.reads)
    exact = name in graph.nested_inputs and name not in graph.nested_inexact
    if exact:
        for y, inp in graph.nested_inputs[name].items():
            if y not in reads:
                held = runs[inp.source]
                reads[y] = held.reads[y] if inp.kind == "read" else held.solution
    solution = run.solution
    if values is not None:
        i, top = graph.index[name], graph.index[parent]
        for y in reads:
            if y in values and (graph.index[y] < i or graph.index[y] > top):
                reads[y] = values[y]
        if name in values:
            solution = values[name]
    own = list(graph.problems[name].reads)

    def loss(params: Tree, bound: dict[str, Tree], record, shared=None):
        return run.loss(params, {r: bound[r] for r in own}, record, shared)

    return dataclasses.replace(run, loss=loss, reads=reads, solution=solution,
                               direction=functools.partial(_direction, graph, runs, name) if exact else None,
                               differentiable=values is not None)


def _direction(graph, runs: dict[str, RunRecord], name: str, w: Tree, reads: dict[str, Tree], record) -> Tree:
    """``name``'s update direction at ``w`` (signed-loss gradient + hypergradient), with its graph."""
    plan, run = graph.plans[name], runs[name]
    own = {r: reads[r] for r in graph.problems[name].reads}
    for r in plan.upstream:    # the adjoint seeds: gradients with respect to these values, at fixed w
        # (an alias: ``w`` may depend on the value itself, through earlier unrolled steps)
        own[r] = {k: v.view_as(v) if v.requires_grad else v.detach().requires_grad_(True) for k, v in own[r].items()}
    loss = run.loss(w, own, record)
    keys = [("", k) for k in w] + [(r, k) for r in plan.upstream for k in own[r]]
    at = [w[k] if r == "" else own[r][k] for r, k in keys]
    if loss.requires_grad:
        gs = torch.autograd.grad(loss, at, create_graph=True, allow_unused=True, materialize_grads=True)
    else:
        gs = [torch.zeros_like(t) for t in at]
    direct: Tree = {}
    adjoints: dict[str, Tree] = {}
    for (r, k), g in zip(keys, gs):
        if r == "":
            direct[k] = g
        else:
            adjoints.setdefault(r, {})[k] = g
    hyper = _sweep(graph, runs, name, adjoints, {**reads, **own})
    return {k: g + hyper[k] for k, g in direct.items()} if hyper is not None else direct


def _sweep(graph, runs: dict[str, RunRecord], name: str, adjoints: dict[str, Tree],
           values: dict[str, Tree]) -> Tree | None:
    """``name``'s sweep (``Stepper._sweep`` without its checks), every VJP keeping its graph."""
    hyper = None
    for s in graph.plans[name].sweep:
        u = adjoints.pop(s.problem, None)
        if u is None:
            continue
        at = site(graph, runs, s.problem, values, name)
        groups: dict = {}
        for r, eng in s.wrt:
            groups.setdefault(eng, []).append(r)
        for eng, wrt in groups.items():
            for r, contrib in eng.vjp(at, u, wrt).items():
                if r == name:
                    hyper = _plus(hyper, contrib)
                else:
                    adjoints[r] = _plus(adjoints.get(r), contrib)
    return hyper


def _plus(acc: Tree | None, tree: Tree) -> Tree:
    return dict(tree) if acc is None else {k: acc[k] + tree[k] for k in acc}
