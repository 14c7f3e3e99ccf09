"""``python -m benchmarks.lease_signal``: what steers LeaSE's architecture, along real searches.

The architecture's one-step hypergradient splits into three parts (docs/lease.md, "The four
problems"):

* **direct**: ∂O_A/∂A with E′ and W′ held (what first-order DARTS uses);
* **DARTS**: the explainer edge alone, (∂E′/∂A)ᵀ ∂O_A/∂E′ (DARTS' second-order term);
* **chain**: what flows A → E′ → Δ′ → W′ → the audience's validation loss, measured as the
  total minus the total with the explanation and audience edges set to ``FirstOrder``.

A search of each preset runs in-process (the application's own ``prepare`` /
``build_problems``; warm-up as the search program runs it) and its graph state is kept at
initialisation, the end of the warm-up, the middle and the end. At each point, on one fixed set
of batches, the parts are computed with the exact one-step engine (``unrolled``) in float64 (the
reference; the float32 state cast up) and in float32, and with finite differences (``FiniteDifference``,
DARTS' Eq. 11 radius ``eps/‖v‖``) for an eps sweep, in both precisions: each FD part's relative error
and cosine against the float64 exact part. Each link of the chain is reported as the norm of what
crosses it: ‖u_W‖ = ‖∂O_A/∂W′‖, ‖u_Δ‖ = ‖(∂W′/∂Δ′)ᵀu_W‖ and ‖(∂Δ′/∂E′)ᵀu_Δ‖ (what the chain adds to E′'s
adjoint), all from ``mlo.hypergradient(..., return_adjoints=True)``.

Presets: ``digits`` (the default search), ``synthetic`` (the known-answer task) and ``cifar-small``
(the paper's CIFAR-10 DARTS-2nd/ResNet-18 preset — learning rates, momentum, weight decay, γ,
architecture lr 3e-4, no warm-up, explanation init ±0.03 with ``mul`` reweighting, FD eps 0.01,
cosine horizon of 50 epochs — on a small supernet and audience and tiny random 3×8×8 images).

``--set KEY=VALUE`` changes a search setting of every preset (e.g. ``gamma=10``,
``weights.lr=0.1``, ``explain.init_scale=0.03``). ``--sweep`` reports the chain's share
(‖chain‖ / ‖direct‖, exact float64 parts) along digits searches: whole searches with one setting
changed (:data:`SWEEP_SEARCHES`: warm-up, the paper's explanation scale), and at each point of the
preset's search the state with one thing changed (:data:`WHATIF`: γ, the step sizes ξ_E, ξ_Δ, ξ_W the
one-step unrolling uses, the explanations' scale, a re-initialised audience).
``--runs DIR ...`` reports the parts at the last checkpoint of finished search runs (e.g. a study's).
``--quick``: tiny searches (seconds, for the tests).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

import mlo
from applications.common import load_config
from applications.lease.config import SearchConfig
from applications.lease.prepare import Setup, build_explainer, prepare
from applications.lease.problems import Loaders, build_problems
from applications.lease.spaces import SPACES

from . import common

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "applications", "lease", "configs")
EDGES = ("explainer", "explanation", "audience")
PRESETS = {
    "digits": ("digits.yaml", []),
    "synthetic": ("synthetic.yaml", []),
    # the paper's preset, small: supernet and audience shrunk, 48 search steps on tiny random data
    "cifar-small": ("cifar10-darts-2nd-resnet18.yaml",
                    ["space.C=4", "space.layers=3", "audience.width=0.125", "data.batch_size=32",
                     "data.num_workers=0", "epochs=2", "max_steps_per_epoch=24"]),
}
PAPER_EPOCHS, PAPER_STEPS_PER_EPOCH = 50, 391       # CIFAR-10 DARTS: 25k images, batch 64 (cosine horizon)
QUICK = ["space.C=2", "space.layers=3", "space.nodes=2", "data.batch_size=8", "audience.width=0.0625",
         "epochs=2", "max_steps_per_epoch=2"]
EPS_F64 = (1e-2, 1e-4, 1e-6)
EPS_F32 = (1e-2, 1e-4)
# --sweep: what the paper fixes or leaves open. Whole searches of the digits preset with one setting
# changed (the trajectory changes) ...
SWEEP_SEARCHES = {
    "preset": [],
    "no warm-up": ["arch_start_epoch=0"],
    "paper explanations (init ±0.03, mul)": ["explain.init_scale=0.03", "explain.reweight=mul"],
}
# ... and, at each point of the preset's own search, one thing changed in the state the one-step
# hypergradient is taken at (the step sizes the unrolling uses, γ, the explanations' scale, the audience)
WHATIF = {
    "γ = 10": {"gamma": 10.0},
    "ξ_E, ξ_W at their initial 0.05 (no annealing)": {"lr": {"explainer": "initial", "audience": "initial"}},
    "ξ_E = ξ_W = 0.2": {"lr": {"explainer": 0.2, "audience": 0.2}},
    "ξ_Δ = 10": {"lr": {"explanation": 10.0}},
    "explanations ×4": {"bank_scale": 4.0},
    "fresh audience (re-initialised W)": {"fresh_audience": True},
}


# ----------------------------------------------------------------------------- the search
def search_config(preset: str, sets: list[str], quick: bool) -> SearchConfig:
    path, preset_sets = PRESETS[preset]
    extra = (["data.root=unused"] if preset == "cifar-small" else []) + list(preset_sets) + list(sets)
    if quick:
        extra += QUICK
    return load_config(SearchConfig, os.path.join(CONFIGS, path), ["device=cpu", "dtype=float32", *extra])


def _random_setup(cfg: SearchConfig) -> Setup:
    """Tiny random CIFAR-shaped data (3×8×8, 10 classes) in place of the data folder."""
    gen = torch.Generator().manual_seed(cfg.seed)
    bs, n_batches, shape, classes = cfg.data.batch_size, cfg.max_steps_per_epoch or 8, (3, 8, 8), 10
    rows = bs * n_batches

    def source(with_rows: bool):
        order = torch.randperm(rows, generator=gen)
        return [(torch.randn(bs, *shape, generator=gen), torch.randint(0, classes, (bs,), generator=gen),
                 order[b * bs:(b + 1) * bs] if with_rows else torch.arange(bs)) for b in range(n_batches)]

    class Data:     # what build_explainer reads of a dataset
        in_channels, num_classes = shape[0], classes
    from applications.lease import explain
    from applications.lease.models.resnet import build_audience
    torch.manual_seed(cfg.seed)
    audience = build_audience(cfg.audience.name, classes, shape[0], cfg.audience.width)
    bank = explain.init_bank(rows, shape, cfg.explain.init_scale, gen, torch.float32).detach().requires_grad_(True)
    return Setup(Data(), Loaders(source(False), source(True), source(False)), n_batches, audience, bank, torch.float32)


def run_search(cfg: SearchConfig, horizon: int | None = None):
    """Run the search step by step; returns ``(models, states, steps, batches)``: the graph state at
    initialisation, the end of the warm-up, the middle and the end, and one fixed batch per source."""
    setup = _random_setup(cfg) if cfg.data.name != "digits" and cfg.data.name != "synthetic" else \
        prepare(cfg, mlo.distributed.Env(0, 1, 0, torch.device("cpu"), None))
    space = SPACES[cfg.space.name]
    explainer = build_explainer(cfg, space, setup, 0, {}, torch.device("cpu"))
    total = cfg.epochs * setup.steps_per_epoch
    graph = mlo.Graph(build_problems(cfg, explainer, setup.audience, setup.bank, setup.loaders, horizon or total))
    stepper = mlo.Stepper(graph, nan_policy="raise")
    warm = cfg.arch_start_epoch * setup.steps_per_epoch
    if warm:
        at = sorted({0, warm, (warm + total) // 2, total})
    else:
        at = sorted({0, total // 3, 2 * total // 3, total})
    states, t0 = {}, time.process_time()
    for step in range(total + 1):
        if step in at:
            states[step] = mlo.graph_state_dict(graph)
        if step == total:
            break
        stepper.step({"architecture"} if step < warm else frozenset())
    batches = [next(iter(src)) for src in (setup.loaders.explainer_train, setup.loaders.audience_train,
                                           setup.loaders.val)]
    models = (explainer, setup.audience, setup.bank)
    return models, states, at, warm, [tuple(t.cpu() for t in b) for b in batches], time.process_time() - t0


# ----------------------------------------------------------------------------- the parts at one point
def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: (v if k == "step" else _cast(v, dtype)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


def what_if(cfg: SearchConfig, models, state: dict, change: dict):
    """``(cfg, state)`` with one :data:`WHATIF` change applied (copies; the originals are kept)."""
    cfg, state = copy.deepcopy(cfg), copy.deepcopy(state)
    if "gamma" in change:
        cfg.gamma = change["gamma"]
    for name, lr in change.get("lr", {}).items():
        for group in state["problems"][name]["optimizer"]["param_groups"]:
            group["lr"] = group.get("initial_lr", group["lr"]) if lr == "initial" else lr
    if "bank_scale" in change:
        prm = state["problems"]["explanation"]["params"]
        for k in prm:
            prm[k] = prm[k] * change["bank_scale"]
    if change.get("fresh_audience"):
        fresh = copy.deepcopy(models[1])
        with mlo.rng.preserved():
            torch.manual_seed(0)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        state["problems"]["audience"]["params"] = {k: v.detach().clone() for k, v in fresh.named_parameters()}
        state["problems"]["audience"]["optimizer"]["state"] = {}      # no momentum from the old weights
    return cfg, state


def engines(kind: str, eps: float | None = None) -> dict:
    """Engine spec per edge: ``exact`` / ``fd`` on every edge, or ``*-explainer`` (the other two first order)."""
    spec = {"name": "unrolled"} if kind.startswith("exact") else {"name": "finite_difference", "eps": eps}
    if kind.endswith("-explainer"):
        return {"explainer": spec, "explanation": {"name": "first_order"}, "audience": {"name": "first_order"}}
    return {e: dict(spec) for e in EDGES}


def hypergradient(cfg: SearchConfig, models, state: dict, batches, dtype: torch.dtype, edge_engines: dict,
                  horizon: int) -> dict:
    """``mlo.hypergradient`` of the architecture with ``edge_engines``, the models at ``state`` in ``dtype``."""
    cfg = copy.deepcopy(cfg)
    for e in EDGES:    # engines as objects: what the config holds after loading
        setattr(cfg.engines, e, mlo.engine_from_config(edge_engines[e], where=f"engines.{e}"))
    cfg.engines.validate()
    explainer = copy.deepcopy(models[0]).to(dtype)
    audience = None if models[1] is None else copy.deepcopy(models[1]).to(dtype)
    bank = None if models[2] is None else models[2].detach().to(dtype).clone().requires_grad_(True)
    fixed = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
    graph = mlo.Graph(build_problems(cfg, explainer, audience, bank, Loaders(*([b] for b in fixed)), horizon))
    mlo.load_graph_state_dict(graph, _cast(state, dtype), data=False)
    lease = cfg.mode == "lease"
    out = mlo.hypergradient(graph, "architecture", return_adjoints=lease)
    res = {k: common.flat(out[k]) for k in ("total", "direct")}
    if lease:
        res["u_explainer"] = common.flat(out["adjoints"]["explainer"])
        if "audience" in out["adjoints"]:
            res["u_audience"] = common.flat(out["adjoints"]["audience"])
            res["u_explanation"] = common.flat(out["adjoints"]["explanation"])
    return res


def parts(cfg, models, state, batches, dtype, kind: str, horizon: int, eps: float | None = None) -> dict:
    """direct, DARTS and chain parts (and the link norms) with ``kind`` (``exact`` or ``fd``) engines."""
    whole = hypergradient(cfg, models, state, batches, dtype, engines(kind, eps), horizon)
    first = hypergradient(cfg, models, state, batches, dtype, engines(kind + "-explainer", eps), horizon)
    out = {"direct": whole["direct"], "darts": first["total"] - whole["direct"],
           "chain": whole["total"] - first["total"], "total": whole["total"]}
    links = {}
    if "u_audience" in whole:
        links = {"u_W": float(whole["u_audience"].norm()), "u_delta": float(whole["u_explanation"].norm()),
                 "chain_into_E": float((whole["u_explainer"] - first["u_explainer"]).norm()),
                 "dO_dE": float(first["u_explainer"].norm())}
    return out, links


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float(a.norm() * b.norm())
    return float(a @ b) / d if d > 0 else math.nan


def point_rows(preset, cfg, models, state, step, batches, horizon, fd: bool, eps64, eps32) -> tuple[dict, list]:
    """The norms at one point (exact, float64) and FD's and float32's errors per part."""
    ref, links = parts(cfg, models, state, batches, torch.float64, "exact", horizon)
    norm = {k: float(v.norm()) for k, v in ref.items()}
    row = {"preset": preset, "step": step, "direct": norm["direct"], "darts": norm["darts"], "chain": norm["chain"],
           "total": norm["total"], "chain_share": norm["chain"] / norm["direct"] if norm["direct"] else math.nan,
           "darts_share": norm["darts"] / norm["direct"] if norm["direct"] else math.nan,
           "sum_error": common.rel_error(ref["direct"] + ref["darts"] + ref["chain"], ref["total"]), **links}
    errors = []
    if not fd:
        return row, errors
    runs = [("float32", "exact", None)] + [("float64", "fd", e) for e in eps64] + [("float32", "fd", e) for e in eps32]
    for prec, kind, eps in runs:
        got, _ = parts(cfg, models, state, batches, torch.float64 if prec == "float64" else torch.float32, kind,
                       horizon, eps)
        err = {"preset": preset, "step": step, "precision": prec, "engine": kind if eps is None else f"fd eps={eps:g}"}
        for k in ("darts", "chain", "total"):
            err[f"{k}_rel_error"] = common.rel_error(got[k], ref[k])
            err[f"{k}_cosine"] = cosine(got[k].double(), ref[k])
        errors.append(err)
    return row, errors


def study_preset(preset: str, sets: list[str], quick: bool, fd: bool = True, log=print,
                 what_ifs: dict | None = None) -> dict:
    cfg = search_config(preset, sets, quick)
    horizon = None
    if preset == "cifar-small" and not quick:
        horizon = PAPER_EPOCHS * PAPER_STEPS_PER_EPOCH
    models, states, at, warm, batches, seconds = run_search(cfg, horizon=horizon)
    total = max(at)       # the search's length: the schedules' horizon unless ``horizon`` is set
    log(f"  {preset}: search of {max(at)} steps in {seconds:.0f} s CPU (points {at})")
    rows, errors = [], []
    for step in at:
        t0 = time.process_time()
        row, errs = point_rows(preset, cfg, models, states[step], step, batches, horizon or total, fd,
                               EPS_F64[:1] if quick else EPS_F64, EPS_F32[:1] if quick else EPS_F32)
        row["warmup_end"] = warm
        rows.append(row)
        errors += errs
        log(f"    step {step}: chain/direct {row['chain_share']:.3g} ({time.process_time() - t0:.0f} s CPU)")
        for label, change in (what_ifs or {}).items():
            c, st = what_if(cfg, models, states[step], change)
            r, _ = point_rows(preset, c, models, st, step, batches, horizon or total, False, (), ())
            rows.append(dict(r, warmup_end=warm, what_if=label))
            log(f"    step {step}, {label}: chain/direct {r['chain_share']:.3g}")
    return {"rows": rows, "errors": errors, "search_cpu_s": seconds}


def finished_run(folder: str) -> dict:
    """The three parts (exact, float64) at the last checkpoint of a search run folder (``--runs``):
    its ``config.yaml`` and ``checkpoint.pt``, the models rebuilt by the application's builders."""
    cfg = load_config(SearchConfig, os.path.join(folder, "config.yaml"), ["device=cpu"])
    setup = prepare(cfg, mlo.distributed.Env(0, 1, 0, torch.device("cpu"), None))
    explainer = build_explainer(cfg, SPACES[cfg.space.name], setup, 0, {}, torch.device("cpu"))
    total = cfg.epochs * setup.steps_per_epoch
    graph = mlo.Graph(build_problems(cfg, explainer, setup.audience, setup.bank, setup.loaders, total))
    ckpt = mlo.read_checkpoint(os.path.join(folder, "checkpoint.pt"))
    mlo.load_graph_state_dict(graph, ckpt.graph_state, data=False)
    batches = [tuple(t.cpu() for t in next(iter(src))) for src in
               (setup.loaders.explainer_train, setup.loaders.audience_train, setup.loaders.val)]
    row, _ = point_rows(folder, cfg, (explainer, setup.audience, setup.bank), mlo.graph_state_dict(graph),
                        ckpt.step, batches, total, False, (), ())
    return dict(row, warmup_end=cfg.arch_start_epoch * setup.steps_per_epoch)


