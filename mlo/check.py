"""Hypergradients on demand, and a checker against a float64 central difference.

``hypergradient(graph, name)`` runs the problems before ``name`` as in a real
step, computes ``name``'s update direction with the configured engines, and
puts every parameter, optimizer state, buffer and RNG state back.

``check_hypergradient`` compares that against a central difference of the
*unrolled composition*: ``θ ↦ objective_P(after the earlier problems step with
P = θ)``. Exact engines (``Unrolled``) agree to round-off in float64; the others
show their approximation error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph import Graph
from .problem import SameBatch
from .state import graph_state_dict, load_graph_state_dict
from .step import Stepper, preserve_buffers
from .tree import Tree


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


def _sign_out(graph: Graph, name: str, tree: Tree) -> Tree:
    s = graph.problems[name].sign
    return {k: s * v for k, v in tree.items()}


def hypergradient(graph: Graph, name: str, batches: dict | None = None) -> dict[str, Tree]:
    """``{"total", "direct", "hyper"}``: d(objective of ``name``)/d(its parameters).

    Signs are those of the objective itself (for a max problem, the ascent
    direction). ``batches`` maps problem names to a batch (used for each of that
    problem's steps); missing ones are drawn from the problems' data once.
    """
    return _hypergradient(graph, name, _fixed_batches(graph, name, batches))


def _hypergradient(graph: Graph, name: str, fixed: dict) -> dict[str, Tree]:
    saved = graph_state_dict(graph)
    try:
        stepper = Stepper(graph, nan_policy="off", batch_fn=lambda p, k: fixed[p.name][k])
        with preserve_buffers(graph.modules()):
            m = stepper.step(stop_before=name)[name]
        out = {"total": m["_direction"], "direct": m["_direct"],
               "hyper": m["_hyper"] if m["_hyper"] is not None else {k: torch.zeros_like(v)
                                                                  for k, v in m["_direct"].items()}}
        return {k: {kk: vv.detach() for kk, vv in _sign_out(graph, name, v).items()} for k, v in out.items()}
    finally:
        _restore_without_data(graph, saved)


def _restore_without_data(graph: Graph, saved: dict) -> None:
    load_graph_state_dict(graph, saved, data=False)


@dataclass
class CheckReport:
    """Engine hypergradient vs central difference, along ``directions`` unit vectors."""

    engine: torch.Tensor       # directional derivatives from the engine
    numeric: torch.Tensor      # the same from the central difference
    rel_error: float           # ‖engine − numeric‖ / max(‖numeric‖, tiny)
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tol

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (f"{verdict}: relative error {self.rel_error:.3e} (tolerance {self.tol:.1e}) over "
                f"{self.engine.numel()} direction(s)")


def check_hypergradient(graph: Graph, name: str, batches: dict | None = None, eps: float = 1e-5,
                        directions: int | None = None, tol: float = 1e-6, seed: int = 0) -> CheckReport:
    """Compare ``hypergradient(graph, name)["total"]`` with a central difference.

    Parameters are perturbed along every coordinate when there are at most 64,
    else along ``directions`` (default 8) random unit vectors. Use float64
    parameters for a meaningful comparison. Nothing in the graph changes.
    The composition perturbs the live parameters, so an objective that uses
    them as constants (through ``ctx.forward`` without declaring them in
    ``reads``) moves too; engines follow declared dependencies only. Declare
    every read for an exact agreement.
    """
    problem = graph.problems[name]
    if any(t.dtype != torch.float64 for p in graph.problems.values() for t in p.params_tree.values()):
        import warnings
        warnings.warn("check_hypergradient: some parameters are not float64; a central difference in lower "
                      "precision is dominated by rounding (convert the problems with .double())")
    fixed = _fixed_batches(graph, name, batches)
    hg = _hypergradient(graph, name, fixed)["total"]
    keys = list(problem.params_tree)
    sizes = [problem.params_tree[k].numel() for k in keys]
    n = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    ref = problem.params_tree[keys[0]]
    if directions is None and n <= 64:
        dirs = torch.eye(n, dtype=ref.dtype)
    else:
        dirs = torch.randn(directions or 8, n, generator=gen, dtype=torch.float64).to(ref.dtype)
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
    flat_hg = torch.cat([hg[k].reshape(-1) for k in keys]).to(dirs.device)
    engine = dirs @ flat_hg
    saved = graph_state_dict(graph)
    numeric = torch.empty_like(engine)
    try:
        for i, d in enumerate(dirs):
            vals = []
            for s in (1.0, -1.0):
                _restore_without_data(graph, saved)
                _perturb(problem.params_tree, keys, sizes, s * eps * d)
                vals.append(_composed_objective(graph, name, fixed))
            numeric[i] = (vals[0] - vals[1]) / (2 * eps)
    finally:
        _restore_without_data(graph, saved)
    err = float((engine - numeric).norm() / numeric.norm().clamp_min(1e-30))
    return CheckReport(engine.detach(), numeric.detach(), err, tol)


def _perturb(tree: Tree, keys, sizes, delta: torch.Tensor) -> None:
    with torch.no_grad():
        for k, part in zip(keys, torch.split(delta, sizes)):
            tree[k].add_(part.reshape(tree[k].shape).to(tree[k].device))


def _composed_objective(graph: Graph, name: str, fixed: dict) -> torch.Tensor:
    """Objective of ``name`` after the earlier problems take their (real) steps."""
    stepper = Stepper(graph, nan_policy="off", batch_fn=lambda p, k: fixed[p.name][k])
    with preserve_buffers(graph.modules()):
        m = stepper.step(stop_before=name)[name]
    return m["loss"].detach()
