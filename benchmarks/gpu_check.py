"""``python -m benchmarks.gpu_check``: one prepared check for a CUDA machine, in under 8 minutes.

A GPU is lent for minutes at a time, so everything worth measuring on one is in
this single command::

    python -m benchmarks.gpu_check --out runs/gpu-check        # on a CUDA machine
    python -m benchmarks.gpu_check --dry --out runs/gpu-dry    # anywhere: tiny sizes (the tests)

It measures:

1. **Step time and peak memory** of DARTS-2nd, LeaSE-R18 and LeaSE-R50, each
   built from its CIFAR-10 preset (``applications/lease/configs/cifar10-darts-2nd-*.yaml``:
   C=16, 8 cells, 4 nodes, batch 64, finite difference on every edge, full-width
   ResNets, the 25,000-row explanation bank) on random 3×32×32 data, in fp32 and
   with the search's bf16 autocast (``bf16: true``: ``mlo.precision.Autocast`` on
   the real passes, the engines in fp32). Per case: warm-up steps, then timed
   full steps alternating with weights-only steps (the architecture skipped, as
   in a preset's warm-up epochs); ``torch.cuda.max_memory_allocated`` is reset
   before each case is built.
2. **Projected search cost** of every CIFAR preset (the paper's rows), in
   GPU-hours: the preset's step count (its stages × epochs × steps per epoch,
   steps per epoch = its train split // its batch size; warm-up epochs counted as
   weights-only steps) times the step time of the timed case with the same step,
   or of the closest one (same mode and audience), marked as a proxy with the
   settings that differ. The paper's reported cost (V100) is shown next to it.
3. **A 2-process data-parallel smoke test** when two GPUs are present (NCCL):
   an all-reduce and one data-parallel LeaSE step (``mlo.distributed.DataParallel``
   with the bank's rows exchanged, as the search does), then a check that the
   replicas agree. With one GPU it records ``skipped: 1 GPU``; the dry run uses
   two CPU processes (gloo) so the code path stays tested.

It guards its own time (``--budget-s``): a case that would not fit is skipped
with a note, and timing stops early when the budget runs out. Outputs in
``--out``: ``result.json`` and ``table.md`` (also printed). Exit codes: 0 done,
1 a case or the smoke test failed (the outputs are still written), 2 no CUDA
device without ``--dry``.
"""
from __future__ import annotations

import argparse
import gc
import glob
import inspect
import json
import math
import os
import socket
import sys
import time

T0 = time.perf_counter()   # the budget counts from here (before torch is imported)

import traceback           # noqa: E402
from typing import Callable   # noqa: E402

import numpy as np         # noqa: E402
import torch               # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "applications", "lease", "configs")
CASES = {"DARTS-2nd": "cifar10-darts-2nd-baseline", "LeaSE-R18": "cifar10-darts-2nd-resnet18",
         "LeaSE-R50": "cifar10-darts-2nd-resnet50"}
PRECISIONS = ("fp32", "bf16")
# tiny sizes, a few seconds per step on one CPU core
DRY = {"space.C": 4, "space.layers": 3, "space.nodes": 2, "data.batch_size": 4, "audience.width": 0.125}
DRY_BANK_ROWS, DRY_SHAPE, SHAPE = 32, (3, 16, 16), (3, 32, 32)
BATCHES = 4                      # distinct batches per data source, cycled (no data loading in the timings)
CIFAR = {"cifar10": (10, 5000), "cifar100": (100, 500)}   # classes, training images per class (50,000 in all)
DIST_RESERVE_S = 120.0           # kept back from the cases when the smoke test will run
DIST_TIMEOUT_S = 150.0
SKIP_ARCH = frozenset({"architecture"})
# the paper's search cost (GPU-days on a Tesla V100; Tables 2 and 3), for comparison only
PAPER_GPU_DAYS = {
    "cifar10": {"darts-1st": (0.4, 0.6, 0.7), "darts-2nd": (1.5, 1.5, 1.7), "pc-darts": (0.1, 0.4, 0.5),
                "p-darts": (0.3, 0.8, 1.0)},
    "cifar100": {"darts-1st": (1.0, 1.1, 1.2), "darts-2nd": (1.5, 1.7, 1.9), "pc-darts": (0.1, 0.5, 0.7),
                 "p-darts": (0.3, 0.8, 1.0)},
}
AUDIENCES = ("baseline", "resnet18", "resnet50")


