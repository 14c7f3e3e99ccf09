"""``Graph``: which problem reads which, the execution order, and what that implies.

Problems run in ``order``. A problem that reads a problem *earlier* in the order
reads its updated solution, and hypergradients flow back through that edge; one
that reads a *later* problem reads its current value (a hyperparameter). From
these two facts the graph derives, once, for every problem P: which earlier
problems depend on P this step, and the reverse sweep that brings P's
hypergradient back — each edge visited once, adjoints summed where paths meet.
A problem whose own update includes a hypergradient also depends on what that
hypergradient depends on (``mlo.nested``); the plans include it.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from . import graph_checks as checks, nested, rows
from .engines import Engine, Unrolled
from .errors import GraphError
from .problem import Problem


@dataclass(frozen=True)
class SweepStep:
    """Propagate the adjoint at ``problem``'s solution to the reads in ``wrt``."""

    problem: str
    wrt: tuple[tuple[str, Engine], ...]     # (read name, engine) pairs
    # the problem's update includes a hypergradient that the exact engines here differentiate too
    # (``mlo.nested``); ``wrt`` then also names the inputs of that hypergradient it does not read
    nested: bool = False


@dataclass(frozen=True)
class Plan:
    """How to compute one problem's total gradient."""

    upstream: tuple[str, ...]     # reads of P whose updated value depends on P (adjoint seeds)
    sweep: tuple[SweepStep, ...]  # reverse execution order


