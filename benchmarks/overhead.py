"""``python -m benchmarks.overhead``: what mlo costs over a hand-written step.

The same DARTS second-order step and the same LeaSE step, written twice:

* on ``mlo``: ``applications.lease.problems.build_problems`` + ``mlo.Stepper``
  (``nan_policy="off"``: no host synchronisation, like the hand-written code);
* as one plain PyTorch function, the way the public DARTS code writes its
  architect step (in-place ``.data`` perturbations, ``R = 0.01/‖v‖``), but in
  mlo's order and conventions so that the numbers agree: E takes its real
  optimizer step first (momentum, weight decay, gradient clip, cosine
  schedule); A's gradient is ``∂O/∂A`` plus the finite-difference mixed product
  at the pre-update point, with ``v = (∂U/∂g)ᵀu`` the VJP of the real update
  (for clipped SGD ``−η(c·u − (g_c·u)/(clip·‖g‖)·g_c)`` from the step's own
  clipped gradient ``g_c``); LeaSE adds the explanation ascent, the audience
  step and the sweep audience → explanation → explainer → A. In the
  explanation edge the clean pass ``f(x; E')`` is the same at both
  finite-difference points; the hand-written step runs it once and
  backpropagates its summed cotangent once, as mlo's ``SharedCalls`` does.

Both run from identical models and batches; after two steps in float64 every
parameter must agree (``TOL``). Time (float32) and peak memory are reported as
the ratio mlo / plain, measured in one run. Goal: ≤ 1.05 in time and memory.

Attribution: a cProfile of mlo's step and a torch.profiler count of the aten
ops mlo runs beyond the hand-written step say where the difference goes. At ``--size small`` two
more rows run tiny models on CIFAR-shaped data, whose explanation bank (25,000 × 3×32×32) is as
large as the paper's: mlo with the bank declared row-sparse (as LeaSE declares it; goal ≤ 1.1 in
time and ≤ 1.2 in memory) and, as a diagnostic, the same bank declared as one dense parameter;
the three steps are timed interleaved. ``--only bank`` runs just those rows (and the float64
check that the sparse and dense declarations agree).
"""
from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

from applications.lease import explain

from . import common, nas

TOL = {"float64_max_rel_diff": 1e-8}
GOAL = 1.05
BANK_GOAL = {"time": 1.1, "memory": 1.2}   # the paper-size bank row (issue: per-example parameters)


def _grad(loss, inputs):
    """Gradients of ``loss`` w.r.t. ``inputs``; zeros for inputs it does not use."""
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


