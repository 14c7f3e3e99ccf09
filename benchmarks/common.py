"""What every benchmark shares: command line, timing, peak memory, and the output files.

Timing: the variants being compared run interleaved (round robin, the order
rotated every repetition) after warm-up runs, with CUDA synchronised around
each call; a benchmark reports the median and the interquartile range (IQR)
over repetitions, and ratios as the median of per-repetition paired ratios, so
slow spells of a shared machine hit both sides of a ratio alike.

Peak memory: the extra memory one step needs on top of what the process held
before the first step (the models, data and optimizers already built), so
state a framework keeps between steps (records, clones, optimizer state made
in the first steps) counts.

* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()``
  taken before the first step; the peak counter is reset after the warm-up.
* CPU: the resident set (RSS) of a fresh child process (``forkserver``, with
  torch preloaded) that builds the case, runs warm-up steps, returns freed
  memory to the kernel (``malloc_trim``), resets the kernel's high-water mark
  (``/proc/self/clear_refs``) and runs the measured step: ``VmHWM`` minus the
  ``VmRSS`` taken before the first step, minus the growth of file-backed pages
  (libtorch code faulted in by the first steps). Pages are 4 KiB and glibc
  keeps some freed blocks, so differences under ~1 MiB are noise.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from applications.common.cpu import glibc

SIZES = ("tiny", "small", "paper")

# some imports in the memory children print this; it says nothing about the benchmarks
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")

MEMORY_METHOD_CPU = ("peak RSS of a fresh child process (VmHWM after clear_refs) minus its RSS before the "
                     "first step, minus file-backed pages faulted in meanwhile")
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated minus memory_allocated before the first step"


# ----------------------------------------------------------------------------- command line
def parser(name: str, description: str, reps: int = 5, warmup: int = 2) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--out``, ``--device``, ``--size``, ``--reps``, ``--warmup``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    p.add_argument("--out", default=None, help=f"output folder (default runs/bench-{name})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    p.add_argument("--size", choices=SIZES, default="small",
                   help="tiny: seconds (tests); small: the CPU default, a few minutes; paper: the real sizes (GPU)")
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions per variant (default {reps}; tiny: 2)")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed runs first (default {warmup}; tiny: 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on CPU (default 1: on a shared machine, spin-waiting threads "
                        "make small kernels 10-40x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(default_reps=reps, default_warmup=warmup, bench_name=name)
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill size-dependent defaults, check the device, tune the CPU allocator."""
    tiny = args.size == "tiny"
    if args.reps is None:
        args.reps = 2 if tiny else args.default_reps
    if args.warmup is None:
        args.warmup = 1 if tiny else args.default_warmup
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("error: --reps must be >= 1 and --warmup >= 0")
    if args.out is None:
        args.out = os.path.join("runs", f"bench-{args.bench_name}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but no CUDA device is available")
    args.git_commit = _git_commit()   # the code the run starts with
    gc.freeze()   # the imported modules' objects: keeps every later gc.collect() short
    if args.device == "cpu":
        tune_cpu()
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    return args


def tune_cpu() -> None:
    """The applications' CPU settings (glibc thresholds, denormals): the same for every variant."""
    try:
        from applications.common import tune_cpu as tune
    except ImportError:
        return
    tune()


