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
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch import Tensor

from . import nested, rng, rows as rowsmod, updates
from .context import Context
from .direction import Direction
from .engines.base import RunRecord, StepRecord
from .errors import NonFiniteError
from .graph import Graph
from .problem import Problem, SameBatch
from .state import preserve_buffers
from .tree import Tree, all_finite, clone, detach, norm


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
            raise ValueError(f"nan_policy: expected 'raise', 'skip' or 'off', got {nan_policy!r}")
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
        self._sparse = any(p.rows is not None for p in graph.problems.values())
        # reads whose edge engine differentiates through the real step's own gradient graph
        self._keep_graph = {q: [r for r in graph.problems[q].reads if graph.engines[(q, r)].keeps_step_graph]
                            for q in graph.differentiated}

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
        for name in self.graph.order:
            if name in skip:
                continue
            problem = self.graph.problems[name]
            if problem.init_from is not None:   # φ ← θ before the problem runs (Problem.init_from)
                problem.reset_from(self.graph.problems[problem.init_from])
            keep = self.graph.records_needed.get(name, 0)
            recorded = name in self.graph.differentiated
            records: list[StepRecord] = []
            read_values = self._read_values(problem, problem.reads, clone_later=recorded)
            constants = {**self._read_values(problem, problem.constants, clone_later=recorded),
                         **self.held.get(name, {})}
            self.constants_seen[name] = constants
            for k in range(problem.steps):
                batch = self._next_batch(problem, k)
                rmap = rowsmod.batch_rows(self.graph, problem, batch) if self._sparse else {}
                state = rng.capture_torch()
                kept = [r for r in self._keep_graph.get(name, ()) if r not in rmap] if k == problem.steps - 1 \
                    else []
                d = self._direction(problem, batch, constants, keep_adjoints, rmap, kept)
                if name == stop_at:
                    return d
                if recorded:
                    if name in rmap:   # a row-sparse problem: the batch's rows only
                        params, snap, grad = rowsmod.record_parts(problem, rmap[name], d.total, keep)
                    else:
                        params = clone(problem.params_tree) if keep else None
                        snap = (updates.snapshot(problem.torch_optimizer, problem.params_tree, problem.grad_clip)
                                if keep else None)
                        grad = clone(d.total) if keep else None   # clipping below works in place
                    records.append(StepRecord(params, batch, state, snap, grad, rmap, d.kept_graph))
                    del records[:-max(keep, 1)]
                lr = float(problem.torch_optimizer.param_groups[0]["lr"])
                self._apply(problem, d)
                metrics[name] = d.metrics
            if recorded:
                rows, reads, consts = rowsmod.run_rows(problem, records, read_values, constants)
                own = rowsmod.gather(problem.params_tree, rows[name]) if name in rows else detach(problem.params_tree)
                self.runs[name] = RunRecord(name=name, loss=self._aux_loss(problem, consts, rows), reads=reads,
                                            solution=own, lr=lr, records=records, rows=rows,
                                            init_from=problem.init_from,
                                            from_start=len(records) == problem.steps)
        return metrics

    def _next_batch(self, problem: Problem, k: int):
        if self.batch_fn is not None:
            return self.batch_fn(problem, k)
        if isinstance(problem.data, SameBatch):
            return problem.stream.share(self.graph.problems[problem.data.source].stream.last)
        return problem.stream.next()

    def _read_values(self, problem: Problem, names, clone_later: bool) -> dict[str, Tree]:
        """Values of the problems in ``names``; copies of those that will still change."""
        idx = self.graph.index
        out = {}
        for r in names:
            tree = self.graph.problems[r].params_tree
            later = idx[r] > idx[problem.name]
            out[r] = clone(tree) if (clone_later and later) else detach(tree)
        return out

    def _direction(self, problem: Problem, batch, constants: dict[str, Tree], keep_adjoints: bool,
                   rmap: dict | None = None, keep_graph: list[str] = ()) -> Direction:
        """Total gradient of P's signed objective: direct part + hypergradient.

        ``keep_graph`` names reads whose edge engine reuses this step's gradient
        graph: they are bound as leaves, the gradient keeps its graph, and the
        own parameters are bound as copies (the update must not touch that graph).
        """
        plan, rmap = self.graph.plans[problem.name], rmap or {}
        own, constants = rowsmod.bind_step(problem, rmap, constants) if rmap else (problem.params_tree, constants)
        if keep_graph and own is problem.params_tree:
            own = {k: v.detach().clone().requires_grad_(True) for k, v in own.items()}
        values: dict[str, Tree] = {**constants, problem.name: own}
        seeds: dict[str, Tree] = {}
        for r in problem.reads:
            live = self.graph.problems[r].params_tree
            if r in rmap:
                live = rowsmod.gather(live, rmap[r])
            if r in plan.upstream:
                seeds[r] = detach(live, requires_grad=True)
                values[r] = seeds[r]
            elif r in keep_graph:   # a copy: the kept graph must survive later in-place updates of r
                values[r] = {k: v.detach().clone().requires_grad_(True) for k, v in live.items()}
            else:
                values[r] = detach(live)
        ctx = Context(self.graph, problem, values, step=self.step_count, real_step=True, rows=rmap or None)
        objective = problem.objective(ctx, batch)
        if not isinstance(objective, Tensor) or objective.numel() != 1:
            shape = f" of shape {tuple(objective.shape)}" if isinstance(objective, Tensor) else ""
            raise TypeError(f"problem {problem.name!r}: objective must return a scalar tensor, "
                            f"got {type(objective).__name__}{shape}")
        if ctx.undeclared_constants:
            self.undeclared_constants[problem.name].update(ctx.undeclared_constants)
        loss = _signed(problem, objective)
        targets = {("", k): v for k, v in own.items()}
        targets.update({(r, k): v for r, t in seeds.items() for k, v in t.items()})
        keys = list(targets)
        kept = None
        if loss.requires_grad:
            gs = torch.autograd.grad(loss, [targets[k] for k in keys], allow_unused=True, materialize_grads=True,
                                     create_graph=bool(keep_graph))
            if keep_graph:
                kept = ({k: g for (r, k), g in zip(keys, gs) if r == ""}, {r: values[r] for r in keep_graph})
                gs = [g.detach().clone() for g in gs]   # the update clips in place; the kept values must stay
        else:  # the objective does not depend on anything this problem can change
            gs = [torch.zeros_like(targets[k]) for k in keys]
        direct: Tree = {}
        adjoints: dict[str, Tree] = defaultdict(dict)
        for (r, k), g in zip(keys, gs):
            if r == "":
                direct[k] = g
            else:
                adjoints[r][k] = g
        if rmap:
            direct, adjoints = rowsmod.tag(problem.name, direct, adjoints, rmap)
        check = self.nan_policy != "off"
        checks = [("objective", None, torch.isfinite(loss)), ("gradient", None, all_finite(direct))] if check else []
        seen: dict[str, Tree] = {}
        hyper = self._sweep(problem, plan, dict(adjoints), checks, seen if keep_adjoints else None, direct) \
            if plan.sweep else None
        if isinstance(direct, rowsmod.RowTree):
            total = direct if hyper is None else rowsmod.add(rowsmod.add(None, direct), hyper)
        else:
            total = direct if hyper is None else {k: direct[k] + hyper[k] for k in direct}
        if self.reduce_fn is not None:
            if check:   # processes must agree: a local failure poisons the combined update
                ok = torch.stack([f for _, _, f in checks]).all()
                total = rowsmod.like(total, {k: torch.where(ok, v, v.new_full((), float("nan")))
                                             for k, v in total.items()})
            total = self.reduce_fn(problem, total)
            if check:
                checks.append(("update from another process", None, all_finite(total)))
        m = {"loss": objective.detach().reshape(()), "grad_norm": norm(direct)}
        if hyper is not None:
            m["hypergrad_norm"] = norm(hyper)
        m.update(ctx.metrics)
        return Direction(total, direct, hyper, m["loss"], m, seen, checks, kept)

    def _sweep(self, problem: Problem, plan, adjoints: dict[str, Tree], checks, seen, direct: Tree) -> Tree:
        """Reverse accumulation: each edge's VJP once, adjoints summed per problem."""
        hyper = None
        with preserve_buffers(self.graph.modules()):
            for s in plan.sweep:
                u = adjoints.pop(s.problem, None)
                if u is None:
                    continue
                if seen is not None:
                    seen[s.problem] = rowsmod.like(u, detach(u))
                run = self.runs[s.problem]
                if s.problem in run.rows:   # a row-sparse problem's edges see the rows its step updated
                    u = rowsmod.project(u, run.rows[s.problem])
                groups: dict[Any, list[str]] = {}
                for r, eng in s.wrt:
                    groups.setdefault(eng, []).append(r)
                for eng, reads in groups.items():
                    self.vjp_calls[f"{s.problem}->{','.join(reads)}"] += 1
                    site = nested.site(self.graph, self.runs, s.problem) if s.nested and eng.exact_nested else run
                    out = eng.vjp(site, u, reads)
                    for r, contrib in out.items():
                        if r in run.rows:
                            contrib = rowsmod.RowTree(contrib, run.rows[r])
                        if self.nan_policy != "off":
                            checks.append(("hypergradient", f"{s.problem}->{r}", all_finite(contrib)))
                        if r == problem.name:
                            hyper = rowsmod.add(hyper, contrib)
                        else:
                            adjoints[r] = rowsmod.add(adjoints.get(r), contrib)
        if hyper is None:
            hyper = rowsmod.like(direct, {k: torch.zeros_like(v) for k, v in direct.items()})
        return hyper

    def _apply(self, problem: Problem, d: Direction) -> None:
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
        if isinstance(d.total, rowsmod.RowTree):
            rowsmod.step(problem, d.total)     # the rows the direction names, scattered into the table
        else:
            for k, p in problem.params_tree.items():
                p.grad = d.total[k].detach()
            if problem.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(problem.params_tree.values()), problem.grad_clip)
            problem.torch_optimizer.step()
            for p in problem.params_tree.values():   # = zero_grad(set_to_none=True): it holds exactly these
                p.grad = None
        problem.run_after_step()   # Problem.after_step: a projection or clamp, not differentiated
        if problem.torch_scheduler is not None:
            problem.torch_scheduler.step()

    def _aux_loss(self, problem: Problem, constants: dict[str, Tree], rows: dict | None = None):
        graph, step = self.graph, self.step_count

        def loss(params: Tree, reads: dict[str, Tree], record: StepRecord, shared=None) -> Tensor:
            ctx = Context(graph, problem, {**constants, problem.name: params, **reads}, step=step,
                          real_step=False, shared=shared, rows=rows or None)
            with rng.replay(record.rng):
                return _signed(problem, problem.objective(ctx, record.batch))
        return loss


def _signed(problem: Problem, objective: Tensor) -> Tensor:
    """The objective as a 0-d tensor, negated for a ``max`` problem (no op for a ``min`` one)."""
    value = objective if objective.dim() == 0 else objective.reshape(())
    return value if problem.sign == 1.0 else -value