class PlainStep:
    """One DARTS-2nd (``cfg.mode == "baseline"``) or LeaSE step, hand-written on plain PyTorch."""

    def __init__(self, fx: nas.Fixture):
        cfg = self.cfg = fx.cfg
        self.lease = cfg.mode == "lease"
        self.f, self.g, self.bank = fx.explainer, fx.audience, fx.bank
        self.E = [p for _, p in fx.explainer.named_weight_parameters()]
        self.A = [p for _, p in fx.explainer.named_arch_parameters()]
        self.opt_E, self.sched_E = self._sgd(self.E, cfg.weights)
        a = cfg.arch
        self.opt_A = torch.optim.Adam(self.A, lr=a.lr, betas=(a.beta1, a.beta2), weight_decay=a.weight_decay)
        self.it_e = itertools.cycle(fx.batches.explainer_train)
        self.it_v = itertools.cycle(fx.batches.val)
        if self.lease:
            self.W = list(fx.audience.parameters())
            self.opt_W, self.sched_W = self._sgd(self.W, cfg.audience_optim)
            self.it_a = itertools.cycle(fx.batches.audience_train)

    @staticmethod
    def _sgd(params, oc):
        opt = torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=nas.TOTAL_STEPS, eta_min=oc.lr_min)

    @staticmethod
    def _apply(opt, sched, params, grads, clip):
        """The real step: clip (in place on ``grads``), SGD, schedule. Returns (lr, ‖g‖, coef)."""
        lr = opt.param_groups[0]["lr"]
        for p, g in zip(params, grads):
            p.grad = g
        total = torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        return lr, total

    @staticmethod
    def _update_vjp(u, g_clipped, lr, total, clip):
        """``(∂U/∂g)ᵀu`` for clipped SGD: ``−lr·(c·u − (g_c·u)/(clip·‖g‖)·g_c)`` (``−lr·u`` unclipped)."""
        if clip is None:
            return [-lr * t for t in u]
        coef = torch.clamp(clip / (total + 1e-6), max=1.0)
        gu = sum((a * b).sum() for a, b in zip(g_clipped, u))
        k = torch.where(coef < 1.0, gu / (clip * total), torch.zeros_like(gu))
        return [-lr * (coef * a - k * b) for a, b in zip(u, g_clipped)]

    @staticmethod
    def _scale(v, eps):
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in v]))
        return eps / torch.clamp(n, min=torch.finfo(n.dtype).tiny)

    def _fd_params(self, params, w0, v, eps, loss_fn, wrt):
        """DARTS' central difference: perturb ``params`` in place to ``w0 ± ε v``, restore after."""
        scale = self._scale(v, eps)
        live = [p.detach().clone() for p in params]
        out = []
        for sgn in (1.0, -1.0):
            with torch.no_grad():
                for p, a, b in zip(params, w0, v):
                    p.copy_(a + (sgn * scale) * b)
            out.append(_grad(loss_fn(), wrt))
        with torch.no_grad():
            for p, t in zip(params, live):
                p.copy_(t)
        return [(a - b) / (2 * scale) for a, b in zip(*out)]

    def step(self):
        cfg, f, g = self.cfg, self.f, self.g
        clip_E = cfg.weights.grad_clip
        # 1. the explainer learns: E' = U(E, ∇ CE(f(x; E, A)))
        xe, ye, _ = next(self.it_e)
        E0 = [p.detach().clone() for p in self.E]
        gE = list(_grad(F.cross_entropy(f(xe), ye), self.E))
        lr_E, tot_E = self._apply(self.opt_E, self.sched_E, self.E, gE, clip_E)
        if self.lease:
            # 2. the explainer explains (ascent on the batch's rows of the bank), with A as a constant
            xa, ya, idx = next(self.it_a)
            lr_D = cfg.explain.lr
            D0 = self.bank.detach()[idx]
            d = D0.clone().requires_grad_()
            (gD,) = _grad(-explain.explanation_loss(f(xa + d), f(xa)), d)
            D1 = D0.add(gD, alpha=-lr_D)
            with torch.no_grad():
                self.bank[idx] = D1
            # 3. the audience learns on x ⊙ δ'
            clip_W = cfg.audience_optim.grad_clip
            W0 = [p.detach().clone() for p in self.W]
            kind = cfg.explain.reweight
            gW = list(_grad(F.cross_entropy(g(explain.reweight(xa, D1, kind)), ya), self.W))
            lr_W, tot_W = self._apply(self.opt_W, self.sched_W, self.W, gW, clip_W)
        # 4. the architecture: direct gradient and the adjoints at E' (and W')
        xv, yv, _ = next(self.it_v)
        logits = f(xv)
        O = F.cross_entropy(logits, yv)
        targets = self.A + self.E + (self.W if self.lease else [])
        if self.lease:
            O = O + cfg.gamma * F.cross_entropy(g(xv), yv)
        grads = _grad(O, targets)
        nA, nE = len(self.A), len(self.E)
        gA, uE = list(grads[:nA]), list(grads[nA:nA + nE])
        if self.lease:
            uW = grads[nA + nE:]
            # audience edge: adjoint at Δ' (the batch's rows)
            vW = self._update_vjp(uW, gW, lr_W, tot_W, clip_W)
            d1 = D1.detach().requires_grad_()
            (uD,) = self._fd_params(self.W, W0, vW, cfg.engines.audience.eps,
                                    lambda: F.cross_entropy(g(explain.reweight(xa, d1, kind)), ya), [d1])
            # explanation edge: adjoint at E' (the bank is an input, perturbed out of place);
            # the clean pass f(x; E') is the same at both points: run once, backpropagated once
            vD = -lr_D * uD
            scale = self._scale([vD], cfg.engines.explanation.eps)
            clean = f(xa)
            cut = clean.detach().requires_grad_()
            out, cot = [], []
            for sgn in (1.0, -1.0):
                dp = D0 + (sgn * scale) * vD
                *gE_s, gc = _grad(-explain.explanation_loss(f(xa + dp), cut), self.E + [cut])
                out.append(gE_s)
                cot.append(gc)
            through = torch.autograd.grad(clean, self.E, grad_outputs=cot[0] - cot[1], allow_unused=True,
                                          materialize_grads=True)
            uE = [u + (a - b + t) / (2 * scale) for u, a, b, t in zip(uE, *out, through)]
        # explainer edge: A's hypergradient, mixed product at the pre-update point E
        vE = self._update_vjp(uE, gE, lr_E, tot_E, clip_E)
        hA = self._fd_params(self.E, E0, vE, cfg.engines.explainer.eps, lambda: F.cross_entropy(f(xe), ye), self.A)
        for p, a, b in zip(self.A, gA, hA):
            p.grad = a + b
        self.opt_A.step()
        self.opt_A.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- variants
