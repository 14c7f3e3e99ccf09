"""The references ``check_hypergradient`` compares engines with, computed without the engines.

* ``composition``: central differences of the unrolled composition
  ``t ↦ objective_P(after the earlier problems step with P = θ + t·d)`` at three
  radii, with what the objectives declare constant held at its unperturbed value
  (``Holds``), and a test that the composition is smooth along ``d`` inside the
  radius it uses (``choose``).
* ``FuncImplicit``: the implicit hypergradient from a dense Hessian and mixed
  Jacobian that ``torch.func`` builds from the lower objective itself.
* ``stationarity`` / ``premises``: how far a lower problem is from ``∇L = 0``
  and how well each solve converged (the implicit engines' premises).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from . import context, solvers
from .engines.base import Engine, RunRecord
from .errors import ConfigError, MLOError
from .state import graph_state_dict, load_graph_state_dict, preserve_buffers
from .step import Stepper
from .tree import Tree, grads, norm


class Holds:
    """Values an evaluation sees, recorded in the unperturbed run and replayed in the perturbed ones.

    ``cut`` maps a problem to the reads it takes over an edge that passes no
    adjoint (``FirstOrder``): its evaluations see those reads' unperturbed values.
    Every ``ctx.forward(..., constants=...)`` stop-gradient likewise sees its
    unperturbed value. Matching is by order of evaluation (the runs execute the
    same code on the same batches).
    """

    def __init__(self, cut: dict[str, set[str]]):
        self.cut = cut
        self.recording = True
        self._reads: dict[str, list] = {}
        self._consts: list[torch.Tensor] = []
        self._at: dict[str, int] = {}
        self._const_at = 0

    def replay(self) -> None:
        """Substitute the recorded values from now on, from the first evaluation again (each perturbed run)."""
        self.recording = False
        self._at, self._const_at = {}, 0

    def values(self, name: str, values: dict[str, Tree]) -> dict[str, Tree]:
        held = [r for r in self.cut.get(name, ()) if r in values]
        if not held:
            return values
        log = self._reads.setdefault(name, [])
        if self.recording:
            log.append({r: {k: v.detach().clone() for k, v in values[r].items()} for r in held})
            return values
        i = self._at.get(name, 0)
        self._at[name] = i + 1
        if i >= len(log) or set(log[i]) != set(held):
            raise MLOError(f"check_hypergradient: problem {name!r} was evaluated differently in a perturbed run")
        out = dict(values)
        for r, tree in log[i].items():   # the held value, with the live value's gradient path (straight through)
            out[r] = {k: tree[k] + (v - v.detach()) for k, v in values[r].items()}
        return out

    def constant(self, value: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self._consts.append(value.clone())
            return value
        i, self._const_at = self._const_at, self._const_at + 1
        if i >= len(self._consts) or self._consts[i].shape != value.shape:
            raise MLOError("check_hypergradient: a stop-gradient was evaluated differently in a perturbed run")
        return self._consts[i]


@contextlib.contextmanager
def holding(holds: Holds):
    context.HOLD = holds
    try:
        yield
    finally:
        context.HOLD = None


def composition(graph, name: str, fixed: dict, dirs: torch.Tensor, radii: list[float], held: dict,
                cut: dict[str, set[str]]):
    """``(f0, value)``: the composition at θ and ``value(j, i, s)`` at ``θ + s·radii[j]·dirs[i]`` (memoised)."""
    problem = graph.problems[name]
    keys = list(problem.params_tree)
    sizes = [problem.params_tree[k].numel() for k in keys]
    saved = graph_state_dict(graph)
    holds = Holds(cut)

    def run(step: torch.Tensor | None) -> float:
        load_graph_state_dict(graph, saved, data=False, rng_state=True)
        if step is not None:
            with torch.no_grad():
                for k, part in zip(keys, torch.split(step, sizes)):
                    problem.params_tree[k].add_(part.reshape(problem.params_tree[k].shape))
        stepper = Stepper(graph, nan_policy="off", batch_fn=lambda p, k: fixed[p.name][k], held=held)
        if step is not None:
            holds.replay()
        try:
            with holding(holds), preserve_buffers(graph.modules()):
                return float(stepper.direction(name).loss.detach())
        finally:
            load_graph_state_dict(graph, saved, data=False, rng_state=True)

    f0 = run(None)
    memo: dict = {}

    def value(j: int, i: int, s: float) -> float:
        if (j, i, s) not in memo:
            memo[(j, i, s)] = run(s * radii[j] * dirs[i])
        return memo[(j, i, s)]
    return f0, value


@dataclass
class Choice:
    numeric: torch.Tensor        # the directional derivatives
    radius: float                # the smallest radius any direction used
    smooth: bool                 # False: some direction is non-smooth at every radius tried


def choose(f0: float, value, n_dirs: int, radii: list[float], tol: float, dtype) -> Choice:
    """Per direction, the largest pair of radii ``h, h/10`` between which the composition is smooth along it.

    At radius h the central difference ``c(h)`` and the slope gap
    ``g(h) = [f(h) − 2f(0) + f(−h)] / h`` are computed. Where the composition is
    smooth, ``g(h) = f''·h`` and ``c(h) = f' + a·h²``; a kink (ReLU, max-pool) at
    distance ``t < h`` adds about ``jump·(1 − t/h)`` to ``g`` and half that to
    ``c``. A pair is smooth when ``g(h/10) = g(h)/10`` within twice this
    direction's error budget (a quarter of its share of the tolerance) plus
    rounding (``64·u·|f|`` per value); then ``c(h)`` is used if it equals
    ``c(h/10)`` within the budget, else the extrapolation
    ``c(h/10) + [c(h/10) − c(h)]/99`` that removes the ``a·h²`` term, if that term
    (``|c(h) − c(h/10)|/99`` at ``h/10``) is within the budget.
    """
    u = torch.finfo(dtype).eps
    cd = lambda j, i: (value(j, i, 1.0) - value(j, i, -1.0)) / (2 * radii[j])  # noqa: E731
    gap = lambda j, i: (value(j, i, 1.0) - 2 * f0 + value(j, i, -1.0)) / radii[j]  # noqa: E731
    first = [cd(0, i) for i in range(n_dirs)]
    budget = tol * math.sqrt(sum(c * c for c in first)) / (4 * math.sqrt(n_dirs))
    out, used, smooth = [], radii[0], True
    for i in range(n_dirs):
        pick = None
        for j in range(len(radii) - 1):
            fmax = max(abs(f0), *(abs(value(k, i, s)) for k in (j, j + 1) for s in (1.0, -1.0)))
            noise = lambda k: 64 * u * fmax / radii[k]  # noqa: E731
            if abs(gap(j + 1, i) - gap(j, i) / 10) > 2 * budget + 4 * noise(j + 1) + 0.4 * noise(j):
                continue        # a kink between the radii, or inside both
            diff, allowed = cd(j, i) - cd(j + 1, i), budget + noise(j) + noise(j + 1)
            if abs(diff) <= allowed:
                pick = (cd(j, i), radii[j])
            elif abs(diff) / 99 <= allowed:
                pick = (cd(j + 1, i) - diff / 99, radii[j + 1])
            if pick is not None:
                break
        if pick is None:
            smooth, pick = False, (cd(len(radii) - 1, i), radii[-1])
        out.append(pick[0])
        used = min(used, pick[1])
    return Choice(torch.tensor(out, dtype=dtype), used, smooth)


@dataclass(frozen=True)
class FuncImplicit(Engine):
    """``−Mᵀ(H + ρI)⁻¹u`` with ``H`` and ``M`` built by ``torch.func`` from the lower objective.

    Independent of the engines' own products (``grad_with_graph``, ``hvp``,
    ``mixed_vjp``). Falls back to ``torch.autograd.functional`` where a model
    cannot be vmapped (BatchNorm updating its statistics in place).
    """

    damping: float = 0.0
    max_params: int = 4096

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        w0 = {k: v.detach() for k, v in site.solution.items()}
        n = sum(v.numel() for v in w0.values())
        if n > self.max_params:
            raise ConfigError(f"DenseImplicit: problem {site.name!r} has {n} parameters, more than "
                              f"max_params={self.max_params}; a dense Hessian is out of reach")
        reads0 = site.bind([])
        like = {f"{r}\0{k}": v for r in wrt for k, v in reads0[r].items()}

        def f(wf, rf):
            reads = dict(reads0)
            parts = solvers.unflatten(rf, like)
            for r in wrt:
                reads[r] = {k: parts[f"{r}\0{k}"] for k in reads0[r]}
            return site.loss(solvers.unflatten(wf, w0), reads, site.last)

        wf, rf = solvers.flatten(w0), solvers.flatten(like)

        def grad_w(r):
            w = wf.detach().requires_grad_(True)
            return torch.autograd.grad(f(w, r), w, create_graph=True)[0]
        try:
            h = torch.func.hessian(f, argnums=0)(wf, rf)
            m = torch.func.jacrev(torch.func.grad(f, argnums=0), argnums=1)(wf, rf)
        except (RuntimeError, NotImplementedError):
            h = torch.autograd.functional.hessian(lambda w: f(w, rf), wf)
            m = torch.autograd.functional.jacobian(grad_w, rf)
        q = torch.linalg.solve(h + self.damping * torch.eye(n, dtype=h.dtype, device=h.device),
                               solvers.flatten(u))
        parts = solvers.unflatten(-(m.T @ q), like)
        return {r: {k: parts[f"{r}\0{k}"] for k in reads0[r]} for r in wrt}


def stationarity(run: RunRecord, start: Tree) -> float:
    """``‖∇L(w')‖ / ‖∇L(w₀)‖`` on the run's last batch: w' its solution, w₀ where its steps started."""
    def gnorm(point: Tree) -> torch.Tensor:
        w = {k: v.detach().clone().requires_grad_(True) for k, v in point.items()}
        return norm(grads(run.loss(w, run.bind([]), run.last), w))
    return float(gnorm(run.solution) / gnorm(start).clamp_min(torch.finfo(torch.float64).tiny))


UNSOLVED, UNCONVERGED = 1e-3, 1e-6      # stationarity ratio / solver residual above which a hint is given


def premises(graph, stepper: Stepper, saved: dict, solves: list) -> list[str]:
    """The implicit engines' premises: each lower problem's stationarity, each solve's residual (with hints)."""
    lines, seen = [], set()
    for q, eng, info in solves:
        if q not in seen and q in stepper.runs and q not in stepper.runs[q].rows:
            seen.add(q)
            run = stepper.runs[q]
            start = saved["problems"][getattr(run, "init_from", None) or q]["params"]   # init_from: restarted
            with preserve_buffers(graph.modules()):
                ratio = stationarity(run, start)
            hint = "; inner problem not solved: use Unrolled or more steps" if ratio > UNSOLVED else ""
            lines.append(f"problem {q!r}: ‖∇L(w')‖ is {ratio:.1e} of its value where its steps started{hint}")
        kind = type(eng).__name__ if eng is not None else "solver"
        res = float(info.residual)
        hint = ""
        if res > UNCONVERGED:
            hint = (f"; {kind} not converged: raise iterations" if kind != "CG" else
                    "; CG not converged: raise iterations (an indefinite Hessian needs damping or MINRES)")
        lines.append(f"solve for {q!r}: {kind} residual ‖u − Hq‖/‖u‖ = {res:.1e} after {info.iterations} "
                     f"iteration(s){hint}")
    return lines
