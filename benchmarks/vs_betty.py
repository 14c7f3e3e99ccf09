"""``python -m benchmarks.vs_betty``: mlo against Betty 0.2.1, engine for engine.

Betty is optional; install it with the benchmark's own command (its package
metadata pins old Python versions, hence the flags)::

    pip install --no-deps --ignore-requires-python betty-ml==0.2.1

Cases (same models, initial values, optimizers and batches in both frameworks):

* ``hpo``: bilevel logistic-regression HPO on digits: one weight-decay
  coefficient per input feature, learned on validation loss (lower: plain SGD);
* ``darts``: bilevel DARTS on a small supernet (lower: SGD with momentum, weight
  decay and a gradient clip of 5, as DARTS);
* ``chain``: 3 levels with two paths into one problem: the supernet weights E
  read the architecture A; a student network M learns from E' (soft targets);
  A reads E' and M', so A's hypergradient reaches E both directly and through M.

Engine pairs: Betty ``darts`` ↔ mlo ``FiniteDifference``, ``neumann`` ↔ ``Neumann``
(same K and α), ``cg`` ↔ ``CG`` (same K). Where the definitions differ:

* Betty's ``darts`` is ``−Mᵀu`` at the *updated* lower point w' by a central
  difference; mlo's finite difference is the one-step quantity ``Mᵀ(∂U/∂g)ᵀu``
  (``−η Mᵀu`` for plain SGD) at the *pre-update* point w, through the real update
  (the clip's Jacobian included). mlo's ``Neumann(0, α=1)`` computes Betty's
  definition exactly, and so does Betty's own ``neumann`` with 0 iterations and
  α = 1: that pair is asserted. Betty's ``darts`` at DARTS' R = 0.01 is compared
  with it and reported (the central difference's error: on a ReLU supernet the
  kinks inside ±R dominate, at any R), and so is mlo's FD/η (the size of the
  evaluation-point difference).
* Betty's ``cg`` builds each new search direction from the previous residual
  (``betty/hypergradient/cg.py:53``, ``p_new = r + β p`` with ``r`` not ``r_new``):
  it equals conjugate gradients only for K = 1, which is compared; for K > 1
  the difference is reported, not asserted.
* ``neumann`` coincides (K terms, step α, at w', on the last batch); it is linear
  in u, so Betty's one solve per path, summed, equals mlo's one sweep on the
  summed adjoint. CG (and the finite difference's ε = R/‖v‖) are not linear in
  u, so on the chain those two differ by construction.

Hypergradients are compared in float64 on the first outer step from the same
state (the upper problem's gradient minus its direct part); time (float32,
whole outer steps, interleaved) and peak memory are reported as mlo / Betty.
Goals: ≤ 0.8× Betty's time and ≤ 1.0× its memory on the bilevel cases,
≤ 0.7× time on the chain. Times come with process CPU time as well (immune to
other jobs' share of the cores), and the HPO finite-difference row also times
the same step written by hand (``HPO.plain``, checked equal to mlo's in
float64): the floor no framework can go below. ``--cases hpo`` runs one case.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mlo
from applications.lease.models.resnet import build_audience

from . import common, nas

INSTALL = "pip install --no-deps --ignore-requires-python betty-ml==0.2.1"
TOL = {"neumann": 1e-9, "cg_k1": 1e-9, "darts_definition": 1e-9, "plain_vs_mlo": 1e-10}
GOALS = {"hpo": (0.8, 1.0), "darts": (0.8, 1.0), "chain": (0.7, None)}
KS = {"hpo": 5, "darts": 3, "chain": 3}       # Neumann / CG iterations (tiny: 1 on the supernet cases)
BLOCK = {"hpo": 20, "darts": 1, "chain": 1}   # millisecond steps: each sample times 20 steps in a row
HPO_BATCH = {"tiny": 64, "small": 256, "paper": 898}


def betty_available() -> bool:
    try:
        import betty  # noqa: F401
        from betty.engine import Engine  # noqa: F401
    except Exception:   # noqa: BLE001 (any import failure means: not usable here)
        return False
    return True


@dataclass(frozen=True)
class Pair:
    """An engine configuration: Betty's ``kind`` (darts / neumann / cg) with K and α."""

    kind: str
    k: int = 0
    alpha: float = 1.0
    r: float = 0.01      # Betty's darts_alpha (DARTS' R)

    def mlo(self, exact_darts: bool = False) -> mlo.Engine:
        if self.kind == "darts":
            return mlo.Neumann(iterations=0, alpha=1.0) if exact_darts else mlo.FiniteDifference(eps=0.01)
        if self.kind == "neumann":
            return mlo.Neumann(iterations=self.k, alpha=self.alpha)
        return mlo.CG(iterations=self.k)

    def betty_config(self, **extra):
        from betty.configs import Config
        fields = {"darts": {"type": "darts", "darts_alpha": self.r},
                  "neumann": {"type": "neumann", "neumann_iterations": self.k, "neumann_alpha": self.alpha},
                  "cg": {"type": "cg", "cg_iterations": self.k, "cg_alpha": 1.0}}[self.kind]
        return Config(**fields, **extra)

    @property
    def label(self) -> str:
        return {"darts": "darts ↔ FiniteDifference", "neumann": f"neumann ↔ Neumann (K={self.k})",
                "cg": f"cg ↔ CG (K={self.k})"}[self.kind]


