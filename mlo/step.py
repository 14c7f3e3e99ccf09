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
Problems whose solutions later problems differentiate leave a ``Site`` behind.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor

from . import rng, updates
from .context import Context
from .engines.base import Site, StepRecord
from .errors import NonFiniteError
from .graph import Graph
from .problem import Problem
from .tree import Tree, add_, all_finite, clone, detach, norm


@contextlib.contextmanager
def preserve_buffers(modules):
    """Restore every buffer (BatchNorm statistics, ...) of ``modules`` on exit."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


class Stepper:
    """Runs outer steps of a ``Graph``; holds the counters a run needs.

    ``nan_policy``: ``"raise"`` (default) stops with ``NonFiniteError`` naming the
    problem and edge before any parameter is touched; ``"skip"`` skips that
    problem's update and counts it in ``skipped``; ``"off"`` checks nothing (no
    host synchronisation at all).
    ``batch_fn(problem, k)`` overrides where batches come from (tests, checks).
    ``reduce_fn(problem, tree)`` post-processes each update direction (e.g. an
    all-reduce for data parallelism). With a ``reduce_fn`` and a NaN check, a
    direction that fails the local check is replaced by NaN before the reduction,
    so every process sees the failure and raises or skips at the same update.
    """

    def __init__(self, graph: Graph, nan_policy: str = "raise",
                 batch_fn: Callable[[Problem, int], Any] | None = None,
                 reduce_fn: Callable[[Problem, Tree], Tree] | None = None):
        if nan_policy not in ("raise", "skip", "off"):
            raise ValueError(f"nan_policy: expected 'raise', 'skip' or 'off', got {nan_policy!r}")
        self.graph = graph
        self.nan_policy = nan_policy
        self.batch_fn = batch_fn
        self.reduce_fn = reduce_fn
        self.step_count = 0
        self.skipped: dict[str, int] = defaultdict(int)
        self.vjp_calls: dict[str, int] = defaultdict(int)
        self.sites: dict[str, Site] = {}

    # ---------------------------------------------------------------- public
    def step(self, stop_before: str | None = None, skip: frozenset[str] | set[str] = frozenset()
             ) -> dict[str, dict[str, Tensor]]:
        """One outer step. Returns per-problem metrics (device tensors, no sync).

        Problems named in ``skip`` do not run this step (e.g. architecture
        warm-up: train the weights only for the first epochs).

        With ``stop_before=P`` the step stops after computing P's first update
        direction, without applying it; the direction is in the metrics under
        ``"_direction"`` / ``"_direct"`` / ``"_hyper"``.
        """
        self.sites = {}
        metrics: dict[str, dict[str, Tensor]] = {}
        for name in self.graph.order:
            if name in skip:
                continue
            problem = self.graph.problems[name]
            keep = self.graph.records_needed.get(name, 0)
            traced = name in self.graph.traced
            records: list[StepRecord] = []
            read_values = self._read_values(problem, clone_later=traced)
            for k in range(problem.steps):
                batch = self.batch_fn(problem, k) if self.batch_fn else problem.stream.next()
                state = rng.capture_torch()
                direction, direct, hyper, m = self._direction(problem, batch, state)
                if name == stop_before:
                    m.pop("_flags")
                    m.update(_direction=direction, _direct=direct, _hyper=hyper)
                    metrics[name] = m
                    return metrics
                if traced:
                    params = clone(problem.params_tree) if keep else None
                    snap = (updates.snapshot(problem.optimizer, problem.params_tree, problem.grad_clip)
                            if keep else None)
                    grad = clone(direction) if keep else None   # clipping below works in place
                    records.append(StepRecord(params, batch, state, snap, grad))
                    del records[:-max(keep, 1)]
                lr = float(problem.optimizer.param_groups[0]["lr"])
                self._apply(problem, direction, m)
                metrics[name] = m
            if traced:
                self.sites[name] = Site(name=name, loss=self._aux_loss(problem), reads=read_values,
                                        solution=detach(problem.params_tree),
                                        lr=lr, records=records)
        self.step_count += 1
        return metrics

    # ---------------------------------------------------------------- parts
    def _read_values(self, problem: Problem, clone_later: bool) -> dict[str, Tree]:
        """Values of the problems ``problem`` reads; copies of those that will still change."""
        idx = self.graph.index
        out = {}
        for r in problem.reads:
            tree = self.graph.problems[r].params_tree
            later = idx[r] > idx[problem.name]
            out[r] = clone(tree) if (clone_later and later) else detach(tree)
        return out

    def _direction(self, problem: Problem, batch, state):
        """Total gradient of P's signed objective: direct part + hypergradient."""
        plan = self.graph.plans[problem.name]
        values: dict[str, Tree] = {problem.name: problem.params_tree}
        seeds: dict[str, Tree] = {}
        for r in problem.reads:
            live = self.graph.problems[r].params_tree
            if r in plan.upstream:
                seeds[r] = detach(live, requires_grad=True)
                values[r] = seeds[r]
            else:
                values[r] = detach(live)
        ctx = Context(self.graph, problem, values, step=self.step_count, primary=True)
        objective = problem.objective(ctx, batch)
        if not isinstance(objective, Tensor) or objective.numel() != 1:
            raise TypeError(f"problem {problem.name!r}: objective must return a scalar tensor, "
                            f"got {type(objective).__name__}")
        loss = problem.sign * objective.reshape(())
        targets = {("", k): v for k, v in problem.params_tree.items()}
        targets.update({(r, k): v for r, t in seeds.items() for k, v in t.items()})
        keys = list(targets)
        if loss.requires_grad:
            gs = torch.autograd.grad(loss, [targets[k] for k in keys], allow_unused=True, materialize_grads=True)
        else:  # the objective does not depend on anything this problem can change
            gs = [torch.zeros_like(targets[k]) for k in keys]
        direct: Tree = {}
        adjoints: dict[str, Tree] = defaultdict(dict)
        for (r, k), g in zip(keys, gs):
            if r == "":
                direct[k] = g
            else:
                adjoints[r][k] = g
        check = self.nan_policy != "off"
        flags = [("objective", None, torch.isfinite(loss)), ("gradient", None, all_finite(direct))] if check else []
        hyper = self._sweep(problem, plan, dict(adjoints), flags) if plan.sweep else None
        total = direct if hyper is None else {k: direct[k] + hyper[k] for k in direct}
        if self.reduce_fn is not None:
            if self.nan_policy != "off":   # processes must agree: a local failure poisons the combined update
                ok = torch.stack([f for _, _, f in flags]).all()
                total = {k: torch.where(ok, v, v.new_full((), float("nan"))) for k, v in total.items()}
            total = self.reduce_fn(problem, total)
            if self.nan_policy != "off":
                flags.append(("update from another process", None, all_finite(total)))
        m = {"loss": objective.detach().reshape(()), "grad_norm": norm(direct)}
        if hyper is not None:
            m["hypergrad_norm"] = norm(hyper)
        m.update(ctx.metrics)
        m["_flags"] = flags
        return total, direct, hyper, m

    def _sweep(self, problem: Problem, plan, adjoints: dict[str, Tree], flags) -> Tree:
        """Reverse accumulation: each edge's VJP once, adjoints summed per problem."""
        hyper = None
        with preserve_buffers(self.graph.modules()):
            for s in plan.sweep:
                u = adjoints.pop(s.problem, None)
                if u is None:
                    continue
                site = self.sites[s.problem]
                groups: dict[Any, list[str]] = {}
                for r, eng in s.wrt:
                    groups.setdefault(eng, []).append(r)
                for eng, reads in groups.items():
                    self.vjp_calls[f"{s.problem}->{','.join(reads)}"] += 1
                    out = eng.vjp(site, u, reads)
                    for r, contrib in out.items():
                        if self.nan_policy != "off":
                            flags.append(("hypergradient", f"{s.problem}->{r}", all_finite(contrib)))
                        if r == problem.name:
                            hyper = add_(hyper, contrib)
                        else:
                            adjoints[r] = add_(adjoints.get(r), contrib)
        if hyper is None:
            hyper = {k: torch.zeros_like(v) for k, v in problem.params_tree.items()}
        return hyper

    def _apply(self, problem: Problem, direction: Tree, m: dict) -> None:
        flags = m.pop("_flags")
        if self.nan_policy != "off":
            ok = torch.stack([f for _, _, f in flags]).all()
            if not bool(ok):
                what, edge, _ = next(f for f in flags if not bool(f[2]))
                if self.nan_policy == "raise":
                    at = f" (edge {edge})" if edge else ""
                    raise NonFiniteError(f"non-finite {what} in problem {problem.name!r}{at} at outer step "
                                         f"{self.step_count}; no parameter was updated", problem.name, edge,
                                         self.step_count)
                self.skipped[problem.name] += 1
                return
        for k, p in problem.params_tree.items():
            p.grad = direction[k].detach()
        if problem.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(problem.params_tree.values()), problem.grad_clip)
        problem.optimizer.step()
        problem.optimizer.zero_grad(set_to_none=True)
        if problem.scheduler_obj is not None:
            problem.scheduler_obj.step()

    def _aux_loss(self, problem: Problem):
        graph, step = self.graph, self.step_count

        def loss(params: Tree, reads: dict[str, Tree], record: StepRecord, shared=None) -> Tensor:
            ctx = Context(graph, problem, {problem.name: params, **reads}, step=step, primary=False,
                          shared=shared)
            with rng.replay(record.rng):
                return problem.sign * problem.objective(ctx, record.batch).reshape(())
        return loss
