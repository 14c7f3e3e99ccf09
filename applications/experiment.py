"""The arms of the digits applications (``hpo``, ``reweight``, ``ignore``).

Each of those programs compares several *arms* (an engine, a baseline, a seed),
each an ``mlo.Graph`` run by ``mlo.Runner``, in one run folder
(:mod:`applications.common.run_folder`: the same flags, resume and overwrite rules
as every program)::

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

import csv
import json
import os
import statistics
import time
from typing import Callable

import mlo

from applications.common.run_folder import Interrupted, Program, Run, cli_main, trim_logs

__all__ = ["Experiment", "Interrupted", "digits_program", "run_program", "over_seeds", "plot_over_seeds"]


class Experiment:
    """Runs named arms one after another in the run's folder and remembers which are done."""

    def __init__(self, run: Run, log_every: int = 10, checkpoint_every: int = 50):
        self.run, self.app = run, run.program.module.rsplit(".", 1)[-1]
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        run.start()
        self.out_dir = run.out
        self.metrics_path = os.path.join(run.out, "metrics.jsonl")
        self.done: dict[str, dict] = {}
        self._pending: tuple[str, mlo.RunCheckpoint] | None = None
        ckpt = run.resume_checkpoint(logs=("metrics.jsonl",))      # None: a new run, or none written yet
        if ckpt is not None:
            self.done = dict(ckpt.extra.get("done", {}))
            current, step = ckpt.extra.get("arm"), ckpt.step
            if current not in self.done:
                self._pending = (current, ckpt)
            trim_logs(run.out, lambda r: r.get("arm") in self.done
                      or (r.get("arm") == current and r.get("step", 0) <= step), names=("metrics.jsonl",))
        self._writers = [mlo.JSONLWriter(self.metrics_path)]
        if run.cfg.logging.tensorboard:
            self._writers.append(mlo.TensorBoardWriter(os.path.join(run.out, "tensorboard")))

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
            self.run.say(f"[{self.app}] {name}: already done, skipped")
            return self.done[name]

        def add_eval(step: int, row: dict) -> None:
            # Runner hands the same row to every callback in order, so metrics added
            # here reach the writers below.
            if evaluate is not None:
                row.update({f"eval/{k}": float(v) for k, v in evaluate().items()})

        def write(step: int, row: dict) -> None:
            self._writers[0](step, {"arm": name, **row})
            for w in self._writers[1:]:      # TensorBoard: one run per arm
                w(step, {f"{name}/{k}": v for k, v in row.items()})

        earlier = 0.0      # seconds this arm ran before an interruption (kept across resumes)
        t0 = time.perf_counter()
        runner = mlo.Runner(graph, callbacks=[add_eval, write], log_every=self.log_every,
                            progress=self.run.progress, checkpoint=self.run.checkpoint,
                            checkpoint_every=self.checkpoint_every,
                            extra_state=lambda: {"arm": name, "done": dict(self.done),
                                                 "seconds": earlier + time.perf_counter() - t0})
        if self._pending is not None and self._pending[0] == name:
            runner.restore(self._pending[1])
            earlier = float(self._pending[1].extra.get("seconds", 0.0))
            self.run.say(f"[{self.app}] {name}: resuming from step {runner.step}")
            self._pending = None
        else:
            self.run.say(f"[{self.app}] {name}: {steps} steps")
        runner.run(until=steps)
        if runner.interrupted:
            raise Interrupted(f"interrupted in arm {name!r} at step {runner.step}")
        result = dict(summary() if summary is not None else {})
        result.setdefault("time_s", round(earlier + time.perf_counter() - t0, 3))
        self.done[name] = result
        runner.save()  # the checkpoint now lists this arm as done
        return result

    # ------------------------------------------------------------------ outputs
    def finish(self, result: dict, plot: Callable[[str], None] | None = None, plot_name: str = "plot.png") -> dict:
        """Write ``result.json``, ``metrics.csv`` and the plot; return ``result``."""
        for w in self._writers:
            w.close()
        write_csv(self.metrics_path, os.path.join(self.out_dir, "metrics.csv"))
        if plot is not None:
            plot(os.path.join(self.out_dir, plot_name))
        with open(os.path.join(self.out_dir, "result.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        return result

    def rows(self) -> list[dict]:
        """Every metrics row logged so far (all arms)."""
        return read_jsonl(self.metrics_path)


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


def digits_program(app: str, config_cls: type, description: str, examples: list[list[str]],
                   plot_name: str) -> Program:
    """The :class:`Program` of a digits application: ``configs/default.yaml``, ``runs/<app>-<time>``."""
    return Program(module=f"applications.{app}", config_cls=config_cls, description=description,
                   default_config=os.path.join(os.path.dirname(__file__), app, "configs", "default.yaml"),
                   default_out=lambda cfg: os.path.join("runs", f"{app}-{time.strftime('%Y%m%d-%H%M%S')}"),
                   examples=examples, outputs=(plot_name,))


def run_program(program: Program, run_body: Callable[..., dict], argv: list[str] | None = None) -> int:
    """``cli_main`` for a digits application: one thread per ``cfg.threads``, then ``run_body(run)``."""
    import torch

    from applications.common import tune_cpu

    def body(run: Run) -> dict:
        tune_cpu()
        torch.set_num_threads(max(1, int(getattr(run.cfg, "threads", 1))))
        return run_body(run)
    return cli_main(program, body, argv)