def _cycle_loader(batches):
    return list(batches)


def _betty_problem_class():
    from betty.problems import ImplicitProblem

    class Problem(ImplicitProblem):
        """A Betty problem with a loss closure, an explicit parameter list, and gradient recording."""

        def __init__(self, name, config, module, optimizer, data, loss, params=None):
            super().__init__(name, config, module, optimizer, train_data_loader=data)
            self._loss, self._params, self.record, self.recorded = loss, params, False, None

        def training_step(self, batch):
            return self._loss(batch)

        def trainable_parameters(self):
            return list(self._params) if self._params is not None else list(self.module.parameters())

        def parameters(self):
            return self.trainable_parameters()

        def custom_optimizer_step(self, *args, **kwargs):
            if self.record:
                self.recorded = [None if p.grad is None else p.grad.detach().clone()
                                 for p in self.trainable_parameters()]
            self.optimizer.step()
    return Problem


def _betty_engine(problems, u2l, l2u, device):
    from betty.configs import EngineConfig
    from betty.engine import Engine
    from betty.logging.logger_base import get_logger
    get_logger().setLevel(logging.WARNING)
    strategy = "gpu" if torch.device(device).type == "cuda" else "cpu"
    by = {p.name: p for p in problems}
    deps = {"u2l": {by[k]: [by[v] for v in vs] for k, vs in u2l.items()},
            "l2u": {by[k]: [by[v] for v in vs] for k, vs in l2u.items()}}
    return Engine(problems=problems, config=EngineConfig(train_iters=10**9, strategy=strategy, logger_type="none"),
                  dependencies=deps)