VARIANTS = ("mlo", "plain")
DENSE = "mlo_dense_bank"   # mlo with the explanation bank declared as one dense parameter (diagnostic)


BANK_CASE = "tiny@paper"   # tiny models on CIFAR-shaped data: the explanation bank has 25,000 rows of 3×32×32


ACTIVE_CLIP = {"weights.grad_clip": 0.01, "audience_optim.grad_clip": 0.01}   # every step clipped


def build(variant: str, mode: str, size: str, seed: int, device, dtype=torch.float32, **extra):
    """``(step(), fixture)`` for ``variant`` in ``VARIANTS``; ``size`` may be ``"models@data"``;
    ``extra`` overrides config keys."""
    models, _, data = size.partition("@")
    cfg = nas.config(models, mode=mode, dtype="float64" if dtype == torch.float64 else "float32", **extra)
    fx = nas.fixture(cfg, data or models, seed, device, dtype)
    if variant == "mlo":
        return nas.mlo_step(fx)[0], fx
    if variant == DENSE:
        import mlo
        from applications.lease.problems import build_problems
        problems = build_problems(fx.cfg, fx.explainer, fx.audience, fx.bank, fx.batches, nas.TOTAL_STEPS,
                                  sparse_bank=False)
        return mlo.Stepper(mlo.Graph(problems), nan_policy="off").step, fx
    return PlainStep(fx).step, fx


def params_of(fx: nas.Fixture) -> dict:
    out = {f"E.{k}": v for k, v in fx.explainer.named_weight_parameters()}
    out.update({f"A.{k}": v for k, v in fx.explainer.named_arch_parameters()})
    if fx.audience is not None:
        out.update({f"W.{k}": v for k, v in fx.audience.named_parameters()})
        out["bank"] = fx.bank
    return out


def max_rel_diff(mode: str, size: str, seed: int, device, dtype, steps: int = 2, variant: str = "plain",
                 **extra) -> float:
    """Largest relative difference of any parameter tensor after ``steps`` steps of mlo and ``variant``."""
    worst = 0.0
    step_m, fm = build("mlo", mode, size, seed, device, dtype, **extra)
    step_p, fp = build(variant, mode, size, seed, device, dtype, **extra)
    for _ in range(steps):
        step_m()
        step_p()
    pm, pp = params_of(fm), params_of(fp)
    for k in pm:
        a, b = pm[k].detach().double(), pp[k].detach().double()
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst


def memory_child(variant: str, mode: str, size: str, seed: int, device: str, warmup: int) -> int:
    return common.step_peak(lambda: build(variant, mode, size, seed, device)[0], device, warmup)


def profile_mlo(mode: str, size: str, seed: int, device) -> list[dict]:
    step, _ = build("mlo", mode, size, seed, device)
    step()
    return common.profile_mlo(step)


