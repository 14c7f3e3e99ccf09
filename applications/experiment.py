"""The run folder shared by the digits applications (``hpo``, ``reweight``, ``ignore``).

Each of those programs compares several *arms* (an engine, a baseline, a seed),
each an ``mlo.Graph`` run by ``mlo.Runner``. :class:`Experiment` gives every
program the same output folder::

    config.yaml     the resolved settings (``--resume`` reads them back)
    metrics.jsonl   one JSON line per logged step, tagged with its arm
    metrics.csv     the same rows as a table (written at the end)
    checkpoint.pt   the running arm's graph state plus the finished arms' results
    <name>.png      the program's plot
    result.json     the comparison

and the same crash story: the checkpoint is written every ``checkpoint_every``
steps, at the end of each arm and on Ctrl-C; ``--resume DIR`` skips finished arms
and continues the interrupted one from its last checkpoint, exactly.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import mlo
import torch

from applications.common import ConfigError, add_common_args, load_config, pick_device, save_config, tune_cpu

__all__ = ["Experiment", "Interrupted", "main_for", "over_seeds", "plot_over_seeds"]

CHECKPOINT = "checkpoint.pt"


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived; the checkpoint has been written."""


class Experiment:
    """Runs named arms one after another in ``out_dir`` and remembers which are done."""

    def __init__(self, app: str, cfg: Any, out_dir: str, resume: bool = False, log_every: int = 10,
                 checkpoint_every: int = 50, progress: bool = True):
        self.app, self.cfg, self.out_dir = app, cfg, out_dir
        self.log_every, self.checkpoint_every, self.progress = log_every, checkpoint_every, progress
        os.makedirs(out_dir, exist_ok=True)
        self.ckpt = os.path.join(out_dir, CHECKPOINT)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.done: dict[str, dict] = {}
        self._pending: tuple[str, dict] | None = None
        if resume:
            state = mlo.load_checkpoint(self.ckpt)
            extra = state.get("extra", {})
            self.done = dict(extra.get("done", {}))
            if extra.get("arm") not in self.done:
                self._pending = (extra["arm"], state)
            self._trim_metrics(state)
        elif os.path.exists(self.metrics_path):
            os.unlink(self.metrics_path)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
        self._jsonl = mlo.JSONLWriter(self.metrics_path)

    # ------------------------------------------------------------------ arms
    def arm(self, name: str, graph: mlo.Graph, steps: int,
            evaluate: Callable[[], dict[str, float]] | None = None,
            summary: Callable[[], dict] | None = None) -> dict:
        """Run ``graph`` for ``steps`` outer steps as arm ``name``; return its summary.

        ``evaluate()`` adds held-out metrics (under ``eval/``) to every logged row;
        ``summary()`` is called once at the end and must return plain numbers,
        strings and lists (it is stored in the checkpoint). A finished arm is not
        run again on resume: its stored summary is returned.
        """
        if name in self.done:
            print(f"[{self.app}] {name}: already done, skipped", file=sys.stderr)
            return self.done[name]

        def add_eval(step: int, row: dict) -> None:
            # Runner hands the same row to every callback in order, so metrics added
            # here reach the writers below.
            if evaluate is not None:
                row.update({f"eval/{k}": float(v) for k, v in evaluate().items()})

        def write(step: int, row: dict) -> None:
            self._jsonl(step, {"arm": name, **row})

        runner = mlo.Runner(graph, callbacks=[add_eval, write], log_every=self.log_every,
                            progress=self.progress, checkpoint=self.ckpt,
                            checkpoint_every=self.checkpoint_every,
                            extra_state=lambda: {"arm": name, "done": dict(self.done)})
        if self._pending is not None and self._pending[0] == name:
            runner.load_state_dict(self._pending[1])
            print(f"[{self.app}] {name}: resuming at step {runner.step}", file=sys.stderr)
            self._pending = None
        else:
            print(f"[{self.app}] {name}: {steps} steps", file=sys.stderr)
        t0 = time.perf_counter()
        runner.run(steps)
        if runner.interrupted:
            raise Interrupted(f"interrupted in arm {name!r} at step {runner.step}")
        result = dict(summary() if summary is not None else {})
        result.setdefault("time_s", round(time.perf_counter() - t0, 3))
        self.done[name] = result
        runner.save()  # the checkpoint now lists this arm as done
        return result

    # ------------------------------------------------------------------ outputs
    def finish(self, result: dict, plot: Callable[[str], None] | None = None, plot_name: str = "plot.png") -> dict:
        """Write ``result.json``, ``metrics.csv`` and the plot; return ``result``."""
        self._jsonl.close()
        write_csv(self.metrics_path, os.path.join(self.out_dir, "metrics.csv"))
        if plot is not None:
            plot(os.path.join(self.out_dir, plot_name))
        with open(os.path.join(self.out_dir, "result.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        return result

    def rows(self) -> list[dict]:
        """Every metrics row logged so far (all arms)."""
        return read_jsonl(self.metrics_path)

    def _trim_metrics(self, state: dict) -> None:
        """Drop rows logged after the checkpoint, so a resumed run does not repeat them."""
        if not os.path.exists(self.metrics_path):
            return
        current = state.get("extra", {}).get("arm")
        step = int(state.get("step", 0))
        keep = [r for r in read_jsonl(self.metrics_path)
                if r.get("arm") in self.done or (r.get("arm") == current and r.get("step", 0) <= step)]
        with open(self.metrics_path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in keep)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_csv(jsonl_path: str, csv_path: str) -> None:
    """The JSONL rows as one CSV whose columns are the union of every row's keys."""
    rows = read_jsonl(jsonl_path)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def over_seeds(values: list[float], name: str) -> dict:
    """``{<name>_mean, <name>_std, per_seed}`` rounded to 4 digits (std 0 for a single seed)."""
    return {f"{name}_mean": round(statistics.fmean(values), 4),
            f"{name}_std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "per_seed": [round(v, 4) for v in values]}


def plot_over_seeds(ax, summary: dict[str, dict], name: str, seeds: list, ylabel: str, rotation: int = 0) -> None:
    """One bar per method (mean ± std of ``name`` from ``over_seeds``) with each seed as a dot."""
    methods = list(summary)
    for i, m in enumerate(methods):
        s = summary[m]
        ax.bar(i, s[f"{name}_mean"], yerr=s[f"{name}_std"], capsize=5, color=f"C{i}", alpha=0.7)
        ax.scatter([i] * len(s["per_seed"]), s["per_seed"], color="k", s=12, zorder=3)
    ax.set_xticks(range(len(methods)), methods, rotation=rotation)
    ax.set_ylabel(ylabel)
    ax.set_title(f"mean ± std over seeds {seeds}")


def main_for(app: str, config_cls: type, run: Callable[..., dict], description: str,
             argv: list[str] | None = None) -> int:
    """The shared command line: ``--config``, ``--set``, ``--out``, ``--resume``, ``--device``.

    ``run(cfg, out_dir, device, resume)`` does the work and returns ``result``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m applications.{app}", description=description)
    add_common_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="do not print the progress bar")
    args = parser.parse_args(argv)
    try:
        if args.resume:
            if args.config:
                raise ConfigError("--resume reuses the run's saved config.yaml; drop --config (use --set to change a value)")
            if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
                raise ConfigError("--resume writes to the run's own folder; drop --out")
            if not any(os.path.exists(os.path.join(args.resume, n)) for n in (CHECKPOINT, CHECKPOINT + ".prev")):
                raise ConfigError(f"--resume {args.resume}: no {CHECKPOINT} there to resume from")
            cfg = load_config(config_cls, os.path.join(args.resume, "config.yaml"), args.overrides)
            out_dir = args.resume
        else:
            default = os.path.join(os.path.dirname(__file__), app, "configs", "default.yaml")
            cfg = load_config(config_cls, args.config or default, args.overrides)
            out_dir = args.out or os.path.join("runs", f"{app}-{time.strftime('%Y%m%d-%H%M%S')}")
            if os.path.exists(os.path.join(out_dir, CHECKPOINT)):
                raise ConfigError(f"{out_dir} already holds a run; continue it with --resume {out_dir} "
                                  "or choose another --out")
        device = pick_device(args.device)
    except (ConfigError, mlo.ConfigError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tune_cpu()
    torch.set_num_threads(max(1, int(getattr(cfg, "threads", 1))))
    try:
        result = run(cfg, out_dir, device, resume=bool(args.resume), progress=not args.no_progress)
    except Interrupted as exc:
        print(f"[{app}] {exc}; checkpoint saved, continue with: python -m applications.{app} --resume {out_dir}",
              file=sys.stderr)
        return 130
    except (mlo.MLOError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.get("summary", result), indent=1))
    print(f"[{app}] done -> {out_dir}", file=sys.stderr)
    return 0