# ----------------------------------------------------------------------------- cases
class HPO:
    """Per-feature weight decay for softmax regression on digits (no intercept)."""

    name, top, lower_names = "hpo", "upper", ("lower",)
    LR = 0.1

    def __init__(self, size: str, seed: int, device, dtype):
        self.size = size
        d = common.digits(seed, dtype)
        bs = HPO_BATCH[size]
        gen = torch.Generator().manual_seed(seed)
        self.batches_tr, self.batches_val = [], []
        for name, out in (("train", self.batches_tr), ("val", self.batches_val)):
            x, y = d[f"x_{name}"], d[f"y_{name}"]
            for _ in range(nas.BATCHES):
                idx = torch.randperm(len(y), generator=gen)[:bs]
                out.append((x[idx].to(device), y[idx].to(device)))
        torch.manual_seed(seed)
        self.model = nn.Linear(64, 10, bias=False).to(device, dtype)
        self.theta = torch.full((64,), math.log(1e-2), dtype=dtype, device=device)

    def fresh(self):
        return copy.deepcopy(self.model), nn.ParameterDict({"theta": nn.Parameter(self.theta.clone())})

    @staticmethod
    def _reg(weight, theta):
        return 0.5 * (theta.exp()[None, :] * weight ** 2).sum()

    def mlo_graph(self, lower_engine: mlo.Engine) -> mlo.Graph:
        model, hyper = self.fresh()

        def lower_loss(ctx, batch):
            x, y = batch
            return F.cross_entropy(ctx.forward(model, x), y) + self._reg(ctx["lower"]["weight"], ctx["upper"]["theta"])

        def upper_loss(ctx, batch):
            x, y = batch
            return F.cross_entropy(ctx.forward(model, x), y)
        return mlo.Graph([
            mlo.Problem("lower", model, lower_loss, lambda p: torch.optim.SGD(p, lr=self.LR), data=self.batches_tr,
                        reads=["upper"], engine=lower_engine),
            mlo.Problem("upper", hyper, upper_loss, lambda p: torch.optim.Adam(p, lr=0.01), data=self.batches_val,
                        reads=["lower"])])

    def betty(self, pair: Pair, device):
        P = _betty_problem_class()
        model, hyper = self.fresh()
        lower = P("lower", pair.betty_config(), model, torch.optim.SGD(model.parameters(), lr=self.LR),
                  _cycle_loader(self.batches_tr),
                  lambda b: F.cross_entropy(model(b[0]), b[1]) + self._reg(model.weight, hyper["theta"]))
        upper = P("upper", pair.betty_config(retain_graph=True), hyper, torch.optim.Adam(hyper.parameters(), lr=0.01),
                  _cycle_loader(self.batches_val), lambda b: F.cross_entropy(model(b[0]), b[1]))
        engine = _betty_engine([lower, upper], {"upper": ["lower"]}, {"lower": ["upper"]}, device)
        return engine, upper

    def lower_lr(self) -> float:
        return self.LR

    def plain(self, eps: float = 0.01):
        """The finite-difference step written by hand, in mlo's definition (the pre-update point w,
        v = -η·u for plain SGD, ε = eps/‖v‖): what the step costs with no framework at all.
        Returns ``(step, theta, hypergradients)``; the list collects θ's gradient of every step."""
        model, hyper = self.fresh()
        w, theta = model.weight, hyper["theta"]
        opt_w, opt_t = torch.optim.SGD([w], lr=self.LR), torch.optim.Adam([theta], lr=0.01)
        i, seen = [0], []

        def lower(weight, batch):
            return F.cross_entropy(F.linear(batch[0], weight), batch[1]) + self._reg(weight, theta)

        def step():
            tr, val = self.batches_tr[i[0] % len(self.batches_tr)], self.batches_val[i[0] % len(self.batches_val)]
            i[0] += 1
            (g,) = torch.autograd.grad(lower(w, tr), w)
            w0 = w.detach().clone()
            w.grad = g
            opt_w.step()
            w.grad = None
            (u,) = torch.autograd.grad(F.cross_entropy(F.linear(val[0], w), val[1]), w)
            v = u * -self.LR
            scale = eps / torch.linalg.vector_norm(v)
            (gp,) = torch.autograd.grad(lower(w0 + scale * v, tr), theta)
            (gm,) = torch.autograd.grad(lower(w0 - scale * v, tr), theta)
            theta.grad = (gp - gm) / (2 * scale)
            seen.append(theta.grad)
            del seen[:-1]
            opt_t.step()
            theta.grad = None
        return step, theta, seen