# ----------------------------------------------------------------------------- presets and step counts
def preset_path(name: str) -> str:
    return os.path.normpath(os.path.join(CONFIG_DIR, f"{name}.yaml"))


def load_preset(name: str, dry: bool = False, bf16: bool = False):
    """The preset as a ``SearchConfig`` (the data root is never read: the check draws random data)."""
    from applications.common import load_config
    from applications.lease.config import SearchConfig
    sets = {"data.root": "unused-random-data", "bf16": str(bf16).lower(), **(DRY if dry else {})}
    return load_config(SearchConfig, preset_path(name), [f"{k}={v}" for k, v in sets.items()])


def cifar_presets() -> list[str]:
    """Every CIFAR search preset (one per paper row)."""
    names = [os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "cifar*.yaml"))]
    return sorted(names, key=lambda n: (n.split("-")[0], n))


def train_examples(cfg) -> int:
    """Size of the search's train split, split as ``applications.lease.data`` splits CIFAR (no data read)."""
    from applications.lease.data import load_dataset, stratified_split
    classes, per_class = CIFAR[cfg.data.name]
    labels = np.repeat(np.arange(classes), per_class)
    portion = inspect.signature(load_dataset).parameters["train_portion"].default
    train, _ = stratified_split(labels, [portion, 1.0 - portion], cfg.data.seed)
    if cfg.data.subset_fraction is not None and cfg.data.subset_fraction < 1.0:
        (kept,) = stratified_split(labels[train], [cfg.data.subset_fraction], cfg.data.seed + 1)
        train = train[kept]
    return len(train)


def step_counts(cfg) -> dict:
    """Steps of the whole search on one process: full steps and weights-only (warm-up) steps."""
    from applications.lease.spaces import SPACES
    n = train_examples(cfg)
    per_epoch = n // cfg.data.batch_size if n >= cfg.data.batch_size else 1    # the loader drops the last batch
    if cfg.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
    plan = SPACES[cfg.space.name].plan(cfg)      # (epochs, warm-up epochs) per stage
    warm = sum(w for _, w in plan) * per_epoch
    return {"train_examples": n, "steps_per_epoch": per_epoch, "stages": len(plan),
            "epochs": sum(e for e, _ in plan), "full_steps": sum(e for e, _ in plan) * per_epoch - warm,
            "warmup_steps": warm}


def _engine(spec) -> str:
    """An edge's engine name, whether the config holds a name, a mapping with ``name`` or an object."""
    if isinstance(spec, str):
        return spec
    return spec.get("name") if isinstance(spec, dict) else getattr(spec, "name", repr(spec))


def signature(cfg) -> dict:
    """The settings that decide what one step computes (and so what it costs)."""
    sig = {"mode": cfg.mode, "space.name": cfg.space.name, "space.C": cfg.space.C, "space.layers": cfg.space.layers,
           "space.nodes": cfg.space.nodes, "data.batch_size": cfg.data.batch_size,
           "engines.explainer": _engine(cfg.engines.explainer), "explainer_val_order": cfg.explainer_val_order}
    if cfg.space.name == "pcdarts":
        sig["space.pc_k"] = cfg.space.pc_k
    if cfg.space.name == "pdarts":          # its stages set the depth (and drop candidate ops)
        sig["pdarts.cells"] = list(cfg.pdarts.cells)
    if cfg.mode == "lease":
        sig.update({"audience.name": cfg.audience.name, "audience.width": cfg.audience.width,
                    "engines.explanation": _engine(cfg.engines.explanation),
                    "engines.audience": _engine(cfg.engines.audience),
                    "explain.method": cfg.explain.method, "audience_only": cfg.audience_only})
    return sig


def audience_of(cfg) -> str:
    return "baseline" if cfg.mode == "baseline" else cfg.audience.name


