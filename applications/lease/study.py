"""``python -m applications.lease.study``: does LeaSE find better cells than its baseline and random cells?

    python -m applications.lease.study [--config STUDY_YAML] [--set key=value ...] [--out DIR] [--resume DIR]
        [--search-config SEARCH_YAML] [--train-config TRAIN_YAML] [--seeds 5] [--eval-seeds 3]
        [--methods lease,baseline,...] [--search-set key=value ...] [--train-set key=value ...]
        [--data-root DIR] [--device auto|cpu|cuda] [--jobs 1] [--quick] [--report-only]

The flags and folder rules are every program's (``applications.common.run_folder``):
``--config`` is a study preset (``configs/study_<task>.yaml``: which search preset,
train preset, methods and seeds; :class:`StudyConfig`), a second study into the
same folder is refused, and ``--resume DIR`` continues one.

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
* ``lease-fd`` / ``baseline-fd``: finite differences on every edge (the paper's engine);
* ``baseline-exact``: the baseline with the exact engine (``unrolled``, kept step graph);
* ``random``: no search.

Every (method, seed) has its own folder ``runs/<method>/seed<N>/`` with
``search/`` and ``eval<K>/``; ``--resume`` skips what has finished and resumes
what was interrupted. The table (``study.json``, ``study.md``,
``study.png``; :mod:`.study_table`) is rewritten after every finished run.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from applications.common import ConfigError, load_config
from applications.common.run_folder import (Interrupted, LoggingConfig, Program, Run, RunFailed, cli_main,
                                            handle_interrupts, restore_handlers)

from . import arch_stats, study_table
from .config import SearchConfig
from .spaces.genotype import PRIMITIVES, genotype_to_json

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = {
    "lease": [],
    "baseline": ["mode=baseline"],
    # the exact engine on every edge, through the real steps' kept graphs (the same numbers, faster)
    "lease-exact": [kv for e in ("explainer", "explanation", "audience")
                    for kv in (f"engines.{e}.name=unrolled", f"engines.{e}.reuse_step_graph=true")],
    "lease-pgd": ["explain.method=pgd"],
    # the same with the other engine: finite differences on every edge (the paper's), or the baseline exact
    "lease-fd": [f"engines.{e}.name=finite_difference" for e in ("explainer", "explanation", "audience")],
    "baseline-fd": ["mode=baseline", "engines.explainer.name=finite_difference"],
    "baseline-exact": ["mode=baseline", "engines.explainer.name=unrolled", "engines.explainer.reuse_step_graph=true"],
    "random": None,
}
CORE = ("lease", "baseline", "random")
QUICK_SEARCH = ["epochs=2", "max_steps_per_epoch=6", "arch_start_epoch=1", "log_every=2"]
QUICK_TRAIN = ["train.epochs=4"]


@dataclass
class StudyConfig:
    """What a study runs (``configs/study_<task>.yaml``; ``--print-config`` shows every key)."""

    search_config: str = ""          # search preset (empty: the digits preset)
    train_config: str = ""           # evaluation preset (empty: train_<dataset>_study.yaml, else train_<dataset>.yaml)
    methods: list[Literal["lease", "baseline", "lease-exact", "lease-pgd", "lease-fd", "baseline-fd",
                          "baseline-exact", "random"]] = field(
        default_factory=lambda: list(METHODS))
    seeds: int = 5                   # search seeds per method
    seed: int | None = None          # the first (None: the search preset's seed, so lease/seed<it> is its own run)
    eval_seeds: int = 3              # trainings from scratch per cell
    search_set: list[str] = field(default_factory=list)     # KEY=VALUE for every search method's search
    train_set: list[str] = field(default_factory=list)      # KEY=VALUE for every training
    data_root: str = ""              # sets data.root of the searches and trainings
    device: Literal["auto", "cpu", "cuda"] = "auto"
    jobs: int = 1                    # (method, seed) runs at once (CPU: at most the cores)
    target_ops: list[str] | None = None     # ops the task should favour (synthetic task: its TARGET_OPS)
    quick: bool = False              # short searches and trainings (with seeds=2, eval_seeds=1: --quick)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        for key in ("seeds", "eval_seeds", "jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if not self.methods:
            raise ConfigError(f"methods: empty; choose from {', '.join(METHODS)}")
        for key in ("search_set", "train_set"):
            bad = [kv for kv in getattr(self, key) if "=" not in kv]
            if bad:
                raise ConfigError(f"{key}: {bad[0]!r} is not KEY=VALUE")


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
    child_flags: list[str] = field(default_factory=list)    # for every search and training (--tensorboard)
    child_env: dict | None = None    # the children's environment (``run_study``: threads split between jobs)

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

    def __init__(self, total: int, show: bool = True):
        self.total, self.done, self.running, self.lock, self.show = total, 0, {}, threading.Lock(), show

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
        if not self.show:
            return
        now = "; ".join(self.running.values()) or "-"
        print(f"[study] {self.done}/{self.total} runs done, {self.total - self.done} left; running: {now}",
              file=sys.stderr, flush=True)


_LIVE: set[subprocess.Popen] = set()       # the children running now (``stop_children``)
_LIVE_LOCK = threading.Lock()
_STOP = threading.Event()                   # set by ``stop_children``: start no new child


def _child(module: str, args: list[str], log: str, env: dict | None = None) -> None:
    """Run ``python -m module args`` with output to ``log``; exit 130 stops the study, any other failure raises.

    The child runs in its own session, so an interrupt reaches it once, from the study
    (:func:`stop_children`), whether the study got Ctrl-C, ``kill -INT`` or SIGTERM."""
    if _STOP.is_set():
        raise StudyStopped("the study was interrupted")
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ python -m {module} {shlex.join(args)}\n")
        fh.flush()
        proc = subprocess.Popen([sys.executable, "-m", module, *args, "--no-progress"], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
        with _LIVE_LOCK:
            _LIVE.add(proc)
            if _STOP.is_set():            # interrupted while it was starting
                proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    if code in (130, -signal.SIGINT):     # checkpointed and stopped (or stopped before it had started)
        raise StudyStopped(f"python -m {module} was interrupted")
    if code != 0:
        with open(log, encoding="utf-8") as fh:
            tail = fh.read()[-1500:]
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed (exit {code}); log {log}:\n{tail}")


def stop_children() -> None:
    """Ask every running child to stop (SIGINT: it checkpoints and exits 130); start no new one."""
    with _LIVE_LOCK:
        _STOP.set()
        procs = list(_LIVE)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass


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
        _child("applications.lease.search", args + ["--device", study.device, *study.child_flags],
               os.path.join(study.folder(method, seed), "search.log"), study.child_env)
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
        _child("applications.lease.train", args + ["--device", study.device, *study.child_flags],
               os.path.join(study.folder(method, seed), f"eval{e}.log"), study.child_env)


def run_one(study: Study, method: str, seed: int, progress: Progress, lock: threading.Lock) -> None:
    key = f"{method}/{seed}"
    genotype = _random_cell(study, seed) if METHODS[method] is None else _search(study, method, seed, progress, key)
    _evaluate(study, method, seed, genotype, progress, key)
    progress.finish(key)
    with lock:
        study_table.write(study)


def run_study(study: Study, jobs: int = 1, progress: bool = True) -> int:
    """Run what is missing; 0 ok, 1 a run failed, 130 stopped."""
    os.makedirs(study.out, exist_ok=True)
    # seed-major over lease, baseline and random first (the paired headline), then the variants
    core = [m for m in study.methods if m in CORE]
    rest = [m for m in study.methods if m not in CORE]
    tasks = [(m, s) for s in study.seeds for m in core] + [(m, s) for s in study.seeds for m in rest]
    progress, lock, failed, stopped = Progress(len(tasks), progress), threading.Lock(), [], []
    _STOP.clear()
    study.child_env = child_env(jobs)

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
    previous = handle_interrupts()    # Ctrl-C, kill -INT and SIGTERM, however the study was started
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            try:
                list(pool.map(task, tasks))
            except KeyboardInterrupt:    # pass it on once; the pool then waits for the children to checkpoint
                stopped.append("Ctrl-C")
                stop_children()
    finally:
        restore_handlers(previous)
    study_table.write(study)
    if stopped:
        return 130
    print(f"[study] table in {os.path.join(study.out, 'study.md')}", file=sys.stderr)
    return 1 if failed else 0


def child_env(jobs: int, cores: int | None = None) -> dict | None:
    """With several children at once, each gets its share of the cores as its thread count
    (``OMP_NUM_THREADS``, unless set): two processes each using every core stall each other."""
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return dict(os.environ, OMP_NUM_THREADS=str(max(1, (cores or os.cpu_count() or 1) // jobs)))


def build_study(cfg: StudyConfig, out: str, command: str) -> Study:
    """The plan of a study: its presets resolved and checked (a bad search preset or key fails here)."""
    config = _search_config(cfg)
    search_set = (QUICK_SEARCH if cfg.quick else []) + list(cfg.search_set)
    train_set = (QUICK_TRAIN if cfg.quick else []) + list(cfg.train_set)
    if cfg.data_root:
        search_set.append(f"data.root={cfg.data_root}")
        train_set.append(f"data.root={cfg.data_root}")
    search = load_config(SearchConfig, config, search_set)
    if search.space.name != "darts" and "random" in cfg.methods:
        raise ConfigError(f"methods: random samples from the DARTS space; the search's space.name is "
                          f"{search.space.name!r}")
    target = cfg.target_ops
    if target is None and search.data.name == "synthetic":
        from .synthetic import TARGET_OPS
        target = list(TARGET_OPS)
    first = search.seed if cfg.seed is None else cfg.seed
    return Study(out=out, config=config, train_config=_resolve(cfg.train_config) if cfg.train_config else default_train_config(search.data.name),
                 methods=list(cfg.methods), seeds=[first + i for i in range(cfg.seeds)],
                 eval_seeds=list(range(cfg.eval_seeds)), search_set=search_set, train_set=train_set,
                 device=cfg.device, target_ops=target, nodes=search.space.nodes, command=command,
                 child_flags=["--tensorboard"] if cfg.logging.tensorboard else [])


def _search_config(cfg: StudyConfig) -> str:
    return _resolve(cfg.search_config) if cfg.search_config else os.path.join(CONFIG_DIR, "digits.yaml")


def _resolve(path: str) -> str:
    """A preset path as given, or relative to the project root when that is where it is (presets name
    ``applications/lease/configs/...``, so a study preset works from any folder)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    rooted = os.path.join(ROOT, path)
    return rooted if os.path.exists(rooted) else path