class Darts:
    """Bilevel DARTS (weights E, architecture A) on the supernet of ``benchmarks.nas`` at this size."""

    name, top, lower_names = "darts", "A", ("E",)

    def __init__(self, size: str, seed: int, device, dtype):
        self.size = size
        self.cfg = nas.config(size, mode="baseline")
        self.fx = nas.fixture(self.cfg, size, seed, device, dtype)

    def _opt_e(self, params):
        w = self.cfg.weights
        return torch.optim.SGD(params, lr=w.lr, momentum=w.momentum, weight_decay=w.weight_decay)

    def _opt_a(self, params):
        a = self.cfg.arch
        return torch.optim.Adam(params, lr=a.lr, betas=(a.beta1, a.beta2), weight_decay=a.weight_decay)

    def mlo_graph(self, lower_engine: mlo.Engine) -> mlo.Graph:
        net = copy.deepcopy(self.fx.explainer)
        b = self.fx.batches

        def loss(ctx, batch):
            return F.cross_entropy(ctx.forward(net, batch[0]), batch[1])
        return mlo.Graph([
            mlo.Problem("E", dict(net.named_weight_parameters()), loss, self._opt_e, data=b.explainer_train,
                        reads=["A"], engine=lower_engine, grad_clip=self.cfg.weights.grad_clip, modules=[net]),
            mlo.Problem("A", dict(net.named_arch_parameters()), loss, self._opt_a, data=b.val, reads=["E"])])

    def betty(self, pair: Pair, device):
        P = _betty_problem_class()
        net = copy.deepcopy(self.fx.explainer)
        b = self.fx.batches
        E, A = net.weight_parameters(), net.arch_parameters()

        def loss(batch):
            return F.cross_entropy(net(batch[0]), batch[1])
        pe = P("E", pair.betty_config(gradient_clipping=self.cfg.weights.grad_clip), net, self._opt_e(E),
               _cycle_loader(b.explainer_train), loss, params=E)
        pa = P("A", pair.betty_config(retain_graph=True), net.arch, self._opt_a(A), _cycle_loader(b.val), loss,
               params=A)
        return _betty_engine([pe, pa], {"A": ["E"]}, {"E": ["A"]}, device), pa

    def lower_lr(self) -> float:
        return self.cfg.weights.lr


class Chain(Darts):
    """E reads A; student M reads E' (soft targets); A reads E' and M': two paths into E."""

    name, top, lower_names = "chain", "A", ("E", "M")

    def __init__(self, size: str, seed: int, device, dtype):
        super().__init__(size, seed, device, dtype)
        torch.manual_seed(seed + 1)
        data_channels = self.fx.batches.val[0][0].shape[1]
        self.student = build_audience("resnet18", 10, data_channels, self.cfg.audience.width).to(device, dtype)

    def _opt_m(self, params):
        w = self.cfg.audience_optim
        return torch.optim.SGD(params, lr=w.lr, momentum=w.momentum, weight_decay=w.weight_decay)

    @staticmethod
    def _distill(student_logits, teacher_logits):
        return -(F.softmax(teacher_logits, dim=1) * F.log_softmax(student_logits, dim=1)).sum(1).mean()

    def mlo_graph(self, lower_engine: mlo.Engine) -> mlo.Graph:
        net, student = copy.deepcopy(self.fx.explainer), copy.deepcopy(self.student)
        b = self.fx.batches

        def loss_e(ctx, batch):
            return F.cross_entropy(ctx.forward(net, batch[0]), batch[1])

        def loss_m(ctx, batch):
            return self._distill(ctx.forward(student, batch[0]), ctx.forward(net, batch[0]))

        def loss_a(ctx, batch):
            x, y = batch[0], batch[1]
            return F.cross_entropy(ctx.forward(net, x), y) + F.cross_entropy(ctx.forward(student, x), y)
        return mlo.Graph([
            mlo.Problem("E", dict(net.named_weight_parameters()), loss_e, self._opt_e, data=b.explainer_train,
                        reads=["A"], engine=lower_engine, grad_clip=self.cfg.weights.grad_clip, modules=[net]),
            mlo.Problem("M", student, loss_m, self._opt_m, data=b.audience_train, reads=["E"],
                        engine=lower_engine),
            mlo.Problem("A", dict(net.named_arch_parameters()), loss_a, self._opt_a, data=b.val, reads=["E", "M"])])

    def betty(self, pair: Pair, device):
        P = _betty_problem_class()
        net, student = copy.deepcopy(self.fx.explainer), copy.deepcopy(self.student)
        b = self.fx.batches
        E, A = net.weight_parameters(), net.arch_parameters()
        pe = P("E", pair.betty_config(gradient_clipping=self.cfg.weights.grad_clip), net, self._opt_e(E),
               _cycle_loader(b.explainer_train), lambda bt: F.cross_entropy(net(bt[0]), bt[1]), params=E)
        pm = P("M", pair.betty_config(), student, self._opt_m(student.parameters()), _cycle_loader(b.audience_train),
               lambda bt: self._distill(student(bt[0]), net(bt[0])))
        pa = P("A", pair.betty_config(retain_graph=True), net.arch, self._opt_a(A), _cycle_loader(b.val),
               lambda bt: F.cross_entropy(net(bt[0]), bt[1]) + F.cross_entropy(student(bt[0]), bt[1]), params=A)
        engine = _betty_engine([pe, pm, pa], {"A": ["E"]}, {"E": ["M", "A"], "M": ["A"]}, device)
        return engine, pa


