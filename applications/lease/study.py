"""``python -m applications.lease.study``: does LeaSE find better cells than its baseline and random cells?

    python -m applications.lease.study [--config SEARCH_YAML] [--train-config TRAIN_YAML] [--out DIR]
        [--seeds 5] [--eval-seeds 3] [--methods lease,baseline,random,lease-exact,lease-pgd]
        [--set key=value ...] [--train-set key=value ...] [--data-root DIR] [--device auto|cpu|cuda]
        [--jobs 1] [--quick] [--report-only]

For every seed: each search method runs ``applications.lease.search`` with
``seed=<seed>`` (the same seed across methods, so the comparisons are paired),
``random`` draws a cell uniformly from the same space, and every cell is
trained from scratch ``--eval-seeds`` times by ``applications.lease.train``
under one protocol (the train preset) and tested on the test split, which no
search sees. Methods:

* ``lease``: the preset as it is (finite differences on every edge, ascent explanations);
* ``baseline``: the same preset with ``mode: baseline`` (DARTS-2nd through the same code);
* ``lease-exact``: the exact engine (``unrolled``) on every edge;
* ``lease-pgd``: ``explain.method: pgd``;
* ``random``: no search.

Every (method, seed) has its own folder ``runs/<method>/seed<N>/`` with
``search/`` and ``eval<K>/``; a re-run skips what has finished and resumes
(``--resume``) what was interrupted. The table (``study.json``, ``study.md``,
``study.png``; :mod:`.study_table`) is rewritten after every finished run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from applications.common import ConfigError, load_config

from . import arch_stats, study_table
from .config import SearchConfig
from .spaces.genotype import PRIMITIVES, genotype_to_json

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
METHODS = {
    "lease": [],
    "baseline": ["mode=baseline"],
    "lease-exact": [f"engines.{e}.name=unrolled" for e in ("explainer", "explanation", "audience")],
    "lease-pgd": ["explain.method=pgd"],
    "random": None,
}
CORE = ("lease", "baseline", "random")
QUICK_SEARCH = ["epochs=2", "max_steps_per_epoch=6", "arch_start_epoch=1", "log_every=2"]
QUICK_TRAIN = ["train.epochs=4"]


class StudyStopped(Exception):
    """A child was interrupted (Ctrl-C): stop scheduling; everything finished so far is kept."""


@dataclass
class Study:
    """What one invocation runs: where, with which presets, for which methods and seeds."""

    out: str
    config: str
    train_config: str
    methods: list[str]
    seeds: list[int]
    eval_seeds: list[int]
    search_set: list[str] = field(default_factory=list)
    train_set: list[str] = field(default_factory=list)
    device: str = "auto"
    target_ops: list[str] | None = None
    nodes: int = 4
    command: str = ""

    def folder(self, method: str, seed: int) -> str:
        return os.path.join(self.out, "runs", method, f"seed{seed}")


def default_train_config(dataset: str) -> str:
    """``train_<dataset>_study.yaml`` when there is one (a protocol that can rank cells), else ``train_<dataset>.yaml``."""
    for name in (f"train_{dataset}_study.yaml", f"train_{dataset}.yaml"):
        path = os.path.join(CONFIG_DIR, name)
        if os.path.exists(path):
            return path
    raise ConfigError(f"--train-config: no train preset for dataset {dataset!r} in {CONFIG_DIR}; pass one")


class Progress:
    """One line per event: what runs now, how many (method, seed) runs are done and left."""

    def __init__(self, total: int):
        self.total, self.done, self.running, self.lock = total, 0, {}, threading.Lock()

    def start(self, key: str, what: str) -> None:
        with self.lock:
            self.running[key] = what
            self._line()

    def finish(self, key: str) -> None:
        with self.lock:
            self.running.pop(key, None)
            self.done += 1
            self._line()

    def _line(self) -> None:
        now = "; ".join(self.running.values()) or "-"
        print(f"[study] {self.done}/{self.total} runs done, {self.total - self.done} left; running: {now}",
              file=sys.stderr, flush=True)


def _child(module: str, args: list[str], log: str) -> None:
    """Run ``python -m module args`` with output to ``log``; exit 130 stops the study, any other failure raises."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ python -m {module} {shlex.join(args)}\n")
        fh.flush()
        code = subprocess.run([sys.executable, "-m", module, *args, "--no-progress"], stdout=fh,
                              stderr=subprocess.STDOUT).returncode
    if code == 130:
        raise StudyStopped(f"python -m {module} was interrupted")
    if code != 0:
        with open(log, encoding="utf-8") as fh:
            tail = fh.read()[-1500:]
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed (exit {code}); log {log}:\n{tail}")


