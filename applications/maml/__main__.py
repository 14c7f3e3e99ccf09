"""Few-shot learning on digits: ``python -m applications.maml``.

Examples::

    python -m applications.maml                                  # configs/default.yaml
    python -m applications.maml --config applications/maml/configs/tiny.yaml --out runs/maml-tiny
    python -m applications.maml --set methods=[maml,fomaml] --set seeds=[0,1,2,3,4]
    python -m applications.maml --set engines.imaml.iterations=10 --set imaml_lam=0.5
    python -m applications.maml --set eval.split=val --set seeds=[0]   # meta-validation: choose settings here
    python -m applications.maml --resume runs/maml-...           # continue after Ctrl-C

Methods, each run once per seed (``<method>-seed<N>`` arms), all from the same
initial network for a seed and scored on the same meta-test episodes:
``scratch`` (the initial network, no training: fine-tuned on each test task),
``pretrain`` (one classifier over every meta-train class, then a new head
fine-tuned on each test task), ``maml`` (``engines.maml``, default
``Unrolled(steps=inner.steps)``), ``imaml`` (``engines.imaml``, default CG, with
the proximal term ``imaml_lam``), ``fomaml`` (``engines.fomaml``). Test-time
adaptation is the inner loop: ``inner.steps`` SGD steps at ``inner.lr``.
``task_batched=true`` declares the meta-batch as one task-batched problem
instead of ``meta_batch`` problems (the same hypergradients, vectorized).

Three disjoint pools of examples: meta-train (every class not in
``data.test_classes``, less the meta-validation pool), meta-validation
(``data.val_classes``, or when that is empty a held-out ``data.val_fraction`` of
each meta-train class's examples) and meta-test (``data.test_classes``).
``eval.split=val`` scores every method on meta-validation tasks and never reads
the meta-test pool; settings are chosen there. ``eval.split=test`` (the
default) is the final evaluation.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

import numpy as np
import torch

import mlo
from applications import digits
from applications.common import ConfigError
from applications.common.run_folder import LoggingConfig, Run
from applications.experiment import Experiment, digits_program, run_program

from . import problems

METHODS = ("scratch", "pretrain", "maml", "imaml", "fomaml")


@dataclass
class DataConfig:
    test_classes: list[int] = field(default_factory=lambda: [7, 8, 9])   # read only by eval.split=test
    val_classes: list[int] = field(default_factory=lambda: [4, 5, 6])    # meta-validation; [] = held-out examples
    val_fraction: float = 0.3        # with no val_classes: share of each meta-train class held out for meta-val
    n_way: int = 3
    k_shot: int = 5
    n_query: int = 10                # query examples per class
    test_episodes: int = 200         # meta-test tasks per seed (the same for every method)
    val_episodes: int = 200          # meta-validation tasks per seed (eval.split=val)


@dataclass
class EvalConfig:
    split: str = "test"              # val: score on meta-validation tasks (to choose settings); test: meta-test

    def validate(self) -> None:
        if self.split not in ("val", "test"):
            raise ConfigError(f"eval.split: expected val or test, got {self.split!r}", field="eval.split")


@dataclass
class InnerConfig:
    lr: float = 0.5                  # SGD on a task (training and test-time adaptation alike)
    steps: int = 5


@dataclass
class PretrainConfig:
    steps: int = 300                 # Adam steps of the baseline classifier over the meta-train classes
    lr: float = 0.003
    batch_size: int = 64


@dataclass
class EnginesConfig:
    """The engine on each task→meta edge (any field of that mlo engine)."""

    maml: mlo.Engine = mlo.Unrolled(steps=5)      # steps must equal inner.steps for exact MAML
    imaml: mlo.Engine = mlo.CG(iterations=5)
    fomaml: mlo.Engine = mlo.FOMAML()

    def make(self, method: str) -> mlo.Engine:
        return getattr(self, method)


@dataclass
class MAMLConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    outer_steps: int = 300           # meta-training steps of each meta-learner
    meta_batch: int = 4              # tasks per meta-training step (one problem each)
    task_batched: bool = False       # the meta-batch as one task-batched problem (Problem(tasks=...), vmap)
    meta_lr: float = 3e-5            # Adam on the meta-parameters θ (chosen on meta-validation, docs/maml.md)
    imaml_lam: float = 0.03          # iMAML's proximal weight λ (training and test-time adaptation; chosen likewise)
    hidden: int = 32                 # two hidden layers of this width
    log_every: int = 25
    checkpoint_every: int = 100
    threads: int = 1
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods: expected distinct names from {', '.join(METHODS)}, got {self.methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected distinct integers, got {self.seeds}")
        for key in ("outer_steps", "meta_batch", "hidden", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        d = self.data
        for key in ("test_classes", "val_classes"):
            classes = getattr(d, key)
            if len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
                raise ConfigError(f"data.{key}: expected distinct digits 0..9, got {classes}", field=f"data.{key}")
        if set(d.val_classes) & set(d.test_classes):
            raise ConfigError(f"data.val_classes: must not overlap data.test_classes, got {d.val_classes} "
                              f"and {d.test_classes}", field="data.val_classes")
        if not d.val_classes and not 0.0 < d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in (0, 1), got {d.val_fraction}", field="data.val_fraction")
        if d.k_shot < 1 or d.n_query < 1 or d.test_episodes < 1 or d.val_episodes < 1:
            raise ConfigError("data: k_shot, n_query, test_episodes, val_episodes must be >= 1")
        labels = digits.arrays()[1]
        pools = problems.split_indices(labels, d.test_classes, d.val_classes, d.val_fraction)
        for name, idx in pools.items():
            counts = np.bincount(labels[idx], minlength=10)
            counts = counts[counts > 0]
            if not 2 <= d.n_way <= len(counts):
                raise ConfigError(f"data.n_way: must be >= 2 and at most the number of {name} classes "
                                  f"({len(counts)}), got {d.n_way}", field="data.n_way")
            if d.k_shot + d.n_query > counts.min():
                raise ConfigError(f"data: k_shot + n_query ({d.k_shot + d.n_query}) exceeds the smallest "
                                  f"{name} class ({counts.min()} examples)", field="data.k_shot")
        if self.inner.steps < 1 or self.pretrain.steps < 1:
            raise ConfigError("inner.steps and pretrain.steps: must be >= 1")
        if self.imaml_lam < 0:
            raise ConfigError(f"imaml_lam: must be >= 0, got {self.imaml_lam}")
        maml = self.engines.maml
        if isinstance(maml, mlo.Unrolled) and maml.steps > self.inner.steps:
            raise ConfigError(f"engines.maml.steps ({maml.steps}) cannot exceed inner.steps "
                              f"({self.inner.steps}); equal is exact MAML", field="engines.maml.steps")


def run(r: Run) -> dict:
    cfg, device = r.cfg, r.device
    d, inner, split = cfg.data, cfg.inner, cfg.eval.split
    data = problems.load_data(d.test_classes, device, d.val_classes, d.val_fraction)
    if split == "val":
        data = replace(data, test={})       # choosing settings: the meta-test pool is not even in memory
    exp = Experiment(r, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)
    per_method: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    for seed in cfg.seeds:
        if split == "test":      # the only place the meta-test pool is read
            eval_tasks = problems.episodes(data.test, d.test_episodes, d.n_way, d.k_shot, d.n_query, 10_000 + seed)
        else:
            eval_tasks = problems.episodes(data.val, d.val_episodes, d.n_way, d.k_shot, d.n_query, 20_000 + seed)
        for method in cfg.methods:
            torch.manual_seed(seed)
            lam = cfg.imaml_lam if method == "imaml" else 0.0
            if method == "pretrain":
                graph, net = problems.build_pretrain_graph(data, data.features, cfg.hidden, cfg.pretrain.lr,
                                                           cfg.pretrain.batch_size, cfg.pretrain.steps, seed)
                steps, fresh_head = cfg.pretrain.steps, True
            else:
                flat = problems.episodes(data.train, cfg.outer_steps * cfg.meta_batch, d.n_way, d.k_shot,
                                         d.n_query, seed)
                batches = [flat[i:i + cfg.meta_batch] for i in range(0, len(flat), cfg.meta_batch)]
                engine = cfg.engines.make("maml" if method == "scratch" else method)
                build = problems.build_batched_meta_graph if cfg.task_batched else problems.build_meta_graph
                graph, net = build(engine, batches, data.features, cfg.hidden, d.n_way, inner.lr, inner.steps,
                                   cfg.meta_lr, lam)
                steps, fresh_head = (0 if method == "scratch" else cfg.outer_steps), False
            template = problems.make_net(data.features, cfg.hidden, d.n_way).to(device)

            def summary(net=net, fresh_head=fresh_head, lam=lam, tasks=eval_tasks):
                start = problems.start_params(net, d.n_way, fresh_head)
                return {f"{split}_acc": problems.meta_test(template, start, tasks, inner.lr, inner.steps, lam)}

            per_method[method].append(exp.arm(f"{method}-seed{seed}", graph, steps, summary=summary))
    table = {m: _over_seeds([x[f"{split}_acc"] for x in rows], [x["time_s"] for x in rows], split)
             for m, rows in per_method.items()}
    pools = (f"meta-test classes {d.test_classes}" if split == "test" else
             f"meta-val classes {d.val_classes}" if d.val_classes else
             f"meta-val: held-out {d.val_fraction:g} of meta-train classes {sorted(data.train)}")
    result = {"summary": table, "seeds": list(cfg.seeds), "split": split,
              "task": f"{d.n_way}-way {d.k_shot}-shot, {pools}",
              "arms": {f"{m}-seed{s}": rows[i] for m, rows in per_method.items() for i, s in enumerate(cfg.seeds)}}
    return exp.finish(result, plot=lambda path: plot(result, path), plot_name="maml.png")


def _over_seeds(accs: list[float], times: list[float], split: str = "test") -> dict:
    """Mean accuracy on ``split``, the half-width of its 95 % t-interval over seeds (None for one seed)."""
    n = len(accs)
    ci = None
    if n > 1:
        from scipy.stats import t
        ci = round(float(t.ppf(0.975, n - 1)) * statistics.stdev(accs) / math.sqrt(n), 4)
    return {f"{split}_acc_mean": round(statistics.fmean(accs), 4), f"{split}_acc_ci95": ci,
            "per_seed": [round(a, 4) for a in accs], "time_s_mean": round(statistics.fmean(times), 2)}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, split = result["summary"], result["split"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (m, s) in enumerate(table.items()):
        ax.bar(i, s[f"{split}_acc_mean"], yerr=s[f"{split}_acc_ci95"] or 0, capsize=5, color=f"C{i}", alpha=0.7)
        ax.scatter([i] * len(s["per_seed"]), s["per_seed"], color="k", s=12, zorder=3)
    ax.set_xticks(range(len(table)), list(table))
    ax.set_ylabel("meta-test accuracy" if split == "test" else "meta-validation accuracy")
    ax.set_title(f"{result['task']}: mean, 95 % interval over seeds {result['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROGRAM = digits_program(
    "maml", MAMLConfig, "Few-shot learning on digits: MAML, iMAML and first-order MAML with mlo, against "
                        "a network trained without meta-learning and an untrained one.",
    examples=[[], ["--config", "applications/maml/configs/tiny.yaml", "--out", "runs/maml-tiny"],
              ["--set", "methods=[maml,fomaml]", "--set", "seeds=[0,1,2,3,4]"],
              ["--set", "engines.imaml.iterations=10", "--set", "imaml_lam=0.5"],
              ["--resume", "runs/maml-tiny"]],
    plot_name="maml.png")


def main(argv: list[str] | None = None) -> int:
    return run_program(PROGRAM, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