CASES = {"hpo": HPO, "darts": Darts, "chain": Chain}


def pairs(case) -> list[Pair]:
    k = 1 if case.size == "tiny" and case.name != "hpo" else KS[case.name]
    return [Pair("darts"), Pair("neumann", k, case.lower_lr()), Pair("cg", k)]


def make_case(name: str, size: str, seed: int, device, dtype=torch.float32):
    return CASES[name](size, seed, device, dtype)


# ----------------------------------------------------------------------------- measurements
def betty_hyper(case, pair: Pair, direct: torch.Tensor, device) -> torch.Tensor:
    """Betty's first-step gradient of the top problem minus the direct part (computed by mlo)."""
    engine, top = case.betty(pair, device)
    top.record = True
    engine.train_step()
    total = common.flat([g if g is not None else torch.zeros_like(p)
                         for g, p in zip(top.recorded, top.trainable_parameters())])
    return total - direct


def mlo_hyper(case, engine: mlo.Engine) -> tuple[torch.Tensor, torch.Tensor]:
    out = mlo.hypergradient(case.mlo_graph(engine), case.top)
    return common.flat(out["hyper"]), common.flat(out["direct"])


def agreement(case, device) -> list[dict]:
    """float64 agreement rows for one case (built in float64 by the caller)."""
    rows = []
    chain = len(case.lower_names) > 1

    def row(betty, mlo_name, b, m, same, tol, note):
        rows.append({"case": case.name, "betty": betty, "mlo": mlo_name, "rel_diff": common.rel_error(b, m),
                     "same_definition": same, "tolerance": tol, "note": note})
    for pair in pairs(case):
        if pair.kind == "darts":
            exact, direct = mlo_hyper(case, pair.mlo(exact_darts=True))
            # Betty's neumann with 0 iterations and α = 1 is −Mᵀu at w' by double backward: darts' definition
            # without the central difference
            definition = betty_hyper(case, Pair("neumann", 0, 1.0), direct, device)
            row("darts definition (neumann K=0, α=1)", "Neumann(0, α=1) = −Mᵀu at w'", definition, exact, True,
                TOL["darts_definition"], "the quantity Betty's darts approximates, computed exactly by both")
            b = betty_hyper(case, pair, direct, device)
            row(f"darts R={pair.r:g}", "Neumann(0, α=1) = −Mᵀu at w'", b, exact, False, None,
                "central-difference error; on a ReLU supernet the kinks inside ±R dominate")
            fd, _ = mlo_hyper(case, pair.mlo())
            row(f"darts R={pair.r:g}", "FiniteDifference / η", b, fd / case.lower_lr(), False, None,
                "mlo: pre-update point w, real update (clip Jacobian)")
        elif pair.kind == "neumann":
            m, direct = mlo_hyper(case, pair.mlo())
            row(f"neumann K={pair.k}", f"Neumann({pair.k}, α=η)", betty_hyper(case, pair, direct, device), m, True,
                TOL["neumann"], "same series" + (", linear: per-path sum = one sweep" if chain else ""))
        else:
            for k in sorted({1, pair.k}):
                p = Pair("cg", k)
                m, direct = mlo_hyper(case, p.mlo())
                same = k == 1 and not chain
                note = ("identical at K=1" if same else
                        "CG is nonlinear in u: Betty solves once per path and sums, mlo once on the summed adjoint"
                        if k == 1 else "Betty's CG reuses the old residual in p (betty/hypergradient/cg.py:53)")
                row(f"cg K={k}", f"CG({k})", betty_hyper(case, p, direct, device), m, same,
                    TOL["cg_k1"] if same else None, note)
    return rows