# ----------------------------------------------------------------------------- one timed case
def build_step(cfg, device: torch.device, seed: int, data_seed: int, dry: bool, total_steps: int):
    """``(graph, stepper)`` of the search's problems for ``cfg`` on random CIFAR-shaped batches."""
    import mlo
    from applications.lease import explain
    from applications.lease.models.resnet import build_audience
    from applications.lease.problems import Loaders, build_problems
    from applications.lease.spaces import SPACES
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(data_seed)
    classes = CIFAR[cfg.data.name][0]
    shape = DRY_SHAPE if dry else SHAPE
    rows = DRY_BANK_ROWS if dry else train_examples(cfg)
    bs = cfg.data.batch_size

    def draw(with_idx: bool):
        x = torch.rand(bs, *shape, generator=gen)
        y = torch.randint(0, classes, (bs,), generator=gen)
        idx = torch.randperm(rows, generator=gen)[:bs] if with_idx else torch.arange(bs)
        return x.to(device), y.to(device), idx.to(device)
    sources = [[draw(w) for _ in range(BATCHES)] for w in (False, True, False)]
    explainer = SPACES[cfg.space.name].build(cfg, 0, {}, shape[0], classes).to(device)   # the first stage
    audience = bank = None
    if cfg.mode == "lease":
        audience = build_audience(cfg.audience.name, classes, shape[0], cfg.audience.width).to(device)
        bank = explain.init_bank(rows, shape, cfg.explain.init_scale, gen).detach().to(device).requires_grad_(True)
    graph = mlo.Graph(build_problems(cfg, explainer, audience, bank, Loaders(*sources), total_steps))
    return graph, mlo.Stepper(graph, nan_policy="off")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def summary(xs: list[float]) -> dict:
    """Median, 25th / 75th percentiles and count, in milliseconds."""
    q25, med, q75 = np.percentile(np.asarray(xs) * 1000.0, [25, 50, 75]).tolist()
    return {"median": med, "q25": q25, "q75": q75, "n": len(xs)}


def run_case(name: str, preset: str, precision: str, args, device: torch.device, deadline: float) -> dict:
    """Build, warm up and time one case; peak memory on CUDA. Timing stops at ``deadline``."""
    import mlo.precision
    row = {"case": name, "preset": preset, "precision": precision, "status": "ok", "note": None}
    if precision == "bf16" and not mlo.precision.autocast_available(device.type):
        return dict(row, status="skipped", note=f"bf16 autocast is not available on {device.type} here")
    cfg = load_preset(preset, dry=args.dry, bf16=precision == "bf16")
    row["size"] = {"C": cfg.space.C, "cells": cfg.space.layers, "nodes": cfg.space.nodes,
                   "batch": cfg.data.batch_size, "image": list(DRY_SHAPE if args.dry else SHAPE),
                   "bank_rows": (DRY_BANK_ROWS if args.dry else train_examples(cfg)) if cfg.mode == "lease" else None,
                   "audience_width": cfg.audience.width if cfg.mode == "lease" else None}
    cuda = device.type == "cuda"
    t_start = time.perf_counter()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    graph, stepper = build_step(cfg, device, args.seed, args.seed + 1, args.dry,
                                step_counts(load_preset(preset))["full_steps"])
    _sync(device)
    row["build_s"] = time.perf_counter() - t_start
    resident = torch.cuda.memory_allocated(device) if cuda else None
    full = lambda: stepper.step()                    # noqa: E731
    weights_only = lambda: stepper.step(skip=SKIP_ARCH)   # noqa: E731
    for _ in range(args.warmup):
        full()
    if args.warmup:
        weights_only()
    _sync(device)
    t_full, t_warm = [], []
    for _ in range(args.reps):
        t_full.append(_timed(full, device))
        t_warm.append(_timed(weights_only, device))
        if time.perf_counter() > deadline:
            row["note"] = f"budget: {len(t_full)} of {args.reps} timed repetitions"
            break
    row["step_ms"], row["weights_only_step_ms"] = summary(t_full), summary(t_warm)
    row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    row["resident_mib"] = resident / 2**20 if cuda else None
    row["step_extra_mib"] = (row["peak_mib"] - row["resident_mib"]) if cuda else None
    row["wall_s"] = time.perf_counter() - t_start
    return row


