"""Supernet speed: one forward+backward of the LeaSE explainer supernet, before and after ``tune_cpu``.

    python -m benchmarks.supernet_speed --out runs/bench          # all cases, 5 repetitions
    python -m benchmarks.supernet_speed --cases digits --reps 3   # quick look

Each mode runs in a fresh Python process so the allocator settings of one cannot
leak into the other: ``untuned`` (glibc defaults; ``MALLOC_*`` variables removed
from its environment) and ``tuned`` (``applications.common.tune_cpu()`` first).
``channels_last`` (tuned, with the activations after the stem switched to the
channels-last layout the networks no longer use, see
``applications.lease.spaces.ops.activation_layout``) is available on request to show
what that layout would be worth; its cases keep >= 8 channels everywhere, the shapes
where oneDNN's AVX2 kernels are safe. Every process also times a plain torchvision
ResNet-18 forward+backward (batch 64, 3x32x32, 10 classes) so that the supernet
times can be read as machine-independent ratios. Times are medians of ``--reps``
repetitions after ``--warmup`` untimed ones, pooled over ``--rounds`` processes per
mode that run alternately (so drifting machine load hits every mode alike); minor
page faults per step are counted too, since returning memory to the kernel and
faulting it back in is what the allocator tuning removes. Results go to ``--out`` as
``supernet_speed.json`` and ``supernet_speed.md``; the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    # name: (C, cells, batch, in_channels, image size, classes)
    "digits": (8, 3, 32, 1, 8, 10),          # the LeaSE search default on digits
    "digits-wide": (16, 8, 64, 1, 8, 10),    # the paper's supernet size on 8x8 digits
    "cifar": (16, 8, 64, 3, 32, 10),         # the paper's CIFAR search size
}
MODES = ("untuned", "tuned", "channels_last")


def _page_faults() -> int:
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_step(step, reps: int, warmup: int) -> dict:
    """Wall time, CPU time and minor page faults of each of ``reps`` calls of ``step``."""
    for _ in range(warmup):
        step()
    wall, cpu, faults = [], [], []
    for _ in range(reps):
        f0, t0, c0 = _page_faults(), time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        faults.append(_page_faults() - f0)
    return {"median_s": statistics.median(wall), "wall_s": wall, "cpu_s": cpu, "page_faults": faults}


def _merge(rounds: list[dict]) -> dict:
    """Pool the repetitions of several worker runs of one mode; medians over all of them."""
    merged = dict(rounds[0])

    def pool(parts: list[dict]) -> dict:
        out = {key: [v for p in parts for v in p[key]] for key in ("wall_s", "cpu_s", "page_faults")}
        out["median_s"] = statistics.median(out["wall_s"])
        out["median_cpu_s"] = statistics.median(out["cpu_s"])
        out["median_page_faults"] = statistics.median(out["page_faults"])
        return out

    merged["resnet18"] = pool([r["resnet18"] for r in rounds])
    merged["cases"] = {name: pool([r["cases"][name] for r in rounds]) for name in rounds[0]["cases"]}
    return merged


def _worker(mode: str, cases: list[str], space: str, reps: int, warmup: int, threads: int | None) -> dict:
    """Run inside a fresh process: time every case and the ResNet-18 reference."""
    import torch
    import torch.nn.functional as F
    import torchvision

    info: dict = {"mode": mode}
    if mode in ("tuned", "channels_last"):
        from applications.common import tune_cpu

        info["tune_cpu"] = tune_cpu()
    if threads:
        torch.set_num_threads(threads)
    info["threads"] = torch.get_num_threads()
    from applications.lease.spaces import build_supernet

    torch.manual_seed(0)
    results = {}
    for name in cases:
        C, cells, batch, ch, size, classes = CASES[name]
        model = build_supernet(space, C, classes, cells, in_channels=ch)
        if mode == "channels_last":   # the stem's output, and so every later activation, in NHWC
            model.stem.register_forward_hook(lambda m, i, out: out.contiguous(memory_format=torch.channels_last))
        x = torch.randn(batch, ch, size, size)
        y = torch.randint(0, classes, (batch,))

        def step(model=model, x=x, y=y):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        results[name] = _time_step(step, reps, warmup)
        del model
    ref = torchvision.models.resnet18(num_classes=10)
    xr = torch.randn(64, 3, 32, 32)
    yr = torch.randint(0, 10, (64,))

    def ref_step():
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(xr), yr).backward()

    info["resnet18"] = _time_step(ref_step, reps, warmup)
    info["cases"] = results
    return info


def _spawn(mode: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if mode == "untuned":
        for key in list(env):
            if key.startswith("MALLOC_") or key.startswith("GLIBC_TUNABLES"):
                del env[key]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.supernet_speed", "--worker", mode, "--cases", ",".join(args.cases),
           "--space", args.space, "--reps", str(args.reps), "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker ({mode}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(report: dict) -> str:
    modes = report["modes"]
    runs = report["runs"]
    head = ["case", "C / cells / batch / input"] + [f"{m} (s)" for m in modes]
    if "untuned" in runs and "tuned" in runs:
        head += ["tuned speed-up", "page faults / step (untuned -> tuned)"]
    if "channels_last" in runs and "tuned" in runs:
        head.append("channels-last speed-up")
    ref_mode = "tuned" if "tuned" in runs else modes[-1]
    head.append(f"x ResNet-18 ({ref_mode})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in report["cases"]:
        C, cells, batch, ch, size, _ = CASES[name]
        row = [name, f"{C} / {cells} / {batch} / {ch}x{size}x{size}"]
        row += [f"{runs[m]['cases'][name]['median_s']:.3f}" for m in modes]
        if "untuned" in runs and "tuned" in runs:
            row.append(f"{runs['untuned']['cases'][name]['median_s'] / runs['tuned']['cases'][name]['median_s']:.2f}x")
            row.append(f"{runs['untuned']['cases'][name]['median_page_faults']:.0f} -> "
                       f"{runs['tuned']['cases'][name]['median_page_faults']:.0f}")
        if "channels_last" in runs and "tuned" in runs:
            row.append(f"{runs['tuned']['cases'][name]['median_s'] / runs['channels_last']['cases'][name]['median_s']:.2f}x")
        row.append(f"{runs[ref_mode]['cases'][name]['median_s'] / runs[ref_mode]['resnet18']['median_s']:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    ref = " / ".join(f"{m} {runs[m]['resnet18']['median_s']:.3f} s" for m in modes)
    lines.append("")
    lines.append(f"Reference: torchvision ResNet-18, batch 64, 3x32x32, forward+backward: {ref}. "
                 f"Medians of {report['reps']} repetitions; {report['threads']} threads; "
                 f"load average before/after {report['loadavg_before']} / {report['loadavg_after']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.supernet_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("runs", "bench"), help="folder for supernet_speed.json / .md")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--modes", default="untuned,tuned", help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--space", default="darts", choices=("darts", "pcdarts", "pdarts"))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per mode, run alternately")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES] + [m for m in args.modes.split(",") if m not in MODES]
    if unknown or args.reps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(f"unknown case/mode {unknown} or bad --reps/--warmup")

    if args.worker:
        print(json.dumps(_worker(args.worker, args.cases, args.space, args.reps, args.warmup, args.threads)))
        return 0

    import torch

    modes = [m for m in args.modes.split(",") if m]
    load_before = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    raw: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):  # alternate the modes so slow drifts in machine load hit all of them
        for mode in modes:
            print(f"[bench] round {r + 1}/{args.rounds}: {mode} ...", file=sys.stderr, flush=True)
            raw[mode].append(_spawn(mode, args))
    runs = {m: _merge(raw[m]) for m in modes}
    report = {
        "benchmark": "supernet_speed",
        "space": args.space,
        "cases": args.cases,
        "modes": modes,
        "reps": args.reps * args.rounds,
        "warmup": args.warmup,
        "threads": runs[modes[0]]["threads"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "runs": runs,
    }
    table = _table(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "supernet_speed.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(args.out, "supernet_speed.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# Supernet forward+backward ({args.space})\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