def _default_out(cfg: StudyConfig) -> str:
    name = load_config(SearchConfig, _search_config(cfg), ()).name
    return os.path.join("runs", f"study-{name}" + ("-quick" if cfg.quick else ""))


def _flags(p) -> None:
    p.add_argument("--search-config", metavar="YAML", help="search preset (--set search_config=YAML)")
    p.add_argument("--train-config", metavar="YAML", help="evaluation preset (--set train_config=YAML)")
    p.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=int, metavar="N", help="search seeds per method (--set seeds=N)")
    p.add_argument("--eval-seeds", type=int, metavar="N", help="trainings per cell (--set eval_seeds=N)")
    p.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a search setting for every search method (repeatable)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting (repeatable)")
    p.add_argument("--data-root", metavar="DIR", help="data folder of the searches and trainings")
    p.add_argument("--jobs", type=int, metavar="N", help="(method, seed) runs at once")
    p.add_argument("--target-ops", help="comma-separated ops the task should favour")
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, 1 training each, short searches and trainings, 2 runs at once on 2+ cores")
    p.add_argument("--report-only", action="store_true", help="rewrite the table from the finished runs; run nothing")


def _flag_overrides(args) -> list[str]:
    # --quick: two runs at once where there are two cores (a later --jobs wins)
    items = ["quick=true", "seeds=2", "eval_seeds=1", f"jobs={min(2, os.cpu_count() or 1)}"] if args.quick else []
    for flag, key in (("search_config", "search_config"), ("train_config", "train_config"), ("seeds", "seeds"),
                      ("eval_seeds", "eval_seeds"), ("data_root", "data_root"), ("jobs", "jobs")):
        if getattr(args, flag) is not None:
            items.append(f"{key}={getattr(args, flag)}")
    if args.methods is not None:
        items.append("methods=" + json.dumps([m.strip() for m in args.methods.split(",") if m.strip()]))
    if args.target_ops is not None:
        items.append("target_ops=" + json.dumps(args.target_ops.split(",")))
    for flag in ("search_set", "train_set"):
        if getattr(args, flag):
            items.append(f"{flag}=" + json.dumps(getattr(args, flag)))
    return items