def _continue(run: str) -> list[str] | None:
    """``--resume run`` when the run has a checkpoint; ``None`` (start it, over any partial files) otherwise."""
    if any(os.path.exists(os.path.join(run, f"checkpoint.pt{tail}")) for tail in ("", ".prev")):
        return ["--resume", run]
    return None


def _search(study: Study, method: str, seed: int, progress: Progress, key: str) -> str:
    """The searched genotype file of (method, seed), searching or resuming first when needed."""
    run = os.path.join(study.folder(method, seed), "search")
    if not os.path.exists(os.path.join(run, "result.json")):
        progress.start(key, f"{method}/seed{seed} search")
        args = _continue(run)
        if args is None:
            args = ["--config", study.config, "--out", run, "--overwrite", "--set", f"seed={seed}"]
            for kv in METHODS[method] + study.search_set:
                args += ["--set", kv]
        os.makedirs(study.folder(method, seed), exist_ok=True)
        _child("applications.lease.search", args + ["--device", study.device],
               os.path.join(study.folder(method, seed), "search.log"))
    return os.path.join(run, "genotype.json")


def _random_cell(study: Study, seed: int) -> str:
    """A cell drawn uniformly from the searched space (``random.Random(seed)``), saved as JSON."""
    path = os.path.join(study.folder("random", seed), "genotype.json")
    if not os.path.exists(path):
        ops = [list(PRIMITIVES)] * sum(n + 2 for n in range(study.nodes))
        genotype = arch_stats.random_genotype({"normal": ops, "reduce": ops}, study.nodes, random.Random(seed))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(genotype_to_json(genotype), fh, indent=1)
        os.replace(tmp, path)
    return path


def _evaluate(study: Study, method: str, seed: int, genotype: str, progress: Progress, key: str) -> None:
    """Train the cell once per evaluation seed (resuming a partial run)."""
    for e in study.eval_seeds:
        run = os.path.join(study.folder(method, seed), f"eval{e}")
        if os.path.exists(os.path.join(run, "result.json")):
            continue
        progress.start(key, f"{method}/seed{seed} eval{e}")
        args = _continue(run)
        if args is None:
            args = ["--genotype", genotype, "--config", study.train_config, "--out", run, "--overwrite",
                    "--set", f"seed={e}"]
            for kv in study.train_set:
                args += ["--set", kv]
        _child("applications.lease.train", args + ["--device", study.device],
               os.path.join(study.folder(method, seed), f"eval{e}.log"))


def run_one(study: Study, method: str, seed: int, progress: Progress, lock: threading.Lock) -> None:
    key = f"{method}/{seed}"
    genotype = _random_cell(study, seed) if METHODS[method] is None else _search(study, method, seed, progress, key)
    _evaluate(study, method, seed, genotype, progress, key)
    progress.finish(key)
    with lock:
        study_table.write(study)


def run_study(study: Study, jobs: int = 1) -> int:
    """Run what is missing; 0 ok, 1 a run failed, 130 stopped."""
    os.makedirs(study.out, exist_ok=True)
    with open(os.path.join(study.out, "study_args.json"), "w", encoding="utf-8") as fh:
        json.dump({k: v for k, v in study.__dict__.items()}, fh, indent=1)
    # seed-major over lease, baseline and random first (the paired headline), then the variants
    core = [m for m in study.methods if m in CORE]
    rest = [m for m in study.methods if m not in CORE]
    tasks = [(m, s) for s in study.seeds for m in core] + [(m, s) for s in study.seeds for m in rest]
    progress, lock, failed, stopped = Progress(len(tasks)), threading.Lock(), [], []

    def task(ms):
        if stopped:
            return
        try:
            run_one(study, *ms, progress, lock)
        except StudyStopped as e:
            stopped.append(str(e))
        except RuntimeError as e:
            failed.append(f"{ms[0]}/seed{ms[1]}: {e}")
            print(f"[study] {ms[0]}/seed{ms[1]} failed: {e}", file=sys.stderr, flush=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(task, tasks))
    except KeyboardInterrupt:        # the children got it too: they checkpoint and exit 130
        stopped.append("Ctrl-C")
    study_table.write(study)
    if stopped:
        print(f"[study] stopped ({stopped[0]}); continue with:\n  {study.command}", file=sys.stderr)
        return 130
    print(f"[study] table in {os.path.join(study.out, 'study.md')}", file=sys.stderr)
    return 1 if failed else 0