# ----------------------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device="cpu",
                     cpu: dict[str, list[float]] | None = None, block: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every function, run round robin (order rotated each repetition).

    ``cpu``, if given, is filled with the process CPU seconds of each call as well: on a machine shared
    with other jobs the wall time includes their share of the cores, the CPU time does not (with one
    intra-op thread it is the step's own compute; on CUDA it is the host side only). ``block``: each
    sample times that many calls in a row and records their mean (millisecond calls: one call's time
    is dominated by the timer's and the shared machine's noise)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            shift = r % len(names)
            for n in names[shift:] + names[:shift]:
                sync(device)
                fn = fns[n]
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(block):
                    fn()
                sync(device)
                times[n].append((time.perf_counter() - t0) / block)
                if cpu is not None:
                    cpu[n].append((time.process_time() - c0) / block)
            gc.collect()
    finally:
        if enabled:
            gc.enable()
    return times


def quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation."""
    s = sorted(xs)
    if not s:
        return (math.nan, math.nan, math.nan)

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return q(0.25), q(0.5), q(0.75)


def summary(xs: Sequence[float]) -> dict:
    """Median, IQR bounds, min and count of a sample."""
    q25, med, q75 = quantiles(xs)
    return {"median": med, "q25": q25, "q75": q75, "min": min(xs) if xs else math.nan, "n": len(xs)}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict:
    """Summary of per-repetition ratios ``num[i] / den[i]`` (both measured in the same round)."""
    return summary([a / b for a, b in zip(num, den) if b > 0])


# ----------------------------------------------------------------------------- memory
def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssFile:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def _prewarm() -> None:
    """Trigger one-time lazy work (thread pool, the optimizers' first-use imports) before a baseline."""
    a = torch.randn(64, 64, requires_grad=True)
    (g,) = torch.autograd.grad((a @ a).tanh().sum(), a, create_graph=True)
    g.sum().backward()
    for opt in (torch.optim.SGD([a], lr=0.1, momentum=0.9), torch.optim.Adam([a])):
        opt.step()
        opt.zero_grad()


class MemoryProbe:
    """Peak extra memory of a step: ``start()`` after building, ``arm()`` after warm-up, ``peak()`` after.

    See the module docstring for what is measured on CPU and CUDA.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.baseline = 0
        self.libc = None if self.cuda else glibc()

    def _settle(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
        elif self.libc is not None:
            self.libc.malloc_trim(0)

    def start(self) -> None:
        _prewarm()
        self._settle()
        if self.cuda:
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            st = _proc_status()
            self.baseline, self.file0 = st["VmRSS"], st.get("RssFile", 0)

    def arm(self) -> None:
        self._settle()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")     # reset VmHWM to the current RSS
            # code pages of libtorch that the first steps faulted in are not the step's memory
            self.file_growth = _proc_status().get("RssFile", 0) - self.file0

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated(self.device) - self.baseline)
        extra = _proc_status()["VmHWM"] - self.baseline - self.file_growth
        return max(0, int(extra))   # RSS noise can dip below the baseline


def step_peak(build: Callable[[], Callable[[], Any]], device, warmup: int = 2) -> int:
    """Build a step function (models, data, optimizers), take the baseline, warm it up, and return
    the peak extra bytes of one more call over that baseline."""
    probe = MemoryProbe(device)
    step = build()
    probe.start()
    for _ in range(warmup):
        step()
    probe.arm()
    step()
    return probe.peak()


def memory_supported(device) -> bool:
    if torch.device(device).type == "cuda":
        return True
    return sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")


_FORKSERVER = None


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        ctx = mp.get_context("forkserver")
        # what the first optimizer imports (torch._dynamo, ~150 MiB, seconds) is loaded once, in the server
        ctx.set_forkserver_preload(["benchmarks.common", "torch", "torch._dynamo", "torch.func", "mlo",
                                    "applications.lease.problems"])
        _FORKSERVER = ctx
    return _FORKSERVER


def _resolve(target: str) -> Callable:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def _child(queue, target: str, kwargs: dict) -> None:
    try:
        torch.set_num_threads(kwargs.pop("_threads"))
        tune_cpu()
        gc.freeze()
        queue.put(("ok", _resolve(target)(**kwargs)))
    except BaseException:   # noqa: BLE001 (report anything to the parent)
        queue.put(("error", traceback.format_exc()))


def isolated(target: str, where, **kwargs) -> Any:
    """Run ``target`` (``"module:function"``) with ``kwargs``: in a fresh child process when ``where``
    is the CPU (clean RSS accounting), in this process on CUDA. The result must be picklable."""
    if torch.device(where).type == "cuda":
        return _resolve(target)(**kwargs)
    ctx = _forkserver()
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, target, dict(kwargs, _threads=torch.get_num_threads())))
    proc.start()
    try:
        status, value = queue.get(timeout=3600)
    finally:
        proc.join(timeout=60)
    if status != "ok":
        raise RuntimeError(f"memory measurement {target} failed in the child process:\n{value}")
    return value


def memory_method(device) -> str:
    return MEMORY_METHOD_CUDA if torch.device(device).type == "cuda" else MEMORY_METHOD_CPU


# ----------------------------------------------------------------------------- profile
def profile_mlo(step: Callable[[], Any], steps: int = 2, top: int = 12) -> list[dict]:
    """cProfile of ``steps`` calls of an (already warmed-up) mlo step: the functions inside mlo (and
    ``functional_call``) with the largest cumulative share of the time."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = max(stats.total_tt, 1e-12)
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        path = file.replace("\\", "/")
        if "/mlo/" in path:
            name = f"mlo/{path.split('/mlo/')[-1]}:{line}({fn})"
        elif fn == "functional_call":
            name = "torch.func.functional_call"
        else:
            continue
        rows.append({"function": name, "calls": ncalls // steps, "cum_share": cumtime / total,
                     "self_share": tottime / total})
    rows.sort(key=lambda r: -r["cum_share"])
    return rows[:top]


def profile_markdown(title: str, rows: Sequence[dict]) -> str:
    return (f"{title} (share of the step's time under cProfile, cumulative / self):\n\n"
            + markdown_table(rows, [("function", "function"), ("calls", "calls/step"), ("cum_share", "cumulative"),
                                    ("self_share", "self")]))


# ----------------------------------------------------------------------------- machine and data
def machine(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["git_commit"] = _git_commit()
    return info


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes under mlo/, applications/, benchmarks/)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mlo", "applications", "benchmarks"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def digits(seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The embedded digits (``applications.digits``), pixels in [0, 1] standardised on the training
    part, split 50/25/25 (train/val/test) class by class."""
    from applications.digits import arrays, standardize, stratified_split
    pixels, labels = arrays()
    split = stratified_split(labels, {"train": 0.5, "val": 0.25, "test": 0.25}, seed)
    xs = standardize(*(pixels[split[k]] / 16.0 for k in split), dtype=np.float64)
    out = {}
    for k, x in zip(split, xs):
        out[f"x_{k}"] = torch.as_tensor(x).to(dtype)
        out[f"y_{k}"] = torch.as_tensor(labels[split[k]], dtype=torch.long)
    return out


def flat(tree) -> torch.Tensor:
    """Concatenate a dict / list of tensors (or one tensor) into one float64 vector."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().reshape(-1).double()
    values = tree.values() if isinstance(tree, dict) else tree
    return torch.cat([v.detach().reshape(-1).double() for v in values])


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))
    return err if math.isfinite(err) else float("inf")