PROGRAM = Program(
    module="applications.lease.study", config_cls=StudyConfig,
    description="LeaSE against its baseline and random cells: searches, trainings from scratch, a paired table "
                "(docs/lease.md). Exit codes: 0 done, 1 a run failed (the others finished), 2 bad configuration "
                "or path, 130 interrupted (resume with --resume).",
    default_config=os.path.join(CONFIG_DIR, "study_digits.yaml"), default_out=_default_out,
    examples=[[], ["--quick"], ["--config", "applications/lease/configs/study_synthetic.yaml"],
              ["--config", "applications/lease/configs/study_cifar10.yaml", "--data-root", "data", "--device", "cuda"],
              ["--methods", "lease,baseline,random", "--seeds", "3", "--out", "runs/study-small"],
              ["--resume", "runs/study-digits", "--report-only"]],
    outputs=("study.json", "study.md", "study.png", "command.txt", "runs"),
    extra_args=_flags, overrides_from_args=_flag_overrides)


def _command(run: Run, argv: list[str]) -> str:
    """The command that started the study (kept in ``command.txt``; a resume keeps the first one)."""
    path = os.path.join(run.out, "command.txt")
    if run.resume and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    command = ("python -m applications.lease.study " + shlex.join(argv)).strip()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(command + "\n")
    return command


def _body(run: Run) -> dict:
    study = build_study(run.cfg, run.out, "")
    run.start(lock=not run.args.report_only)     # the table can be rewritten while the study runs
    study.command = _command(run, run.argv)
    if run.args.report_only:
        study_table.write(study)
        run.say(f"[study] table in {os.path.join(study.out, 'study.md')}")
        return {"table": os.path.join(study.out, "study.md")}
    t0 = time.time()
    code = run_study(study, run.cfg.jobs, progress=run.progress)
    run.say(f"[study] {time.time() - t0:.0f} s this invocation")
    if code == 130:
        raise Interrupted("study stopped")
    if code != 0:
        raise RunFailed(f"some runs failed (their logs are named above); the others finished; "
                        f"re-run the failed ones with --resume {run.out}")
    return {"table": os.path.join(study.out, "study.md")}


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a run failed (the others finished), 2 bad arguments, 130 interrupted (resume)."""
    return cli_main(PROGRAM, _body, argv)


if __name__ == "__main__":
    sys.exit(main())