def op_counts(variant: str, mode: str, size: str, seed: int, device) -> dict:
    """``{aten op: (calls, self CPU ms)}`` in one step (after two warm-up steps), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    step, _ = build(variant, mode, size, seed, device)
    step()
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    return {e.key: (e.count, e.self_cpu_time_total / 1000.0) for e in prof.key_averages()}


def op_diff(mode: str, size: str, seed: int, device, top: int = 12) -> list[dict]:
    """The ops mlo runs more often than the hand-written step (call counts are exact; times are noisy)."""
    m = op_counts("mlo", mode, size, seed, device)
    p = op_counts("plain", mode, size, seed, device)
    rows = [{"op": k, "mlo_calls": m.get(k, (0, 0))[0], "plain_calls": p.get(k, (0, 0))[0],
             "extra_calls": m.get(k, (0, 0))[0] - p.get(k, (0, 0))[0],
             "extra_self_ms": m.get(k, (0, 0.0))[1] - p.get(k, (0, 0.0))[1]} for k in set(m) | set(p)]
    rows = [r for r in rows if r["op"].startswith(("aten::", "autograd::engine")) and r["extra_calls"] > 0]
    rows.sort(key=lambda r: -r["extra_calls"])
    return rows[:top]


def run(args) -> dict:
    device = torch.device(args.device)
    rows, checks, goals, profiles, diffs = [], [], [], {}, {}
    only_bank = getattr(args, "only", "all") == "bank"
    if only_bank and args.size != "small":
        raise SystemExit("error: --only bank needs --size small (the bank rows run tiny models on CIFAR-sized data)")
    cases = [] if only_bank else [("baseline", "DARTS-2nd", args.size, True),
                                  ("lease", "LeaSE (ResNet-18)", args.size, True)]
    if args.size == "small":   # the paper's explanation bank: row-sparse (LeaSE's declaration) and dense
        cases.append(("lease", "LeaSE, tiny models, CIFAR-sized bank", BANK_CASE, False))
    for mode, label in () if only_bank else (("baseline", "DARTS-2nd"), ("lease", "LeaSE")):
        # the clip's Jacobian in the update VJP, exercised on every step (tiny models, any --size)
        checks.append(common.check(f"{label}, clip active (grad_clip=0.01, tiny): mlo vs plain, float64",
                                   max_rel_diff(mode, "tiny", args.seed, device, torch.float64, **ACTIVE_CLIP),
                                   TOL["float64_max_rel_diff"]))
    if args.size == "small":   # the two declarations of the bank agree (tiny models, float64)
        checks.append(common.check("LeaSE: row-sparse bank vs dense bank (tiny), float64, 2 steps",
                                   max_rel_diff("lease", "tiny", args.seed, device, torch.float64, variant=DENSE),
                                   TOL["float64_max_rel_diff"]))
    for mode, label, size, full in cases:
        bank = size == BANK_CASE
        diff64 = diff32 = None
        if full:
            diff64 = max_rel_diff(mode, size, args.seed, device, torch.float64)
            # float32: informational (Adam's first steps are sign(g), so near-zero coordinates can flip)
            diff32 = None if size == "tiny" else max_rel_diff(mode, size, args.seed, device, torch.float32)
            checks.append(common.check(f"{label}: mlo vs plain, float64, 2 steps (max rel. diff)", diff64,
                                       TOL["float64_max_rel_diff"]))
        variants = VARIANTS + ((DENSE,) if bank else ())
        fns = {v: build(v, mode, size, args.seed, device)[0] for v in variants}
        cpu: dict[str, list[float]] = {}
        times = common.time_interleaved(fns, args.reps, args.warmup, device, cpu=cpu)
        del fns
        mem = {}
        if not args.no_memory and common.memory_supported(device):
            for v in variants:
                mem[v] = common.isolated("benchmarks.overhead:memory_child", device, variant=v, mode=mode,
                                         size=size, seed=args.seed, device=str(device), warmup=args.warmup)
        tp = common.summary(times["plain"])
        for v, row_label in (("mlo", label), (DENSE, f"{label}, dense bank (diagnostic)")):
            if v not in times:
                continue
            ratio = common.paired_ratio(times[v], times["plain"])
            cpu_ratio = common.paired_ratio(cpu[v], cpu["plain"])
            mem_ratio, mem_note = common.memory_ratio(mem.get(v), mem.get("plain"), device)
            tm = common.summary(times[v])
            rows.append({"step": row_label, "mode": mode, "size": size, "mlo_ms": common.ms(tm["median"]),
                         "mlo_iqr_ms": [common.ms(tm["q25"]), common.ms(tm["q75"])],
                         "plain_ms": common.ms(tp["median"]),
                         "plain_iqr_ms": [common.ms(tp["q25"]), common.ms(tp["q75"])],
                         "time_ratio": ratio["median"], "time_ratio_iqr": [ratio["q25"], ratio["q75"]],
                         "cpu_time_ratio": cpu_ratio["median"], "cpu_time_ratio_iqr": [cpu_ratio["q25"], cpu_ratio["q75"]],
                         "mlo_peak_mib": common.mib(mem.get(v)), "plain_peak_mib": common.mib(mem.get("plain")),
                         "memory_ratio": mem_ratio, "float64_max_rel_diff": diff64 if v == "mlo" else None,
                         "float32_max_rel_diff": diff32 if v == "mlo" else None})
            if bank and v == "mlo":
                goals.append(common.goal(f"{label}: time mlo / plain", ratio["median"], BANK_GOAL["time"]))
                goals.append(common.goal(f"{label}: peak memory mlo / plain", mem_ratio, BANK_GOAL["memory"],
                                         note=mem_note))
        ratio = common.paired_ratio(times["mlo"], times["plain"])
        cpu_ratio = common.paired_ratio(cpu["mlo"], cpu["plain"])
        mem_ratio, mem_note = common.memory_ratio(mem.get("mlo"), mem.get("plain"), device)
        if full:
            goals.append(common.goal(f"{label}: time mlo / plain", ratio["median"], GOAL))
            goals.append(common.goal(f"{label}: CPU time mlo / plain", cpu_ratio["median"], GOAL,
                                     note="process CPU time: not counting other jobs' share of the cores"))
            goals.append(common.goal(f"{label}: peak memory mlo / plain", mem_ratio, GOAL, note=mem_note))
            profiles[label] = profile_mlo(mode, size, args.seed, device)
            if size != "tiny":
                diffs[label] = op_diff(mode, size, args.seed, device)
        print(f"  {label} done", file=sys.stderr)
    return {"rows": rows, "checks": checks, "goals": goals, "tolerances": TOL, "profile_mlo": profiles,
            "extra_ops": diffs}


def markdown(result: dict) -> str:
    rows = [dict(r, t_iqr=f"{common.fmt(r['time_ratio_iqr'][0])}–{common.fmt(r['time_ratio_iqr'][1])}",
                 c_iqr=f"{common.fmt(r['cpu_time_ratio_iqr'][0])}–{common.fmt(r['cpu_time_ratio_iqr'][1])}")
            for r in result["rows"]]
    cols = [("step", "step"), ("mlo_ms", "mlo (ms)"), ("plain_ms", "plain (ms)"), ("time_ratio", "time mlo/plain"),
            ("t_iqr", "ratio IQR"), ("cpu_time_ratio", "CPU time mlo/plain"), ("c_iqr", "CPU ratio IQR"),
            ("mlo_peak_mib", "mlo peak (MiB)"), ("plain_peak_mib", "plain peak (MiB)"),
            ("memory_ratio", "memory mlo/plain"), ("float64_max_rel_diff", "max rel. diff (f64)"),
            ("float32_max_rel_diff", "max rel. diff (f32)")]
    parts = [common.markdown_table(rows, cols), common.goals_markdown(result["goals"]),
             common.checks_markdown(result["checks"])]
    for label, prof in result["profile_mlo"].items():
        parts.append(common.profile_markdown(f"mlo profile, {label}", prof))
    for label, ops in result["extra_ops"].items():
        parts.append(f"Ops mlo runs beyond plain in one step, {label} (torch.profiler):\n\n"
                     + common.markdown_table(ops, [("op", "op"), ("mlo_calls", "mlo calls"),
                                                   ("plain_calls", "plain calls"),
                                                   ("extra_calls", "extra calls"), ("extra_self_ms", "extra self ms")]))
    return "\n\n".join(parts)


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [r["step"] for r in result["rows"]]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [r["time_ratio"] for r in result["rows"]], 0.4, label="time",
           yerr=[[r["time_ratio"] - r["time_ratio_iqr"][0] for r in result["rows"]],
                 [r["time_ratio_iqr"][1] - r["time_ratio"] for r in result["rows"]]])
    ax.bar([i + 0.2 for i in x], [r["memory_ratio"] or 0 for r in result["rows"]], 0.4, label="peak memory")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(GOAL, color="red", ls="--", lw=0.8, label=f"goal {GOAL}")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("mlo / plain PyTorch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = common.parser("overhead", __doc__.splitlines()[0], reps=5, warmup=1)
    p.add_argument("--only", choices=("all", "bank"), default="all",
                   help="bank: only the CIFAR-sized bank rows (row-sparse and dense) and their check")
    args = common.finish_args(p.parse_args(argv))
    result = run(args)
    common.write_outputs(args, result, markdown(result), lambda p: plot(result, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
