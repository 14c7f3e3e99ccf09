"""Hypergradients on demand, and a checker that says what it compares them with.

``hypergradient(graph, name)`` runs the problems before ``name`` as in a real
step, computes ``name``'s update direction with the configured engines, and
puts every parameter, optimizer state, buffer and the global random generators
back (it draws the batches it is not given from the problems' data).

``check_hypergradient`` compares it with the *target* of the engines on the way:

* engines that differentiate the steps themselves (``Unrolled``,
  ``FiniteDifference``): a float64 central difference of the unrolled
  composition ``θ ↦ objective_P(after the earlier problems step with P = θ)``,
  with every problem's declared ``constants`` held at their unperturbed values.
  A ``FiniteDifference`` engine is an approximation whose error depends on its
  radius, so the verdict is on its limit: it runs with its radius shrunk to the
  checker's ``eps``; its error at the configured radius is measured too and
  reported (``CheckReport.configured_error``) — how much the approximation
  costs, not a bug;
* implicit engines (``CG``, ``Neumann``), which assume the lower problem is
  solved: the implicit-function-theorem hypergradient, each implicit edge
  solved exactly with a dense Hessian (``DenseImplicit``); too large a lower
  problem raises ``ConfigError`` saying the check cannot be done.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

from . import rng, rows
from .engines import DenseImplicit, FiniteDifference, Unrolled
from .errors import ConfigError
from .graph import Graph
from .problem import SameBatch
from .state import graph_state_dict, load_graph_state_dict, preserve_buffers
from .step import Stepper
from .tree import clone

COMPOSITION = "a central difference of the unrolled composition"
IMPLICIT = "the implicit-function-theorem hypergradient (implicit edges solved with a dense Hessian)"


def _fixed_batches(graph: Graph, name: str, batches: dict | None) -> dict:
    """One list of batches per problem up to ``name`` (drawn once if not given)."""
    out = {}
    for q in graph.order[: graph.index[name] + 1]:
        p = graph.problems[q]
        if batches is not None and q in batches:
            out[q] = [batches[q]] * p.steps
        elif isinstance(p.data, SameBatch):
            out[q] = [out[p.data.source][-1]] * p.steps
        else:
            out[q] = [p.stream.next() for _ in range(p.steps)]
    return out


def hypergradient(graph: Graph, name: str, batches: dict | None = None,
                  return_adjoints: bool = False) -> dict:
    """``{"total", "direct", "hyper"}``: d(objective of ``name``)/d(its parameters).

    Signs are those of the objective itself (for a max problem, the ascent
    direction). ``batches`` maps problem names to a batch (used for each of that
    problem's steps); missing ones are drawn from the problems' data once.
    ``return_adjoints=True`` adds ``"adjoints"``: for every problem Q of the
    reverse sweep, d(objective of ``name``)/d(Q's solution) — what reached Q.
    """
    with rng.preserved():
        fixed = _fixed_batches(graph, name, batches)
        out = _hypergradient(graph, name, fixed, return_adjoints)
    return {k: v for k, v in out.items() if k in ("total", "direct", "hyper", "adjoints")}


def _hypergradient(graph: Graph, name: str, fixed: dict, adjoints: bool = False, held=None) -> dict:
    saved = graph_state_dict(graph)
    try:
        stepper = Stepper(graph, nan_policy="off", batch_fn=lambda p, k: fixed[p.name][k], held=held)
        with preserve_buffers(graph.modules()):
            d = stepper.direction(name, adjoints=adjoints)
        full = lambda q, t: rows.dense(t, graph.problems[q].params_tree)  # noqa: E731  (row-sparse: whole tables)
        direct = full(name, d.direct)
        hyper = full(name, d.hyper) if d.hyper is not None else {k: torch.zeros_like(v) for k, v in direct.items()}
        s = graph.problems[name].sign
        out = {k: {kk: s * vv.detach() for kk, vv in t.items()}
               for k, t in (("total", full(name, d.total)), ("direct", direct), ("hyper", hyper))}
        if adjoints:
            out["adjoints"] = {q: {k: s * v for k, v in full(q, t).items()} for q, t in d.adjoints.items()}
        out["undeclared"] = {q: set(c) for q, c in stepper.undeclared_constants.items()}
        out["constants"] = {q: {c: clone(t) for c, t in cs.items()} for q, cs in stepper.constants_seen.items()}
        return out
    finally:
        load_graph_state_dict(graph, saved, data=False, rng_state=True)


@dataclass
class CheckReport:
    """Engine hypergradient vs its reference, along ``directions`` unit vectors."""

    engine: torch.Tensor       # directional derivatives from the engine
    numeric: torch.Tensor      # the same from the reference
    rel_error: float           # ‖engine − numeric‖ / max(‖numeric‖, tiny)
    tol: float
    reference: str = COMPOSITION               # what ``numeric`` is
    notes: list[str] = field(default_factory=list)   # what may explain a disagreement
    # finite-difference engines: the relative error at their configured radius (the verdict is at ``eps``)
    configured_error: float | None = None

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tol

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        lines = [f"{verdict}: relative error {self.rel_error:.3e} (tolerance {self.tol:.1e}) over "
                 f"{self.engine.numel()} direction(s), against {self.reference}"]
        if self.configured_error is not None:
            lines.append(f"  finite-difference engines checked at the checker's radius; at their configured radius "
                         f"the relative error is {self.configured_error:.3e} (the approximation, not a bug)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def check_hypergradient(graph: Graph, name: str, batches: dict | None = None, eps: float = 1e-5,
                        directions: int | None = None, tol: float = 1e-6, seed: int = 0,
                        allow_low_precision: bool = False) -> CheckReport:
    """Compare ``hypergradient(graph, name)["total"]`` with the engines' target (module docstring).

    Parameters are perturbed along every coordinate when there are at most 64,
    else along ``directions`` (default 8) random unit vectors. Needs float64
    parameters: otherwise raises ``ConfigError``, or with
    ``allow_low_precision=True`` warns (rounding then dominates). Nothing in the
    graph changes, nor the global random generators.
    """
    problem = graph.problems[name]
    low = sorted({str(t.dtype) for p in graph.problems.values() for t in p.params_tree.values()
                  if t.dtype != torch.float64})
    if low:
        msg = (f"check_hypergradient: parameters in {', '.join(low)}, not float64; a difference check in "
               "lower precision is dominated by rounding (convert the problems' parameters with .double())")
        if not allow_low_precision:
            raise ConfigError(msg + "; pass allow_low_precision=True to run it anyway")
        warnings.warn("LOW PRECISION: " + msg, stacklevel=2)
    configured = graph
    fd = any(isinstance(e, FiniteDifference) and e.eps > eps for e in graph.engines.values())
    if fd:      # the verdict is on the finite differences' limit: shrink their radius to the checker's step
        graph = graph.with_engines(
            lambda e: dataclasses.replace(e, eps=eps) if isinstance(e, FiniteDifference) and e.eps > eps else e)
    with rng.preserved():
        fixed = _fixed_batches(graph, name, batches)
        got = _hypergradient(graph, name, fixed)
        keys = list(problem.params_tree)
        sizes = [problem.params_tree[k].numel() for k in keys]
        ref = problem.params_tree[keys[0]]
        n = sum(sizes)
        if directions is None and n <= 64:
            dirs = torch.eye(n, dtype=ref.dtype)
        else:
            gen = torch.Generator().manual_seed(seed)
            dirs = torch.randn(directions or 8, n, generator=gen, dtype=torch.float64).to(ref.dtype)
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
        engine = dirs @ torch.cat([got["total"][k].reshape(-1) for k in keys]).to(dirs.device)
        edges = [(s.problem, r, e) for s in graph.plans[name].sweep for r, e in s.wrt]
        notes = _notes(graph, name, edges, got["undeclared"])
        if any(isinstance(e.reference(), DenseImplicit) for _, _, e in edges):
            reference = IMPLICIT
            other = graph.with_engines(lambda e: e.reference())
            try:
                target = _hypergradient(other, name, fixed)["total"]
            except ConfigError as e:
                raise ConfigError(f"check_hypergradient cannot check {name!r}: the implicit engines' target "
                                  f"needs a dense Hessian ({e}); check a smaller instance, or use Unrolled") from None
            numeric = dirs @ torch.cat([target[k].reshape(-1) for k in keys]).to(dirs.device)
        else:
            reference = COMPOSITION
            numeric = _central_difference(graph, name, fixed, dirs, keys, sizes, eps, got["constants"])
        configured_error = None
        if fd and reference == COMPOSITION:
            as_set = _hypergradient(configured, name, fixed)["total"]
            at_radius = dirs @ torch.cat([as_set[k].reshape(-1) for k in keys]).to(dirs.device)
            configured_error = _relative(at_radius, numeric)
    return CheckReport(engine.detach(), numeric.detach(), _relative(engine, numeric), tol, reference, notes,
                       configured_error)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _notes(graph: Graph, name: str, edges, undeclared: dict) -> list[str]:
    """Known reasons why an engine and its reference may differ."""
    notes = []
    for q, used in undeclared.items():
        if name in used:
            notes.append(f"problem {q!r} uses the parameters of {name!r} as constants without declaring them "
                         f"(Problem.constants): the central difference moves them, the engines do not")
    for q, r, e in edges:
        steps = graph.problems[q].steps
        if isinstance(e, Unrolled) and e.steps < steps:
            notes.append(f"edge {q}->{r}: Unrolled(steps={e.steps}) differentiates only the last {e.steps} of "
                         f"the {steps} steps problem {q!r} takes")
        elif isinstance(e.reference(), DenseImplicit) and e.reference().damping:
            notes.append(f"edge {q}->{r}: the reference solves the damped system (H + {e.reference().damping}·I), "
                         "as the engine does")
        elif isinstance(e, FiniteDifference):
            if steps > 1:
                notes.append(f"edge {q}->{r}: it differentiates only the last of the {steps} steps problem {q!r} "
                             "takes")
    before = graph.index[name]
    for (q, r), e in graph.engines.items():
        if not e.passes_adjoint and graph.index[q] < before and graph.index[r] <= before:
            notes.append(f"edge {q}->{r}: {type(e).__name__} drops the path through it; the reference does not")
    return notes


def _central_difference(graph: Graph, name: str, fixed: dict, dirs, keys, sizes, eps: float,
                        held: dict) -> torch.Tensor:
    """Directional derivatives of the composition; declared constants keep the values of the unperturbed run."""
    problem = graph.problems[name]
    saved = graph_state_dict(graph)
    numeric = torch.empty(dirs.shape[0], dtype=dirs.dtype, device=dirs.device)
    try:
        for i, d in enumerate(dirs):
            vals = []
            for s in (1.0, -1.0):
                load_graph_state_dict(graph, saved, data=False, rng_state=True)
                with torch.no_grad():
                    for k, part in zip(keys, torch.split(s * eps * d, sizes)):
                        problem.params_tree[k].add_(part.reshape(problem.params_tree[k].shape))
                stepper = Stepper(graph, nan_policy="off", batch_fn=lambda p, k: fixed[p.name][k], held=held)
                with preserve_buffers(graph.modules()):
                    vals.append(stepper.direction(name).loss.detach())
            numeric[i] = (vals[0] - vals[1]) / (2 * eps)
    finally:
        load_graph_state_dict(graph, saved, data=False, rng_state=True)
    return numeric
