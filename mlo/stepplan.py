"""A step plan: what a ``Stepper`` decides once per graph instead of at every step.

For each problem: how many step records to keep, whether its runs are recorded at
all, which reads are adjoint seeds, which reads a kept step graph holds
(``Unrolled(reuse_step_graph=True)`` edges, and for how many of the last steps: the
Stepper's decision, not the engine's), and its reverse sweep as a list of engine calls — one per problem of
the sweep and engine, with the reads it serves, whether it differentiates a
nested hypergradient (``mlo.nested``) and the name it is counted under in
``Stepper.vjp_calls``. ``compile(graph)`` builds it from ``graph.plans``; a
``Stepper`` compiles again when the graph has been re-planned.
"""
from __future__ import annotations

from dataclasses import dataclass

from .engines.base import Engine


@dataclass(frozen=True)
class EdgeCall:
    """One engine VJP of a sweep: ``engine.vjp(site, u, reads)``."""

    engine: Engine
    reads: list[str]
    label: str          # "Q->R1,R2": the key in Stepper.vjp_calls
    nested: bool        # the site is mlo.nested's (Q's update includes a hypergradient)


@dataclass(frozen=True)
class SweepCall:
    """The engine calls that propagate the adjoint at ``problem``'s solution."""

    problem: str
    calls: tuple[EdgeCall, ...]


@dataclass(frozen=True)
class ProblemPlan:
    """What a real step of one problem does beyond evaluating its objective."""

    keep: int                       # step records kept for the engines (0: only the last, without copies)
    recorded: bool                  # a later sweep differentiates this problem's solution
    seeds: frozenset[str]           # reads whose updated solution depends on this problem (adjoint seeds)
    kept_reads: tuple[str, ...]     # reads whose edge is Unrolled(reuse_step_graph=True)
    sweep: tuple[SweepCall, ...]    # the reverse sweep that brings back this problem's hypergradient
    kept_steps: int = 1             # how many of the run's last steps keep their gradient graph


@dataclass(frozen=True)
class StepPlan:
    """``problems``: a ``ProblemPlan`` per problem; ``source``: the ``graph.plans`` it was made from."""

    source: dict
    problems: dict[str, ProblemPlan]
    modules: list                   # the graph's modules (their buffers are restored after each sweep)
    sparse: bool                    # some problem is row-sparse


def compile(graph) -> StepPlan:
    """The step plan of ``graph`` (see the module docstring)."""
    problems = {}
    for name in graph.order:
        plan = graph.plans[name]
        sweep = []
        for s in plan.sweep:
            groups: dict[Engine, list[str]] = {}
            for r, eng in s.wrt:
                groups.setdefault(eng, []).append(r)
            sweep.append(SweepCall(s.problem, tuple(
                EdgeCall(eng, reads, f"{s.problem}->{','.join(reads)}", bool(s.nested and eng.exact_nested))
                for eng, reads in groups.items())))
        recorded = name in graph.differentiated
        kept = tuple(r for r in graph.problems[name].reads
                     if recorded and getattr(graph.engines[(name, r)], "reuse_step_graph", False))
        steps = max([graph.engines[(name, r)].steps for r in kept], default=1)
        problems[name] = ProblemPlan(graph.records_needed.get(name, 0), recorded, frozenset(plan.upstream), kept,
                                     tuple(sweep), steps)
    return StepPlan(graph.plans, problems, graph.modules(), any(p.rows is not None for p in graph.problems.values()))