class Graph:
    """A validated set of problems and their dependencies.

    ``Graph(problems, order=None)``: ``order`` lists every problem name once
    (default: the order of ``problems``). Raises ``GraphError`` for unknown
    names, duplicates, self-reads, problems nobody reads (unless named in
    ``allow_unread``, e.g. the last level of an ablation), and engines that the
    schedule cannot serve.

    ``dropped_paths``: the paths along which a hypergradient is not exact because
    an update that includes a hypergradient is differentiated by an approximate
    engine (``mlo.nested.DroppedPath``; ``print(graph)`` lists them and building
    the graph warns once); empty when the exact engines serve every such update.
    """

    def __init__(self, problems: Sequence[Problem], order: Sequence[str] | None = None,
                 allow_unread: Sequence[str] = ()):
        problems = list(problems)
        if not problems:
            raise GraphError("Graph: no problems given")
        for p in problems:
            if not isinstance(p, Problem):
                raise GraphError(f"Graph: expected Problem objects, got {type(p).__name__}")
        names = [p.name for p in problems]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GraphError(f"Graph: duplicate problem name(s): {', '.join(map(repr, dup))}")
        self.problems: dict[str, Problem] = {p.name: p for p in problems}
        self.order: list[str] = list(order) if order is not None else names
        self.allow_unread = set(allow_unread)
        checks.problems(self)
        self.index = {n: i for i, n in enumerate(self.order)}
        self.engines = {(q, r): self._engine(q, r) for q in self.order for r in self.problems[q].reads}
        # serves what a problem's hypergradient depends on beyond its reads (mlo.nested)
        self.default_engines = {q: self._engine(q, None) for q in self.order}
        self._owners: dict[int, dict] = {}
        self._derive()

    def _derive(self) -> None:
        """Plans, and what they imply, from ``self.engines``.

        In order, because a problem's plan uses what the hypergradients of the problems
        before it depend on: ``nested_inputs[Q]`` for each Q whose update includes a
        hypergradient, ``nested_inexact[Q]`` why that one cannot be differentiated (if so).
        ``dropped_paths`` lists every path along which a hypergradient is therefore not exact.
        """
        self.plans, self.nested_inputs, self.nested_inexact = {}, {}, {}
        self.dropped_paths: list[nested.DroppedPath] = []
        for p in self.order:
            self.plans[p], dropped = self._plan(p)
            self.dropped_paths += dropped
            if self.plans[p].sweep:
                self.nested_inputs[p] = nested.inputs(self, p)
                why = nested.inexact(self, p)
                if why:
                    self.nested_inexact[p] = why
        # problems whose solution some sweep differentiates: their runs are recorded for the engines
        self.differentiated = {s.problem for plan in self.plans.values() for s in plan.sweep}
        needs = {q: [getattr(e, "needs_records", 0) for (qq, _), e in self.engines.items() if qq == q]
                 for q in self.differentiated}
        for plan in self.plans.values():
            for s in plan.sweep:
                needs[s.problem] += [getattr(e, "needs_records", 0) for _, e in s.wrt]
        self.records_needed = {q: max(n or [0]) for q, n in needs.items()}
        self.validate_engines()
        rows.validate_engines(self)
        if self.dropped_paths:
            warnings.warn(f"mlo.Graph: {len(self.dropped_paths)} hypergradient path(s) not differentiated "
                          "exactly (an update that includes a hypergradient meets an approximate engine or a "
                          f"row-sparse problem): {'; '.join(map(str, self.dropped_paths))}. Exact "
                          "engines there (Unrolled, DenseImplicit) give the exact value; the list is "
                          "graph.dropped_paths", stacklevel=3)

    # ------------------------------------------------------------- validation
    def _unknown(self, name: str, where: str) -> GraphError:
        close = difflib.get_close_matches(name, list(self.problems), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known problems: {', '.join(self.problems)}"
        return GraphError(f"{where}: unknown problem {name!r}{hint}")

    def _engine(self, q: str, r: str | None) -> Engine:
        p = self.problems[q]
        eng = p.edge_engines.get(r, p.engine) if r is not None else p.engine
        if eng is None:
            eng = Unrolled()
        if not isinstance(eng, Engine):
            edge = f"edge {q}->{r}" if r is not None else "its edges"
            raise GraphError(f"problem {q!r}: engine for {edge} must be an engine config such as "
                             f"Unrolled() or CG(iterations=10), got {type(eng).__name__}")
        return eng

    # ------------------------------------------------------------- planning
    def _passes(self, q: str, r: str) -> bool:
        """Whether an adjoint at ``q``'s solution flows on to its read ``r`` (the engine's say)."""
        return bool(self.engines[(q, r)].passes_adjoint)

    def _plan(self, p: str) -> tuple[Plan, list[nested.DroppedPath]]:
        """P's plan, and the paths it drops (``nested``).

        Q depends on P when Q reads P's value or the solution of a problem that depends
        on P (a read earlier than Q), or, when Q's update includes a hypergradient that
        exact engines differentiate, when that hypergradient has such an input. ``full``
        is the same as if every hypergradient were differentiated, to name dropped paths.
        """
        ip = self.index[p]
        dep: set[str] = set()
        full: set[str] = set()
        wrts: dict[str, tuple] = {}
        edges: dict[str, set[str]] = {}     # for ``full``: b -> the problems b's update depends on
        links = []                          # (y, q, via, reason): q's hypergradient's dependence on y dropped
        for q in self.order[:ip]:
            iq = self.index[q]
            flows = lambda r, d: r == p or (r in d and self.index[r] < iq)   # noqa: E731
            reads = [r for r in self.problems[q].reads if self._passes(q, r)]
            wrt = [(r, self.engines[(q, r)]) for r in reads if flows(r, dep)]
            edges[q] = {r for r in reads if flows(r, full)}
            inputs = self.nested_inputs.get(q)
            if inputs is not None:          # q's update includes a hypergradient
                why = self.nested_inexact.get(q)
                for r in edges[q]:
                    eng = self.engines[(q, r)]
                    if why or not eng.exact_nested:
                        links.append((r, q, (), why or f"{type(eng).__name__} on edge {q}->{r} differentiates "
                                      f"only the gradient of {q!r}, not its hypergradient"))
                eng = self.default_engines[q]
                ok = not why and eng.exact_nested and eng.passes_adjoint
                for y, inp in inputs.items():
                    if y in self.problems[q].reads or not flows(y, full):
                        continue
                    edges[q].add(y)
                    if ok and flows(y, dep):
                        wrt.append((y, eng))
                    elif not ok:
                        links.append((y, q, inp.via, why or f"{type(eng).__name__}, the engine of {q!r}, does "
                                      "not differentiate its hypergradient"))
            if edges[q]:
                full.add(q)
            else:
                del edges[q]
            if wrt:
                dep.add(q)
                wrts[q] = tuple(wrt)
        sweep = [SweepStep(q, wrts[q], q in self.nested_inputs and q not in self.nested_inexact)
                 for q in reversed(self.order[:ip]) if q in dep]
        upstream = tuple(r for r in self.problems[p].reads if r in dep)
        # prune problems whose solution no adjoint can reach
        reach = set(upstream)
        kept = []
        for s in sweep:
            if s.problem in reach:
                kept.append(s)
                reach.update(r for r, _ in s.wrt if r != p)
        ends = {r for r in self.problems[p].reads if r in full}
        return Plan(upstream, tuple(kept)), nested.paths(p, edges, links, ends) if links else []

    def validate_engines(self) -> None:
        """Raise ``ConfigError``/``GraphError`` if an engine cannot serve its edge (``mlo.graph_checks``)."""
        checks.engines(self)

    def with_engines(self, replace) -> "Graph":
        """A copy of this graph (same problems) with every edge engine ``e`` replaced by ``replace(e)``."""
        other = copy.copy(self)
        other.engines = {edge: replace(e) for edge, e in self.engines.items()}
        other.default_engines = {q: replace(e) for q, e in self.default_engines.items()}
        other._derive()
        return other

    # ------------------------------------------------------------- helpers
    def owner_index(self, module: nn.Module) -> dict:
        """Map ``module``'s parameter names to (owning problem, key, leaf); cached."""
        key = id(module)
        cached = self._owners.get(key)
        if cached is not None and cached[0] is module:
            return cached[1]
        by_id = {id(t): (n, k, t) for n, p in self.problems.items() for k, t in p.params_tree.items()}
        index = {q: by_id[id(t)] for q, t in module.named_parameters(remove_duplicate=False) if id(t) in by_id}
        self._owners[key] = (module, index)
        return index

    def modules(self) -> list[nn.Module]:
        seen, out = set(), []
        for p in self.problems.values():
            for m in p.modules:
                if id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
        return out

    def __repr__(self) -> str:
        lines = [f"Graph(order={self.order})"]
        for n in self.order:
            p = self.problems[n]
            parts = []
            for r in p.reads:
                kind = "solution" if self.index[r] < self.index[n] else "value"
                eng = f" via {type(self.engines[(n, r)]).__name__}" if n in self.differentiated else ""
                parts.append(f"{r} ({kind}){eng}")
            lines.append(f"  {n} ({p.mode}) reads: {', '.join(parts) or '-'}")
        lines += [f"  not exact for {d.problem}: {d}" for d in self.dropped_paths]
        return "\n".join(lines)