# ----------------------------------------------------------------------------- program
def run(args) -> dict:
    sets = list(args.set or [])
    rows, errors, sweep = [], [], []
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.runs:
        for folder in args.runs:
            rows.append(finished_run(folder))
            log(f"  {folder}: chain/direct {rows[-1]['chain_share']:.3g}")
    elif args.sweep:
        for label, extra in SWEEP_SEARCHES.items():
            if args.only and label not in args.only:
                continue
            res = study_preset("digits", sets + extra, args.quick, fd=False, log=log,
                               what_ifs=WHATIF if label == "preset" else None)
            for r in res["rows"]:
                sweep.append({"setting": label if r.get("what_if") is None else f"preset, {r['what_if']}", **r})
    else:
        for preset in args.presets:
            res = study_preset(preset, sets, args.quick, log=log)
            rows += res["rows"]
            errors += res["errors"]
    checks = [common.check(f"{r.get('setting', r['preset'])} step {r['step']}: direct + DARTS + chain = total "
                           "(float64, rel.)",
                           r["sum_error"], 1e-10) for r in rows + sweep]
    return {"rows": rows or sweep, "errors": errors, "sweep": bool(args.sweep), "sets": sets, "checks": checks,
            "goals": [], "tolerances": {"sum_error": 1e-10}}