def build_study(args, argv: list[str]) -> Study:
    config = args.config or os.path.join(CONFIG_DIR, "digits.yaml")
    search_set = (QUICK_SEARCH if args.quick else []) + list(args.search_set)
    train_set = (QUICK_TRAIN if args.quick else []) + list(args.train_set)
    if args.data_root:
        search_set.append(f"data.root={args.data_root}")
        train_set.append(f"data.root={args.data_root}")
    cfg = load_config(SearchConfig, config, search_set)       # fails now on a bad preset or key
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown or methods}; choose from {', '.join(METHODS)}")
    if cfg.space.name != "darts" and "random" in methods:
        raise ConfigError(f"--methods random samples from the DARTS space; space.name is {cfg.space.name!r}")
    seeds = 2 if args.quick and args.seeds is None else (args.seeds or 5)
    eval_seeds = 1 if args.quick and args.eval_seeds is None else (args.eval_seeds or 3)
    target = args.target_ops.split(",") if args.target_ops else None
    first = cfg.seed if args.first_seed is None else args.first_seed
    if target is None and cfg.data.name == "synthetic":
        from .synthetic import TARGET_OPS
        target = list(TARGET_OPS)
    out = args.out or os.path.join("runs", f"study-{cfg.name}" + ("-quick" if args.quick else ""))
    return Study(out=out, config=config, train_config=args.train_config or default_train_config(cfg.data.name),
                 methods=methods, seeds=[first + i for i in range(seeds)],
                 eval_seeds=list(range(eval_seeds)), search_set=search_set, train_set=train_set, device=args.device,
                 target_ops=target, nodes=cfg.space.nodes,
                 command=("python -m applications.lease.study " + shlex.join(argv)).strip())


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run failed (the others finished), 2 bad arguments, 130 interrupted (re-run to resume)."""
    p = argparse.ArgumentParser(prog="python -m applications.lease.study",
                                description="LeaSE against its baseline and random cells: searches, "
                                            "trainings from scratch, a paired table (docs/lease.md).")
    p.add_argument("--config", help="search preset (default: the digits preset)")
    p.add_argument("--train-config", help="evaluation preset (default: train_<dataset>_study.yaml or train_<dataset>.yaml)")
    p.add_argument("--out", help="study folder (default runs/study-<name>)")
    p.add_argument("--seeds", type=int, default=None, help="search seeds (default 5; --quick 2)")
    p.add_argument("--first-seed", type=int, default=None,
                   help="first seed (default: the preset's seed, so lease/seed<it> is the preset's own run)")
    p.add_argument("--eval-seeds", type=int, default=None, help="trainings per cell (default 3; --quick 1)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--set", dest="search_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search setting for every search method")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="override a train setting")
    p.add_argument("--data-root", help="data folder (sets data.root for the searches and the trainings)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--jobs", type=int, default=1, help="(method, seed) runs at once (CPU: at most the cores)")
    p.add_argument("--target-ops", help="ops the task should favour (default for the synthetic task: its TARGET_OPS)")
    p.add_argument("--quick", action="store_true", help="2 seeds, 1 evaluation each, short searches and trainings")
    p.add_argument("--report-only", action="store_true", help="rewrite the table from the finished runs; run nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    try:
        study = build_study(args, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report_only:
        study_table.write(study)
        print(f"[study] table in {os.path.join(study.out, 'study.md')}", file=sys.stderr)
        return 0
    t0 = time.time()
    code = run_study(study, args.jobs)
    print(f"[study] {time.time() - t0:.0f} s this invocation", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
