"""Shared cores: the default LeaSE search beside competing CPU jobs, under three OpenMP settings.

    python -m benchmarks.shared_cores [--steps 4] [--competitors 0,1,2] [--settings default,passive,free]
    python -m benchmarks.shared_cores --quick      # a tiny supernet, one step, seconds (the tests)

For each setting a worker process (``--worker``) builds the default search (the digits
preset, or a tiny supernet with ``--quick``) with the search's own functions
(``prepare``, ``build_explainer``, ``build_problems``, ``tune_cpu``) and times full LeaSE
steps of its graph (the architecture learning, as in every epoch after the warm-up). The
worker is started once per setting; for each number of competitors the benchmark starts
that many competing processes (each a single-thread float32 matmul loop, ``OMP_NUM_THREADS=1``,
the CPU-bound kind of job that shares a workstation), waits until they compute, has the
worker time its steps, and kills them again. The settings:

``default``  torch's defaults: as many threads as cores, libgomp's default wait policy (its
             threads spin for a while after each parallel region before they sleep);
``passive``  ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep at once;
``free``     ``torch.set_num_threads(free_cores())`` just before the steps: the cores idle at
             that moment (``applications.common.cpu.free_cores``), at least 1.

The worker's environment has no ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OMP_WAIT_POLICY``
or ``GOMP_SPINCOUNT`` of the caller's. Reported per cell: the median wall time per step, the
median CPU time per step (all the worker's threads), the thread count, and the wall time's
ratio to the idle ``default`` cell (to the first setting's idle cell when ``default`` is not run). Writes ``shared_cores.json`` and ``table.md`` into ``--out``.
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

SETTINGS = ("default", "passive", "free")
#: Variables the caller may have set that would change what a setting means.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
QUICK = ["epochs=2", "arch_start_epoch=0", "max_steps_per_epoch=2", "space.C=2", "space.nodes=2",
         "space.layers=2", "audience.width=0.0625", "data.subset_fraction=0.25", "data.batch_size=8"]
COMPETITOR = ("import sys, torch\n"
              "torch.set_num_threads(1)\n"
              "a = torch.randn(384, 384)\n"
              "b = a @ a\n"
              "print('ready', flush=True)\n"
              "while True:\n"
              "    b = a @ a\n")


def setting_env(setting: str, base: dict | None = None) -> dict:
    """The worker's environment for ``setting``: the caller's without its thread variables, plus the setting's."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in THREAD_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


# ----------------------------------------------------------------------------- the worker (child process)
def worker(args) -> int:
    import torch

    import mlo
    from applications.common import tune_cpu
    from applications.common.config import load_config
    from applications.common.cpu import free_cores
    from applications.lease.config import SearchConfig
    from applications.lease.prepare import build_explainer, prepare
    from applications.lease.problems import build_problems
    from applications.lease.search import DEFAULT_CONFIG
    from applications.lease.spaces import SPACES

    tune_cpu()
    cfg = load_config(SearchConfig, DEFAULT_CONFIG, QUICK if args.quick else [])
    env = mlo.distributed.Env(0, 1, 0, torch.device("cpu"), None)
    setup = prepare(cfg, env)
    space = SPACES[cfg.space.name]
    explainer = build_explainer(cfg, space, setup, 0, {}, env.device)
    total = cfg.epochs * setup.steps_per_epoch
    graph = mlo.Graph(build_problems(cfg, explainer, setup.audience, setup.bank, setup.loaders, total))
    stepper = mlo.Stepper(graph, nan_policy=cfg.nan_policy)
    done = 0

    def step():
        nonlocal done
        if done == total:                      # the schedules end at ``total``: start the graph's data over
            raise RuntimeError(f"the worker ran out of the search's {total} steps; ask for fewer")
        stepper.step(frozenset())
        done += 1
    for _ in range(args.warmup):
        step()
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    default_threads = torch.get_num_threads()
    for line in sys.stdin:
        if line.strip() != "go":
            break
        torch.set_num_threads(free_cores() if args.free else default_threads)
        walls, cpus, start = [], [], time.perf_counter()
        while len(walls) < args.steps and (len(walls) < 2 or time.perf_counter() - start < args.max_cell_s):
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        print(json.dumps({"wall_s": walls, "cpu_s": cpus, "threads": torch.get_num_threads()}), flush=True)
    return 0