def run_cases(args, device: torch.device, deadline: float) -> list[dict]:
    """Every (case, precision), fp32 first; a case is skipped when the time left is below the longest so far."""
    rows, longest = [], 0.0
    for precision in PRECISIONS:
        for name, preset in args.cases.items():
            left = deadline - time.perf_counter()
            if left <= 0 or left < longest:
                rows.append({"case": name, "preset": preset, "precision": precision, "status": "skipped",
                             "note": f"budget: {max(left, 0):.0f} s left of --budget-s {args.budget_s:g}, "
                                     f"the longest case took {longest:.0f} s"})
                continue
            try:
                row = run_case(name, preset, precision, args, device, deadline)
            except Exception as e:      # noqa: BLE001 (an out-of-memory case must not stop the others)
                row = {"case": name, "preset": preset, "precision": precision, "status": "error",
                       "note": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
                traceback.print_exc()
                del e
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            longest = max(longest, row.get("wall_s", 0.0))
            rows.append(row)
            print(f"  {name} {precision}: {row['status']}"
                  + (f", {row['step_ms']['median']:.1f} ms/step" if row["status"] == "ok" else f" ({row['note']})"),
                  file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- projections
def project(cases: list[dict], timed_cfgs: dict) -> list[dict]:
    """GPU-hours of every CIFAR preset's search from the timed step of the same (or the closest) kind."""
    out = []
    for preset in cifar_presets():
        cfg = load_preset(preset)
        counts = step_counts(cfg)
        sig, aud = signature(cfg), audience_of(cfg)
        basis = next((n for n, c in timed_cfgs.items() if signature(c) == sig), None)
        exact = basis is not None
        if basis is None:
            basis = next((n for n, c in timed_cfgs.items() if audience_of(c) == aud), None)
        diffs = []
        if basis is not None and not exact:
            ref = signature(timed_cfgs[basis])
            diffs = [f"{k} {sig.get(k, '-')} (timed: {ref.get(k, '-')})" for k in sorted(set(sig) | set(ref))
                     if sig.get(k) != ref.get(k)]
        dataset, _, rest = preset.partition("-")
        method = rest.rsplit("-", 1)[0]
        days = PAPER_GPU_DAYS.get(dataset, {}).get(method)
        row = {"preset": preset, "dataset": dataset, "method": method, "audience": aud, "basis": basis,
               "exact": exact, "differences": diffs, **counts,
               "paper_gpu_hours": days[AUDIENCES.index(aud)] * 24 if days and aud in AUDIENCES else None,
               "step_s": {}, "weights_only_step_s": {}, "gpu_hours": {}}
        for prec in PRECISIONS:
            case = next((c for c in cases if c["case"] == basis and c["precision"] == prec and c["status"] == "ok"),
                        None)
            if case is None:
                row["gpu_hours"][prec] = None
                continue
            t, tw = case["step_ms"]["median"] / 1000.0, case["weights_only_step_ms"]["median"] / 1000.0
            row["step_s"][prec], row["weights_only_step_s"][prec] = t, tw
            row["gpu_hours"][prec] = (counts["full_steps"] * t + counts["warmup_steps"] * tw) / 3600.0
        out.append(row)
    return out


# ----------------------------------------------------------------------------- data-parallel smoke test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, device_type: str, seed: int, queue) -> None:
    """One process of the smoke test: an all-reduce, then one data-parallel LeaSE step at tiny size."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cpu":
        torch.set_num_threads(1)
    out = {"rank": rank}
    try:
        import torch.distributed as dist

        import mlo
        env = mlo.distributed.init(device_type, timeout_s=DIST_TIMEOUT_S)
        out["backend"] = env.backend
        t = torch.full((1024,), float(rank + 1), device=env.device)
        dist.all_reduce(t)
        out["all_reduce_ok"] = bool((t == world * (world + 1) / 2).all())
        cfg = load_preset(CASES["LeaSE-R18"], dry=True)
        graph, _ = build_step(cfg, env.device, seed, seed + 1 + rank, True, 100)   # same models, own batches
        dp = mlo.distributed.DataParallel(graph, reduce={"explanation": "sum"},
                                          rows={"explanation": lambda batch: batch[2]})
        stepper = mlo.Stepper(graph, nan_policy="raise", reduce_fn=dp)
        dp.broadcast_parameters()
        out["step_s"] = _timed(stepper.step, env.device)
        dp.check_in_sync()               # raises if the replicas differ
        out["in_sync"] = True
    except Exception as e:               # noqa: BLE001 (reported to the parent)
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    finally:
        if "mlo" in sys.modules:
            sys.modules["mlo"].distributed.shutdown()
        queue.put(out)


def dist_smoke(device: torch.device, dry: bool, seed: int, left_s: float) -> dict:
    """The 2-process smoke test (NCCL on two GPUs; gloo on the CPU in the dry run), or why it was skipped."""
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count < 2:
            return {"status": "skipped", "note": f"skipped: {count} GPU"}
        kind = "cuda"
    elif dry:
        kind = "cpu"
    else:
        return {"status": "skipped", "note": "skipped: no GPU"}
    if left_s < 30:
        return {"status": "skipped", "note": f"skipped: budget ({max(left_s, 0):.0f} s left)"}
    import torch.multiprocessing as tmp
    ctx = tmp.get_context("spawn")
    queue, port, world = ctx.Queue(), _free_port(), 2
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_dist_worker, args=(r, world, port, kind, seed, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in range(world):
            results.append(queue.get(timeout=min(DIST_TIMEOUT_S, max(left_s, 30))))
    except Exception:                   # noqa: BLE001 (a hung or dead process: queue.Empty)
        pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)
    results.sort(key=lambda r: r["rank"])
    errors = [f"rank {r['rank']}: {r['error']}" for r in results if "error" in r]
    if len(results) < world:
        errors.append(f"{world - len(results)} process(es) gave no answer (exit codes "
                      f"{[p.exitcode for p in procs]})")
    ok = not errors and all(r.get("all_reduce_ok") and r.get("in_sync") for r in results)
    return {"status": "ok" if ok else "failed", "note": "; ".join(errors) or None, "world_size": world,
            "backend": results[0].get("backend") if results else None,
            "dp_step_s": max((r.get("step_s", 0.0) for r in results), default=None),
            "wall_s": time.perf_counter() - t0, "ranks": results}


# ----------------------------------------------------------------------------- machine and outputs
def machine(device: torch.device) -> dict:
    from . import common
    info = common.machine(device)
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)     # the CUDA torch was built with
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                    tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _ms(s: dict | None) -> str:
    return "-" if not s else f"{_num(s['median'])} ({_num(s['q25'])}–{_num(s['q75'])})"


def markdown(result: dict) -> str:
    from .common import fmt, markdown_table
    m = result["machine"]
    where = (f"{m.get('gpu')} ({m.get('gpu_count')} GPU), CUDA {m.get('torch_cuda')}" if result["device"] == "cuda"
             else f"CPU ({m.get('cpu_model', m.get('processor'))})")
    head = (f"gpu_check on {where}, torch {m['torch']}"
            + (" — DRY RUN at tiny sizes: the times and projections below do not describe the paper's sizes"
               if result["dry"] else "") + f"; {result['elapsed_s']:.0f} s of --budget-s {result['budget_s']:g}")
    rows = [dict(c, time=_ms(c.get("step_ms")), warm=_ms(c.get("weights_only_step_ms")),
                 peak_mib=_num(c["peak_mib"]) if c.get("peak_mib") is not None else None,
                 step_extra_mib=_num(c["step_extra_mib"]) if c.get("step_extra_mib") is not None else None)
            for c in result["cases"]]
    steps = markdown_table(rows, [("case", "step"), ("precision", "precision"), ("time", "ms/step (IQR)"),
                                  ("warm", "weights-only step ms (IQR)"), ("peak_mib", "peak (MiB)"),
                                  ("step_extra_mib", "step extra (MiB)"), ("status", "status"), ("note", "note")])
    prows = []
    for p in result["projections"]:
        kind = "same step" if p["exact"] else ("proxy: " + "; ".join(p["differences"]) if p["basis"] else "no case")
        prows.append({"preset": p["preset"], "basis": p["basis"], "steps": f"{p['full_steps']} + {p['warmup_steps']}",
                      "fp32": p["gpu_hours"].get("fp32"), "bf16": p["gpu_hours"].get("bf16"),
                      "paper": p["paper_gpu_hours"], "kind": kind})
    proj = markdown_table(prows, [("preset", "preset"), ("basis", "timed step"),
                                  ("steps", "steps (full + weights-only)"), ("fp32", "GPU-h fp32"),
                                  ("bf16", "GPU-h bf16"), ("paper", "paper GPU-h (V100)"), ("kind", "basis")])
    d = result["distributed"]
    if d["status"] == "ok":
        what = f"ok ({d['backend']}, one LeaSE step {fmt(d['dp_step_s'])} s)"
    else:
        what = d["note"] if d["status"] == "skipped" else f"{d['status']}: {d['note']}"
    dist_line = f"2-process data-parallel smoke test: {what}"
    return "\n\n".join([head, steps, proj, dist_line])


def write_outputs(out: str, result: dict) -> str:
    os.makedirs(out, exist_ok=True)

    def clean(x):
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(clean(result), f, indent=2)
    text = markdown(result)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return text


# ----------------------------------------------------------------------------- command line
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "gpu-check"), help="output folder (default runs/gpu-check)")
    p.add_argument("--dry", action="store_true",
                   help="tiny sizes (C=4, 3 cells, 2 nodes, batch 4, 32-row bank, 3x16x16): any machine")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available; cpu only with --dry")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="time for the whole check in seconds (default 420: with start-up, under 8 minutes)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per case (default 10; --dry 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --dry 1)")
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated NAME=PRESET (or a known name: " + ", ".join(CASES) + ")")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (2 if args.dry else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry else 3)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    cases = {}
    for item in filter(None, (s.strip() for s in args.cases.split(","))):
        name, _, preset = item.partition("=")
        preset = preset or CASES.get(name)
        if preset is None or not os.path.exists(preset_path(preset)):
            p.error(f"--cases: unknown case or preset {item!r}")
        cases[name] = preset
    if not cases:
        p.error("--cases: nothing to time")
    args.cases = cases
    return args


def main(argv=None) -> int:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("error: --device cuda: no CUDA device is available here (run with --dry for the tiny CPU check)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda and args.device != "cpu" else "cpu")
    if device.type == "cpu" and not args.dry:
        print("error: gpu_check needs a CUDA GPU; use --dry for the tiny-size run on this machine", file=sys.stderr)
        return 2
    if device.type == "cpu":
        from .common import tune_cpu
        tune_cpu()
    deadline = T0 + args.budget_s
    will_dist = (device.type == "cuda" and torch.cuda.device_count() >= 2) or (device.type == "cpu" and args.dry)
    cases = run_cases(args, device, deadline - (DIST_RESERVE_S if will_dist and not args.dry else 0.0))
    projections = project(cases, {n: load_preset(p) for n, p in args.cases.items()})
    dist_result = dist_smoke(device, args.dry, args.seed, deadline - time.perf_counter())
    result = {"benchmark": "gpu_check", "dry": args.dry, "device": device.type, "machine": machine(device),
              "budget_s": args.budget_s, "elapsed_s": time.perf_counter() - T0, "reps": args.reps,
              "warmup": args.warmup, "cases": cases, "projections": projections, "distributed": dist_result,
              "timing": "median and IQR of timed steps after warm-up, CUDA synchronised around each step; "
                        "full steps alternate with weights-only steps (architecture skipped)",
              "memory": ("torch.cuda.max_memory_allocated, reset before each case is built: peak = models, bank, "
                         "optimizer state and the step; step extra = peak minus what was allocated after building")
              if device.type == "cuda" else "not measured on CPU"}
    print(write_outputs(args.out, result))
    print(f"\noutputs in {args.out}", file=sys.stderr)
    failed = [c for c in cases if c["status"] == "error"] or dist_result["status"] == "failed"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
