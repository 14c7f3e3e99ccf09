"""One outer step: run problems in order, reverse-accumulate hypergradients, update.

For each problem P in the graph's order, for each of its ``steps``:
  1. evaluate P's objective at the live values (reads earlier in the order are
     already updated);
  2. take the gradient w.r.t. P's parameters and w.r.t. the updated solutions of
     the problems that depend on P this step (the adjoint seeds);
  3. sweep back through those problems in reverse order, one engine VJP per
     edge, summing adjoints where paths meet; what reaches P is its
     hypergradient;
  4. hand gradient + hypergradient to P's optimizer.
Problems whose solutions later problems differentiate leave a ``RunRecord`` behind.
``Stepper.direction(P)`` stops at step 4 and returns P's ``Direction`` unapplied.
The parameter side of each move is a ``mlo.binding.Binding``; moves 2-3 are
``mlo.sweep``; what can be decided once per graph is a ``mlo.stepplan.StepPlan``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor

from . import rng, rows as rowsmod, stepplan
from .binding import Binding, read_values_of
from .context import Context
from .direction import Direction
from .engines.base import RunRecord, StepRecord
from .errors import ConfigError, InputTypeError, NonFiniteError
from .graph import Graph
from .problem import Problem, SameBatch
from .sweep import record_loss, seeds, signed, sweep, total
from .tree import Tree, all_finite, norm


class Stepper:
    """Runs outer steps of a ``Graph``; holds the counters a run needs.

    ``nan_policy``: ``"raise"`` (default) stops with ``NonFiniteError`` naming the
    problem and edge before any parameter is touched; ``"skip"`` skips that
    problem's update and counts it (``skip_counts``); ``"off"`` checks nothing (no
    host synchronisation at all).
    ``batch_fn(problem, k)`` overrides where batches come from (tests, checks).
    ``reduce_fn(problem, tree)`` post-processes each update direction (e.g. an
    all-reduce for data parallelism). With a ``reduce_fn`` and a NaN check, a
    direction that fails the local check is replaced by NaN before the reduction,
    so every process sees the failure and raises or skips at the same update.
    ``held`` maps a problem to ``{constant: values}``: what its objective sees for
    the problems it declares in ``Problem.constants`` instead of their live values
    (the checker holds them there); ``constants_seen`` records, per problem, the
    values the last step used.
    """

    def __init__(self, graph: Graph, nan_policy: str = "raise",
                 batch_fn: Callable[[Problem, int], Any] | None = None,
                 reduce_fn: Callable[[Problem, Tree], Tree] | None = None,
                 held: dict[str, dict[str, Tree]] | None = None):
        if nan_policy not in ("raise", "skip", "off"):
            raise ConfigError(f"nan_policy: expected 'raise', 'skip' or 'off', got {nan_policy!r}")
        self.graph = graph
        self.nan_policy = nan_policy
        self.batch_fn = batch_fn
        self.reduce_fn = reduce_fn
        self.held = dict(held or {})
        self.step_count = 0
        self.skipped: dict[str, int] = defaultdict(int)
        self.vjp_calls: dict[str, int] = defaultdict(int)
        self.runs: dict[str, RunRecord] = {}
        self.constants_seen: dict[str, dict[str, Tree]] = {}
        self.undeclared_constants: dict[str, set[str]] = defaultdict(set)
        self._plan = stepplan.compile(graph)   # compiled again if the graph is re-planned

    # ---------------------------------------------------------------- public
    @property
    def skip_counts(self) -> dict[str, int]:
        """Updates skipped per problem under ``nan_policy="skip"`` (a copy)."""
        return {k: v for k, v in self.skipped.items() if v}

    def step(self, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, dict[str, Tensor]]:
        """One outer step. Returns per-problem metrics (device tensors, no sync).

        Problems named in ``skip`` do not run this step (e.g. architecture
        warm-up: train the weights only for the first epochs).
        """
        metrics = self._run(skip)
        self.step_count += 1
        return metrics

    def direction(self, name: str, adjoints: bool = False) -> Direction:
        """Run the problems before ``name`` as in a real step, then return ``name``'s first
        update direction without applying it (``adjoints=True`` keeps the sweep's adjoints)."""
        if name not in self.graph.problems:
            raise self.graph._unknown(name, "Stepper.direction")
        return self._run(frozenset(), stop_at=name, keep_adjoints=adjoints)

    # ---------------------------------------------------------------- parts
    def _run(self, skip, stop_at: str | None = None, keep_adjoints: bool = False):
        self.runs = {}
        metrics: dict[str, dict[str, Tensor]] = {}
        if self._plan.source is not self.graph.plans:
            self._plan = stepplan.compile(self.graph)
        sparse = self._plan.sparse
        for name in self.graph.order:
            if name in skip:
                continue
            problem, plan = self.graph.problems[name], self._plan.problems[name]
            if problem.init_from is not None:   # φ ← θ before the problem runs (Problem.init_from)
                problem.reset_from(self.graph.problems[problem.init_from])
            keep, recorded = plan.keep, plan.recorded
            records: list[StepRecord] = []
            read_values = read_values_of(self.graph, problem, problem.reads, copy_later=recorded) \
                if recorded else None
            constants = read_values_of(self.graph, problem, problem.constants, copy_later=recorded) \
                if problem.constants else {}
            if name in self.held:
                constants = {**constants, **self.held[name]}
            self.constants_seen[name] = constants
            for k in range(problem.steps):
                batch = self._next_batch(problem, k)
                binding = Binding.of(self.graph, problem, batch, sparse)
                state = rng.capture_torch() if recorded else None   # replayed by the engines
                last_k = k >= problem.steps - plan.kept_steps   # the steps whose gradient graph an edge reuses
                kept = binding.keeps(plan.kept_reads) if last_k and plan.kept_reads else []
                d = self._direction(binding, plan, batch, constants, keep_adjoints, kept)
                if name == stop_at:
                    return d
                if recorded:
                    params, snap, grad = binding.record(d.total, keep)
                    records.append(StepRecord(params, batch, state, snap, grad, binding.rows, d.step_graph))
                    del records[:-max(keep, 1)]
                    lr = float(problem.torch_optimizer.param_groups[0]["lr"])
                self._apply(binding, d)
                metrics[name] = d.metrics
            if recorded:
                rows, reads, consts, own = rowsmod.run_rows(problem, records, read_values, constants)
                loss = record_loss(self.graph, problem, consts, rows, self.step_count)
                self.runs[name] = RunRecord(name, loss, reads, own, lr, records, rows, problem.init_from,
                                            from_start=len(records) == problem.steps)
        return metrics

    def _next_batch(self, problem: Problem, k: int):
        if self.batch_fn is not None:
            return self.batch_fn(problem, k)
        if isinstance(problem.data, SameBatch):
            return problem.stream.share(self.graph.problems[problem.data.source].stream.last)
        return problem.stream.next()

    def _direction(self, binding: Binding, plan: stepplan.ProblemPlan, batch, constants: dict[str, Tree],
                   keep_adjoints: bool, kept: list[str]) -> Direction:
        """Total gradient of P's signed objective: direct part + hypergradient.

        ``kept`` names reads whose edge reuses this step's gradient graph: the gradient
        keeps its graph (``Direction.step_graph``) and the update works on copies.
        """
        problem = binding.problem
        own, values, leaves = binding.bind(self.graph, constants, plan.seeds, kept)
        ctx = Context(self.graph, problem, values, step=self.step_count, real_step=True, rows=binding.rows or None)
        objective = problem.objective(ctx, batch)
        if not isinstance(objective, Tensor) or objective.numel() != 1:
            shape = f" of shape {tuple(objective.shape)}" if isinstance(objective, Tensor) else ""
            raise InputTypeError(f"problem {problem.name!r}: objective must return a scalar tensor, "
                                 f"got {type(objective).__name__}{shape}")
        if ctx.undeclared_constants:
            self.undeclared_constants[problem.name].update(ctx.undeclared_constants)
        loss = signed(problem, objective)
        direct, adjoints, step_graph = seeds(loss, own, leaves, {r: values[r] for r in kept})
        direct, adjoints = binding.tag(direct, adjoints)
        check = self.nan_policy != "off"
        checks = [("objective", None, torch.isfinite(loss)), ("gradient", None, all_finite(direct))] if check else []
        seen: dict[str, Tree] = {}
        hyper = sweep(self, problem, plan.sweep, adjoints, checks, seen if keep_adjoints else None, direct) \
            if plan.sweep else None
        total_ = total(problem, direct, hyper, checks, self.reduce_fn, check)
        m = {"loss": objective.detach().reshape(()), "grad_norm": norm(direct)}
        if hyper is not None:
            m["hypergrad_norm"] = norm(hyper)
        m.update(ctx.metrics)
        return Direction(total_, direct, hyper, m["loss"], m, seen, checks, step_graph)

    def _apply(self, binding: Binding, d: Direction) -> None:
        problem = binding.problem
        if self.nan_policy != "off":
            ok = torch.stack([f for _, _, f in d.checks]).all()
            if not bool(ok):
                what, edge, _ = next(f for f in d.checks if not bool(f[2]))
                if self.nan_policy == "raise":
                    at = f" (edge {edge})" if edge else ""
                    raise NonFiniteError(f"non-finite {what} in problem {problem.name!r}{at} at outer step "
                                         f"{self.step_count}; no parameter was updated", problem.name, edge,
                                         self.step_count)
                self.skipped[problem.name] += 1
                return
        binding.apply(d.total)
        problem.run_after_step()   # Problem.after_step: a projection or clamp, not differentiated
        if problem.torch_scheduler is not None:
            problem.torch_scheduler.step()