# ----------------------------------------------------------------------------- output
def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table: ``columns`` is ``[(key, header), ...]``."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def ms(seconds: float) -> float:
    return 1000.0 * seconds


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def goal(name: str, value: float | None, target: float, direction: str = "<=", note: str | None = None) -> dict:
    """A stated goal: ``value <= target`` (or ``>=``); ``met`` is None when not measured."""
    met = None
    if value is not None and math.isfinite(value):
        met = value <= target if direction == "<=" else value >= target
    return {"name": name, "value": value, "target": target, "direction": direction, "met": met, "note": note}


MEMORY_FLOOR = 2**20   # below 1 MiB on both sides, a CPU peak-RSS ratio is noise


def memory_ratio(num: int | None, den: int | None, device="cpu") -> tuple[float | None, str | None]:
    """``(num / den, None)``, or ``(None, why)`` when it cannot be measured meaningfully."""
    if num is None or den is None:
        return None, "not measured"
    if torch.device(device).type != "cuda" and max(num, den) < MEMORY_FLOOR:
        return None, "both under 1 MiB: below the resolution of peak RSS"
    return (num / den if den > 0 else None), None


def check(name: str, value: float, tolerance: float) -> dict:
    """An accuracy check: ``value <= tolerance``."""
    return {"name": name, "value": value, "tolerance": tolerance,
            "ok": bool(math.isfinite(value) and value <= tolerance)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


def write_outputs(args, result: dict, markdown: str, plot: Callable[[str], None] | None = None) -> str:
    """Write ``result.json``, ``table.md`` and (if given) ``plot.png`` into ``args.out``; print the table."""
    os.makedirs(args.out, exist_ok=True)
    result = dict(result)
    result.setdefault("benchmark", args.bench_name)
    result.update(size=args.size, device=args.device, reps=args.reps, warmup=args.warmup,
                  machine=dict(machine(args.device), git_commit_at_start=getattr(args, "git_commit", None)),
                  timing="median and IQR (25th-75th percentile) of interleaved repetitions; ratios are "
                         "medians of per-repetition paired ratios",
                  memory_method=memory_method(args.device) if not args.no_memory else None)
    with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(_jsonable(result), f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        plot(os.path.join(args.out, "plot.png"))
    print(markdown)
    print(f"\noutputs in {args.out}", file=sys.stderr)
    return args.out


def goals_markdown(goals: Sequence[dict]) -> str:
    rows = []
    for g in goals:
        verdict = {True: "met", False: "missed", None: "not measured"}[g["met"]]
        if g.get("note") and g["met"] is None:
            verdict += f" ({g['note']})"
        rows.append({"goal": g["name"], "value": g["value"], "target": f"{g['direction']} {g['target']}",
                     "verdict": verdict})
    return markdown_table(rows, [("goal", "goal"), ("value", "measured"), ("target", "target"),
                                 ("verdict", "verdict")])


def checks_markdown(checks: Sequence[dict]) -> str:
    rows = [{"check": c["name"], "value": c["value"], "tol": c["tolerance"], "ok": c["ok"]} for c in checks]
    return markdown_table(rows, [("check", "accuracy check"), ("value", "value"), ("tol", "tolerance"),
                                 ("ok", "ok")])