def plain_vs_mlo(case: "HPO", steps: int = 3) -> float:
    """The hand-written HPO step against mlo's finite-difference step from the same start: the larger
    relative difference of the first hypergradient and of θ after ``steps`` steps."""
    step, theta, seen = case.plain()
    step()
    first = common.rel_error(seen[0], mlo_hyper(case, mlo.FiniteDifference(eps=0.01))[0])
    graph = case.mlo_graph(mlo.FiniteDifference(eps=0.01))
    stepper = mlo.Stepper(graph, nan_policy="off")
    stepper.step()
    for _ in range(steps - 1):
        step()
        stepper.step()
    return max(first, common.rel_error(graph.problems["upper"].params_tree["theta"].detach(), theta.detach()))


def _step_fn(case, framework: str, pair: Pair, device):
    if framework == "mlo":
        stepper = mlo.Stepper(case.mlo_graph(pair.mlo()), nan_policy="off")
        return stepper.step
    engine, _ = case.betty(pair, device)
    return engine.train_step


def memory_child(case_name: str, framework: str, kind: str, k: int, alpha: float, size: str, seed: int,
                 device: str, warmup: int) -> int:
    case = make_case(case_name, size, seed, device)
    return common.step_peak(lambda: _step_fn(case, framework, Pair(kind, k, alpha), device), device, warmup)


def run(args) -> dict:
    device = torch.device(args.device)
    if not betty_available():
        msg = f"Betty is not installed; skipped. Install it with: {INSTALL}"
        print(msg, file=sys.stderr)
        return {"skipped": msg, "rows": [], "agreement": [], "checks": [], "goals": [], "tolerances": TOL}
    rows, agree, checks, goals, profiles = [], [], [], [], {}
    for name in getattr(args, "cases", None) or list(CASES):
        case64 = make_case(name, args.size, args.seed, device, torch.float64)
        for r in agreement(case64, device):
            agree.append(r)
            if r["tolerance"] is not None:
                checks.append(common.check(f"{name}: Betty {r['betty']} vs mlo {r['mlo']}", r["rel_diff"],
                                           r["tolerance"]))
        if name == "hpo":
            checks.append(common.check("hpo: hand-written finite-difference step vs mlo FiniteDifference, float64, "
                                       "first hypergradient and θ after 3 steps (max rel. diff)", plain_vs_mlo(case64),
                                       TOL["plain_vs_mlo"]))
        del case64
        case = make_case(name, args.size, args.seed, device)
        for pair in pairs(case):
            fns = {"mlo": _step_fn(case, "mlo", pair, device), "betty": _step_fn(case, "betty", pair, device)}
            plain = name == "hpo" and pair.kind == "darts"
            if plain:   # the floor: the same step with no framework
                fns["plain"] = case.plain()[0]
            cpu: dict[str, list[float]] = {}
            times = common.time_interleaved(fns, args.reps, args.warmup, device, cpu=cpu, block=BLOCK[name])
            ratio = common.paired_ratio(times["mlo"], times["betty"])
            cpu_ratio = common.paired_ratio(cpu["mlo"], cpu["betty"])
            mem = {}
            if not args.no_memory and common.memory_supported(device):
                for fw in ("mlo", "betty"):
                    mem[fw] = common.isolated("benchmarks.vs_betty:memory_child", device, case_name=name, framework=fw,
                                              kind=pair.kind, k=pair.k, alpha=pair.alpha, size=args.size,
                                              seed=args.seed, device=str(device), warmup=args.warmup)
            mem_ratio, mem_note = common.memory_ratio(mem.get("mlo"), mem.get("betty"), device)
            tm, tb = common.summary(times["mlo"]), common.summary(times["betty"])
            rows.append({"case": name, "engines": pair.label, "mlo_ms": common.ms(tm["median"]),
                         "betty_ms": common.ms(tb["median"]), "time_ratio": ratio["median"],
                         "time_ratio_iqr": [ratio["q25"], ratio["q75"]], "cpu_time_ratio": cpu_ratio["median"],
                         "cpu_time_ratio_iqr": [cpu_ratio["q25"], cpu_ratio["q75"]],
                         "plain_cpu_time_ratio": common.paired_ratio(cpu["plain"], cpu["betty"])["median"]
                         if plain else None,
                         "mlo_peak_mib": common.mib(mem.get("mlo")),
                         "betty_peak_mib": common.mib(mem.get("betty")), "memory_ratio": mem_ratio})
            if pair.kind == "darts":
                profiles[name] = common.profile_mlo(fns["mlo"])
            t_goal, m_goal = GOALS[name]
            goals.append(common.goal(f"{name}, {pair.label}: time mlo / Betty", ratio["median"], t_goal))
            goals.append(common.goal(f"{name}, {pair.label}: CPU time mlo / Betty", cpu_ratio["median"], t_goal,
                                     note="process CPU time: not counting other jobs' share of the cores"))
            if m_goal is not None:
                goals.append(common.goal(f"{name}, {pair.label}: peak memory mlo / Betty", mem_ratio, m_goal,
                                         note=mem_note))
        print(f"  {name} done", file=sys.stderr)
    return {"rows": rows, "agreement": agree, "checks": checks, "goals": goals, "tolerances": TOL,
            "profile_mlo": profiles}