# ----------------------------------------------------------------------------- the benchmark (parent)
def _read_json(proc: subprocess.Popen) -> dict:
    """The worker's next JSON line (other lines are passed on to stderr)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
        print(line, end="", file=sys.stderr)
    raise RuntimeError(f"the worker ended (exit {proc.wait()}) before it reported")


def start_competitors(k: int) -> list[subprocess.Popen]:
    """``k`` single-thread matmul loops, each in its own process; returns once every one computes."""
    env = dict(setting_env("default"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(k):
            procs.append(subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env, stdout=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL, text=True, start_new_session=True))
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a competitor ended (exit {p.wait()}) before it computed")
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    """Kill and reap every process in ``procs`` (SIGKILL: a matmul loop holds nothing worth flushing)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def measure(settings, competitors, steps: int, warmup: int, quick: bool, max_cell_s: float,
            settle_s: float = 1.0) -> dict:
    """Every cell of the table; ``pids`` lists each competitor started (all reaped on return)."""
    cells, pids = [], []
    for setting in settings:
        cmd = [sys.executable, "-m", "benchmarks.shared_cores", "--worker", "--steps", str(steps),
               "--warmup", str(warmup), "--max-cell-s", str(max_cell_s)] + \
            (["--quick"] if quick else []) + (["--free"] if setting == "free" else [])
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=setting_env(setting), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            ready = _read_json(proc)
            print(f"[{setting}] worker ready in {time.perf_counter() - t0:.1f}s, {ready['threads']} threads",
                  file=sys.stderr)
            for k in competitors:
                procs = start_competitors(k)
                pids += [p.pid for p in procs]
                try:
                    time.sleep(settle_s)
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    got = _read_json(proc)
                finally:
                    stop(procs)
                cell = {"setting": setting, "competitors": k, "threads": got["threads"], "steps": len(got["wall_s"]),
                        "wall_s": statistics.median(got["wall_s"]), "cpu_s": statistics.median(got["cpu_s"]),
                        "wall_all_s": got["wall_s"], "cpu_all_s": got["cpu_s"]}
                cells.append(cell)
                print(f"[{setting}] {k} competitor(s): {cell['wall_s']:.2f}s/step wall, {cell['cpu_s']:.2f}s CPU, "
                      f"{cell['threads']} thread(s)", file=sys.stderr)
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ref = reference(cells)
    for c in cells:
        c["ratio_to_reference"] = c["wall_s"] / ref["wall_s"] if ref else None
    return {"cells": cells, "reference": None if ref is None else ref["setting"], "competitor_pids": pids}


def reference(cells: list[dict]) -> dict | None:
    """The cell ratios are taken to: idle ``default`` if measured, else the first setting's idle cell."""
    idle = [c for c in cells if c["competitors"] == 0]
    return next((c for c in idle if c["setting"] == "default"), idle[0] if idle else None)


def table(cells: list[dict]) -> str:
    ref = reference(cells)
    rows = [f"| setting | competitors | threads | steps | wall s/step | CPU s/step | wall / idle {ref['setting'] if ref else '-'} |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        ratio = "" if c["ratio_to_reference"] is None else f"{c['ratio_to_reference']:.2f}x"
        rows.append(f"| {c['setting']} | {c['competitors']} | {c['threads']} | {c['steps']} | {c['wall_s']:.2f} | "
                    f"{c['cpu_s']:.2f} | {ratio} |")
    return "\n".join(rows) + "\n"


def _list(text: str, allowed=None, cast=str) -> list:
    items = [cast(x) for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; expected some of {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shared_cores", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="timed LeaSE steps per cell (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps when a worker starts (default 1)")
    p.add_argument("--max-cell-s", type=float, default=60.0,
                   help="stop a cell's timing after this many seconds (at least 2 steps; default 60)")
    p.add_argument("--competitors", type=lambda s: _list(s, cast=int), default=[0, 1, 2],
                   help="numbers of competing jobs, comma-separated (default 0,1,2)")
    p.add_argument("--settings", type=lambda s: _list(s, SETTINGS), default=list(SETTINGS),
                   help="OpenMP settings, comma-separated (default default,passive,free)")
    p.add_argument("--quick", action="store_true", help="a tiny supernet and 1 timed step, no warm-up (seconds)")
    p.add_argument("--out", default="runs/bench-shared_cores")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--free", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 1, 0
    if args.steps < 1 or args.warmup < 0 or any(k < 0 for k in args.competitors):
        p.error("--steps must be >= 1, --warmup and --competitors >= 0")
    if args.worker:
        return worker(args)
    t0 = time.perf_counter()
    try:
        load_before = os.getloadavg()
    except (AttributeError, OSError):
        load_before = None
    got = measure(args.settings, args.competitors, args.steps, args.warmup, args.quick, args.max_cell_s)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                          "load_before": load_before},
              "case": "tiny supernet (--quick)" if args.quick else "default search (digits preset)",
              "steps": args.steps, "warmup": args.warmup, "settings": args.settings,
              "competitors": args.competitors, "seconds": time.perf_counter() - t0, **got}
    md = table(got["cells"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shared_cores.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    print(md, end="")
    print(f"{report['case']}; load before {load_before}; {report['seconds']:.0f}s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
