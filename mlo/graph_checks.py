"""What ``Graph`` checks before it plans: the problems' names, order and references
(``problems``), and that each engine can serve its edge (``engines``, ``init_path``)."""
from __future__ import annotations

from .engines import Engine, FiniteDifference
from .errors import GraphError
from .problem import Problem, SameBatch


def init_path(engine: Engine) -> str | None:
    """How ``engine`` differentiates a start value reset from the read (``Problem.init_from``).

    An engine says so with an ``init_path`` attribute: ``"exact"`` (``Unrolled``:
    through the steps from the reset), ``"identity"`` (``FOMAML``). Any other
    engine takes the start value as a constant (``"ignored"``; right for the
    implicit engines, whose answer does not depend on where the run started),
    except ``FiniteDifference``, which cannot differentiate it and is refused (None).
    """
    path = getattr(engine, "init_path", None)
    if path is None and not isinstance(engine, FiniteDifference):
        return "ignored"
    return path


def problems(graph) -> None:
    """Names, order, reads, constants, ``SameBatch`` sources and ``init_from`` of every problem."""
    for n in graph.order:
        if n not in graph.problems:
            raise graph._unknown(n, "Graph order")
    missing = [n for n in graph.problems if n not in graph.order]
    if missing or len(graph.order) != len(set(graph.order)):
        raise GraphError(f"Graph order must list every problem exactly once; got {graph.order}, "
                         f"problems {list(graph.problems)}")
    for p in graph.problems.values():
        for r in p.reads:
            if r not in graph.problems:
                raise graph._unknown(r, f"problem {p.name!r} reads")
            if r == p.name:
                raise GraphError(f"problem {p.name!r} reads itself; its own parameters are always in scope")
        if isinstance(p.data, SameBatch):
            src = p.data.source
            if src not in graph.problems:
                raise graph._unknown(src, f"problem {p.name!r} data=SameBatch")
            if graph.order.index(src) >= graph.order.index(p.name):
                raise GraphError(f"problem {p.name!r} uses SameBatch({src!r}), but {src!r} does not run "
                                 "before it in the order, so it has no batch to share yet")
        for c in p.constants:
            if c not in graph.problems:
                raise graph._unknown(c, f"problem {p.name!r} constants")
            if c == p.name:
                raise GraphError(f"problem {p.name!r} names itself in constants; its own parameters are "
                                 "what it optimizes")
        if p.init_from is not None:
            _init(graph, p)
        for r in p.edge_engines:
            if r not in p.reads:
                raise GraphError(f"problem {p.name!r}: edge_engines names {r!r}, which it does not read")
    if len(graph.problems) > 1:
        read = {r for p in graph.problems.values() for r in p.reads}
        unread = [n for n in graph.order if n not in read and n not in graph.allow_unread]
        if unread:
            raise GraphError(f"problem(s) {', '.join(map(repr, unread))} are read by no objective: "
                             "they do not influence any other problem; add them to some Problem.reads, "
                             "run them separately, or name them in Graph(allow_unread=...)")

def _init(graph, p: Problem) -> None:
    """``Problem.init_from``: the source exists and has the same parameter names, shapes and dtypes."""
    src = graph.problems.get(p.init_from)
    if src is None:
        raise graph._unknown(p.init_from, f"problem {p.name!r} init_from")
    mine, theirs = p.params_tree, src.params_tree
    if set(mine) != set(theirs):
        diff = sorted(set(mine) ^ set(theirs))
        raise GraphError(f"problem {p.name!r} init_from={src.name!r}: the parameter names differ "
                         f"({', '.join(map(repr, diff[:5]))}{' ...' if len(diff) > 5 else ''})")
    for k, t in mine.items():
        o = theirs[k]
        shape = o.shape if p.tasks is None or t.shape == o.shape else (p.tasks, *o.shape)
        if t.shape != shape or t.dtype != o.dtype:
            raise GraphError(f"problem {p.name!r} init_from={src.name!r}: parameter {k!r} is "
                             f"{tuple(t.shape)} {t.dtype} here, {tuple(o.shape)} {o.dtype} in {src.name!r}")


def engines(graph) -> None:
    """Every engine can serve its edge: ``validate_for`` and ``init_from`` (``Graph.validate_engines``)."""
    for (q, r), eng in graph.engines.items():
        if q in graph.differentiated:
            eng.validate_for(graph.problems[q], f"problem {q!r}, edge {q}->{r}")
            if r == graph.problems[q].init_from and eng.passes_adjoint and init_path(eng) is None:
                raise GraphError(f"problem {q!r}, edge {q}->{r}: {type(eng).__name__} cannot differentiate "
                                 f"a start value reset from {r!r} (init_from); use Unrolled (exact), "
                                 "FOMAML (identity), an implicit engine (CG, Neumann: the start does not "
                                 "matter) or FirstOrder")
    for plan in graph.plans.values():    # engines serving a hypergradient's inputs (mlo.nested)
        for s in plan.sweep:
            for r, eng in s.wrt:
                if r not in graph.problems[s.problem].reads:
                    eng.validate_for(graph.problems[s.problem], f"problem {s.problem!r} (its hypergradient's "
                                     f"dependence on {r!r})")