def markdown(result: dict) -> str:
    if result.get("skipped"):
        return result["skipped"]
    rows = [dict(r, iqr=f"{common.fmt(r['time_ratio_iqr'][0])}–{common.fmt(r['time_ratio_iqr'][1])}",
                 c_iqr=f"{common.fmt(r['cpu_time_ratio_iqr'][0])}–{common.fmt(r['cpu_time_ratio_iqr'][1])}")
            for r in result["rows"]]
    t = common.markdown_table(rows, [("case", "case"), ("engines", "Betty ↔ mlo"), ("mlo_ms", "mlo (ms/step)"),
                                     ("betty_ms", "Betty (ms/step)"), ("time_ratio", "time mlo/Betty"),
                                     ("iqr", "ratio IQR"), ("cpu_time_ratio", "CPU time mlo/Betty"),
                                     ("c_iqr", "CPU ratio IQR"),
                                     ("plain_cpu_time_ratio", "CPU time hand-written/Betty"),
                                     ("mlo_peak_mib", "mlo peak (MiB)"),
                                     ("betty_peak_mib", "Betty peak (MiB)"), ("memory_ratio", "memory mlo/Betty")])
    a = common.markdown_table(result["agreement"], [("case", "case"), ("betty", "Betty"), ("mlo", "mlo"),
                                                    ("rel_diff", "rel. difference"),
                                                    ("same_definition", "same definition"),
                                                    ("tolerance", "tolerance"), ("note", "note")])
    profiles = [common.profile_markdown(f"mlo profile, {case}, FiniteDifference", rows)
                for case, rows in result.get("profile_mlo", {}).items()]
    return "\n\n".join([t, "Hypergradient agreement (float64, first step):", a,
                        common.goals_markdown(result["goals"]), common.checks_markdown(result["checks"]), *profiles])


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.8))
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r["time_ratio"] for r in rows], 0.4, label="time")
    ax.bar([i + 0.2 for i in x], [r["memory_ratio"] or 0 for r in rows], 0.4, label="peak memory")
    ax.axhline(1.0, color="black", lw=0.8)
    for i, r in enumerate(rows):
        t_goal = GOALS[r["case"]][0]
        ax.plot([i - 0.4, i + 0.4], [t_goal, t_goal], color="red", ls="--", lw=0.8)
    ax.set_xticks(x, [f"{r['case']}\n{r['engines'].split(' ')[0]}" for r in rows], fontsize=7)
    ax.set_ylabel("mlo / Betty")
    ax.set_title("red dashes: time goal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(bad) or '(none)'}; choose from "
                                         f"{', '.join(CASES)}")
    return names


def main(argv=None) -> int:
    p = common.parser("vs_betty", __doc__.splitlines()[0], reps=5, warmup=1)
    p.add_argument("--cases", type=_cases, metavar="NAMES",
                   help=f"comma-separated subset of {', '.join(CASES)} (default: all)")
    args = common.finish_args(p.parse_args(argv))
    result = run(args)
    common.write_outputs(args, result, markdown(result), (lambda p: plot(result, p)) if result["rows"] else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