def markdown(result: dict) -> str:
    main = [("step", "step"), ("direct", "‖direct‖"), ("darts", "‖DARTS 2nd‖"), ("chain", "‖chain‖"),
            ("chain_share", "chain / direct"), ("u_W", "‖u_W‖"), ("u_delta", "‖u_Δ‖"),
            ("chain_into_E", "‖(∂Δ′/∂E′)ᵀu_Δ‖"), ("dO_dE", "‖∂O/∂E′‖")]
    lead = [("setting", "setting")] if result["sweep"] else [("preset", "preset")]
    out = [common.markdown_table(result["rows"], lead + main)]
    if result["errors"]:
        cols = [("preset", "preset"), ("step", "step"), ("precision", "precision"), ("engine", "engine")]
        for k in ("darts", "chain", "total"):
            cols += [(f"{k}_rel_error", f"{k} rel. err"), (f"{k}_cosine", f"{k} cos")]
        out.append("Errors against the exact float64 part:\n\n" + common.markdown_table(result["errors"], cols))
    out.append(common.checks_markdown(result["checks"]))
    return "\n\n".join(out)


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    key = "setting" if result["sweep"] else "preset"
    groups = list(dict.fromkeys(r[key] for r in result["rows"]))
    if result["sweep"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for g in groups:
            rs = [r for r in result["rows"] if r[key] == g]
            ax.plot([r["step"] for r in rs], [max(r["chain_share"], 1e-12) for r in rs], marker="o", label=g)
        ax.axhline(0.1, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("search step (digits)")
        ax.set_ylabel("‖chain‖ / ‖direct‖")
        ax.legend(fontsize=7)
    else:
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
        for ax, g in zip(axes[0], groups):
            rs = [r for r in result["rows"] if r[key] == g]
            for part, style in (("direct", "o-"), ("darts", "s-"), ("chain", "^-")):
                ax.plot([r["step"] for r in rs], [max(r[part], 1e-16) for r in rs], style, label=part)
            if rs and rs[0]["warmup_end"]:
                ax.axvline(rs[0]["warmup_end"], color="grey", ls=":", lw=1)
            ax.set_yscale("log")
            ax.set_title(g)
            ax.set_xlabel("search step")
        axes[0][0].set_ylabel("norm (exact, float64)")
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lease_signal", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default runs/bench-lease_signal)")
    parser.add_argument("--presets", default="digits,synthetic,cifar-small",
                        help=f"comma-separated subset of {', '.join(PRESETS)}")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="a search setting for every preset")
    parser.add_argument("--sweep", action="store_true",
                        help="the chain's share along digits searches: SWEEP_SEARCHES and, at the preset's points, "
                             "WHATIF")
    parser.add_argument("--only", help="--sweep: comma-separated subset of the settings' labels")
    parser.add_argument("--runs", nargs="+", metavar="DIR",
                        help="instead: the parts at the last checkpoint of each search run folder (a LeaSE search)")
    parser.add_argument("--quick", action="store_true", help="tiny searches (seconds)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    bad = [p for p in args.presets if p not in PRESETS]
    if bad:
        parser.error(f"--presets: unknown {bad[0]!r}; choose from {', '.join(PRESETS)}")
    args.only = [s.strip() for s in args.only.split(",")] if args.only else None
    default_out = os.path.join("runs", "bench-lease_signal" + ("-sweep" if args.sweep else ""))
    ns = argparse.Namespace(out=args.out or default_out,
                            bench_name="lease_signal", size="tiny" if args.quick else "small", device="cpu", reps=1,
                            warmup=0, no_memory=True, git_commit=common._git_commit())
    torch.set_num_threads(args.threads)
    common.tune_cpu()
    result = run(args)
    common.write_outputs(ns, result, markdown(result), lambda p: plot(result, p))
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
