"""Hypergradients on demand, and a checker that says what it compares them with.

``hypergradient(graph, name)`` runs the problems before ``name`` as in a real
step, computes ``name``'s update direction with the configured engines, and
puts every parameter, optimizer state, buffer and the global random generators
back (it draws the batches it is not given from the problems' data;
``draw_batches`` pins them).

``check_hypergradient`` judges each engine at its limit (``Engine.limit``: a
finite-difference radius shrunk to the checker's) against a reference computed
without the engines (``mlo.references``):

* no implicit engine on the way: central differences of the unrolled
  composition ``θ ↦ objective_P(after the earlier problems step with P = θ)``
  at the largest of three radii where it is smooth along each direction, with
  everything the objectives declare constant (``Problem.constants``,
  ``ctx.forward(constants=...)``) and every edge that passes no adjoint
  (``FirstOrder``) held at its unperturbed value;
* an implicit engine on the way (``reference()`` is ``DenseImplicit``): the
  implicit-function-theorem hypergradient with a dense Hessian and mixed
  Jacobian from ``torch.func``, and the premises reported (the lower problem's
  stationarity, the solver's residual).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from . import references, rng, rows
from .engines import DenseImplicit, FirstOrder, Unrolled, observe_solves
from .errors import ConfigError
from .graph import Graph
from .problem import SameBatch
from .state import graph_state_dict, load_graph_state_dict, preserve_buffers
from .step import Stepper
from .tree import clone

COMPOSITION = "a central difference of the unrolled composition"
IMPLICIT = "the implicit-function-theorem hypergradient (a dense Hessian from torch.func)"


class Batches(dict):
    """``{problem: [the batch of each of its steps]}``, drawn once by ``draw_batches``; pass as ``batches=``."""


def draw_batches(graph: Graph, name: str) -> Batches:
    """Draw the batches the problems up to ``name`` use in one step (the streams advance), to reuse them."""
    with rng.preserved():
        return _fixed_batches(graph, name, None)


def _fixed_batches(graph: Graph, name: str, batches: dict | None) -> Batches:
    if name not in graph.problems:
        raise graph._unknown(name, "hypergradient")
    out = Batches()
    for q in graph.order[: graph.index[name] + 1]:
        p = graph.problems[q]
        if isinstance(batches, Batches) and q in batches:
            out[q] = list(batches[q])
        elif batches is not None and not isinstance(batches, Batches) and q in batches:
            out[q] = [batches[q]] * p.steps
        elif isinstance(p.data, SameBatch):
            out[q] = [out[p.data.source][-1]] * p.steps
        else:
            out[q] = [p.stream.next() for _ in range(p.steps)]
    return out


def hypergradient(graph: Graph, name: str, batches: dict | None = None, return_adjoints: bool = False) -> dict:
    """``{"total", "direct", "hyper"}``: d(objective of ``name``)/d(its parameters).

    Each is in the structure the problem's ``params`` were declared in (a tensor,
    a list, or a dict of names — a module's named parameters). Signs are those of
    the objective itself (for a max problem, the ascent direction). ``batches``
    maps problem names to a batch (used for each of that problem's steps), or is
    what ``draw_batches`` returned (then two calls see the same batches); missing
    ones are drawn from the problems' data. ``return_adjoints=True`` adds
    ``"adjoints"``: for every problem Q of the reverse sweep, d(objective of
    ``name``)/d(Q's solution) — what reached Q.
    """
    with rng.preserved():
        out = _hypergradient(graph, name, _fixed_batches(graph, name, batches), return_adjoints)
    res = {k: graph.problems[name].unpack(out[k]) for k in ("total", "direct", "hyper")}
    if return_adjoints:
        res["adjoints"] = {q: graph.problems[q].unpack(t) for q, t in out["adjoints"].items()}
    return res


def _hypergradient(graph: Graph, name: str, fixed: dict, adjoints: bool = False, held=None,
                   premises: bool = False) -> dict:
    saved = graph_state_dict(graph)
    try:
        stepper = Stepper(graph, nan_policy="off", batch_fn=lambda p, k: fixed[p.name][k], held=held)
        with preserve_buffers(graph.modules()), observe_solves() as solves:
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
        if premises:
            out["premises"] = references.premises(graph, stepper, saved, solves)
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
    # approximate engines (finite differences): the relative error at their configured setting
    configured_error: float | None = None
    radius: float | None = None     # the central differences' radius (None: no central difference)
    smooth: bool = True             # False: non-smooth along a direction at every radius tried
    premises: list[str] = field(default_factory=list)   # implicit engines: stationarity, solver residuals
    batches: dict | None = None     # the batches used (pass as ``batches=`` to repeat the check)

    @property
    def ok(self) -> bool:
        return self.smooth and self.rel_error <= self.tol

    def __str__(self) -> str:
        if not self.smooth:
            first = f"cannot check here: non-smooth at radius {self.radius:.0e} (ReLU/max-pool kinks)"
        else:
            at = f" at radius {self.radius:.0e}" if self.radius is not None else ""
            first = (f"{'OK' if self.ok else 'MISMATCH'}: relative error {self.rel_error:.3e} (tolerance "
                     f"{self.tol:.1e}) over {self.engine.numel()} direction(s), against {self.reference}{at}")
        lines = [first] + [f"  premise: {p}" for p in self.premises]
        if self.configured_error is not None:
            lines.append(f"  approximate engines checked at their limit; at their configured setting the "
                         f"relative error is {self.configured_error:.3e} (the approximation, not a bug)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def check_hypergradient(graph: Graph, name: str, batches: dict | None = None, eps: float = 1e-5,
                        directions: int | None = None, tol: float = 1e-6, seed: int = 0,
                        allow_low_precision: bool = False) -> CheckReport:
    """Compare ``hypergradient(graph, name)["total"]`` with the engines' target (module docstring).

    Parameters are perturbed along every coordinate when there are at most 64,
    else along ``directions`` (default 8) random unit vectors (``seed``). The
    central differences use radii ``eps``, ``eps/10``, ``eps/100``; approximate
    engines run at their ``limit`` of the same radii. Needs float64 parameters:
    otherwise raises ``ConfigError``, or with ``allow_low_precision=True`` warns.
    Nothing in the graph changes, nor the global random generators.
    """
    if name not in graph.problems:
        raise graph._unknown(name, "check_hypergradient")
    for key, v in (("eps", eps), ("tol", tol)):
        if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
            raise ConfigError(f"check_hypergradient: {key}: expected a finite number > 0, got {v!r}")
    problem = graph.problems[name]
    low = sorted({str(t.dtype) for p in graph.problems.values() for t in p.params_tree.values()
                  if t.dtype != torch.float64})
    if low:
        msg = (f"check_hypergradient: parameters in {', '.join(low)}, not float64; a difference check in "
               "lower precision is dominated by rounding (convert the problems' parameters with .double())")
        if not allow_low_precision:
            raise ConfigError(msg + "; pass allow_low_precision=True to run it anyway")
        warnings.warn("LOW PRECISION: " + msg, stacklevel=2)
    radii = [eps, eps / 10, eps / 100]
    approximate = any(e.limit(eps) != e for e in graph.engines.values())
    with rng.preserved():
        fixed = _fixed_batches(graph, name, batches)
        keys = list(problem.params_tree)
        n = sum(problem.params_tree[k].numel() for k in keys)
        ref = problem.params_tree[keys[0]]
        if directions is None and n <= 64:
            dirs = torch.eye(n, dtype=ref.dtype)
        else:
            dirs = torch.randn(directions or 8, n, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64).to(ref.dtype)
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
        project = lambda t: dirs @ torch.cat([t[k].reshape(-1) for k in keys]).to(dirs.device)  # noqa: E731
        edges = [(s.problem, r, e) for s in graph.plans[name].sweep for r, e in s.wrt]
        implicit = any(isinstance(e.reference(), DenseImplicit) for _, _, e in edges)
        got, engine, settled = None, None, not approximate
        for r in radii if approximate else radii[:1]:   # approximate engines: where they settle (or like r²)
            out = _hypergradient(_replaced(graph, lambda e: e.limit(r)), name, fixed, premises=implicit)
            proj = project(out["total"])
            if engine is not None and _relative(engine, proj) <= tol / 4:
                settled = True
                break
            if engine is not None and _relative(engine, proj) <= 99 * tol / 4:
                got, engine, settled = out, proj + (proj - engine) / 99, True
                break
            got, engine = out, proj
        notes = _notes(graph, name, edges, got["undeclared"], radii[-1])
        if not settled:
            notes.append(f"the approximate engines still change between radii {radii[1]:.0e} and {radii[2]:.0e}: "
                         "their own differences are non-smooth there")
        radius, smooth = None, True
        if implicit:
            reference = IMPLICIT
            other = _replaced(graph, lambda e: references.FuncImplicit(e.reference().damping,
                                                                       e.reference().max_params)
                              if isinstance(e.reference(), DenseImplicit) else e.reference())
            try:
                numeric = project(_hypergradient(other, name, fixed)["total"])
            except ConfigError as e:
                raise ConfigError(f"check_hypergradient cannot check {name!r}: the implicit engines' target "
                                  f"needs a dense Hessian ({e}); check a smaller instance, or use Unrolled") from None
        else:
            reference = COMPOSITION
            cut = {}
            for (q, r), e in graph.engines.items():
                if not e.passes_adjoint and graph.index[q] < graph.index[name]:
                    cut.setdefault(q, set()).add(r)
            values_graph = graph    # no sweep before P: P's own sweep does not change its objective's value
            if not any(graph.plans[q].sweep for q in graph.order[: graph.index[name]]):
                values_graph = _replaced(graph, lambda e: FirstOrder())
            f0, value = references.composition(values_graph, name, fixed, dirs, radii, got["constants"], cut)
            choice = references.choose(f0, value, dirs.shape[0], radii, tol, dirs.dtype)
            numeric, radius, smooth = choice.numeric.to(dirs.device), choice.radius, choice.smooth
        configured_error = None
        if approximate:
            configured_error = _relative(project(_hypergradient(graph, name, fixed)["total"]), numeric)
    report = CheckReport(engine.detach(), numeric.detach(), _relative(engine, numeric), tol, reference, notes,
                         configured_error, radius, smooth, got.get("premises", []), fixed)
    if not report.ok:
        report.notes.extend(_dropped(graph, name))
    return report


def _replaced(graph: Graph, fn) -> Graph:
    """``graph.with_engines(fn)`` for the checker's own runs (the graph's warnings were given when it was built)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graph.with_engines(fn)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _notes(graph: Graph, name: str, edges, undeclared: dict, smallest: float) -> list[str]:
    """Known reasons why an engine and its reference may differ."""
    notes = []
    for q, used in undeclared.items():
        if name in used:
            notes.append(f"problem {q!r} uses the parameters of {name!r} as constants without declaring them "
                         f"(Problem.constants): the central difference moves them, the engines do not")
    for q, r, e in edges:
        steps, ref = graph.problems[q].steps, e.reference()
        exactish = isinstance(e, Unrolled) or e.limit(smallest) != e     # Unrolled, FiniteDifference, wrappers
        if isinstance(ref, Unrolled) and ref.steps < steps and exactish:
            what = f"Unrolled(steps={ref.steps})" if isinstance(e, Unrolled) else type(e).__name__
            notes.append(f"edge {q}->{r}: {what} differentiates only the last {ref.steps} of the {steps} steps "
                         f"problem {q!r} takes")
        elif isinstance(ref, DenseImplicit) and ref.damping:
            notes.append(f"edge {q}->{r}: the reference solves the damped system (H + {ref.damping}·I), "
                         "as the engine does")
        if type(ref) is not type(e) and not isinstance(ref, DenseImplicit) and e.limit(smallest) == e:
            notes.append(f"edge {q}->{r}: {type(e).__name__} approximates {ref} but has no limit(); "
                         "it is judged as configured")
    before = graph.index[name]
    for (q, r), e in graph.engines.items():
        if not e.passes_adjoint and graph.index[q] < before and graph.index[r] <= before:
            notes.append(f"edge {q}->{r}: {type(e).__name__} drops the path through it; the reference drops it "
                         f"too (problem {q!r} sees {r!r} at its unperturbed value)")
    return notes


def _dropped(graph: Graph, name: str) -> list[str]:
    """The graph's own list of paths no engine differentiates (``Graph.dropped_paths``), if it keeps one."""
    return [f"the engines drop the path {p} (Graph.dropped_paths); the reference does not"
            for p in getattr(graph, "dropped_paths", None) or () if getattr(p, "problem", name) == name]

