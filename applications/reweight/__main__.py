"""Meta-Weight-Net and a per-example weight table on long-tailed, noisy digits: ``python -m applications.reweight``.

Examples::

    python -m applications.reweight                               # configs/default.yaml
    python -m applications.reweight --config applications/reweight/configs/tiny.yaml --out runs/rw-tiny
    python -m applications.reweight --set data.imbalance=100 --set data.noise=0.4 --set seeds=[0,1,2]
    python -m applications.reweight --resume runs/reweight-...

Methods: ``uniform``, ``class_balanced``, ``meta_weight_net`` and ``weight_table``
(one learned logit per training example, a row-sparse mlo table).
Arms: ``<method>-seed<s>`` for every method in ``methods`` and every seed in
``seeds`` (the seed fixes the split, the long-tail class order, the flipped
labels, the initial weights and the batch order; all methods of one seed share them).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

import mlo
from applications.common import ConfigError
from applications.common.run_folder import LoggingConfig, Run
from applications.experiment import Experiment, digits_program, run_program, over_seeds, plot_over_seeds

from . import problems


@dataclass
class DataConfig:
    imbalance: float = 20.0          # largest / smallest class in the training split
    noise: float = 0.2               # fraction of training labels flipped to another class
    val_per_class: int = 10          # the clean, balanced meta set
    test_fraction: float = 0.4       # of every class, held out for testing

    def validate(self) -> None:
        if self.imbalance < 1:
            raise ConfigError(f"data.imbalance: must be >= 1, got {self.imbalance}")
        if not 0 <= self.noise < 1:
            raise ConfigError(f"data.noise: must be in [0, 1), got {self.noise}")


@dataclass
class ClassifierConfig:
    hidden: int = 0                  # 0: logistic regression
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 100


#: the engines of a one-step look-ahead through the classifier's step (it takes one step per outer step)
OneStepEngine = mlo.Unrolled | mlo.FiniteDifference


def one_step(engine: OneStepEngine, where: str) -> None:
    if isinstance(engine, mlo.Unrolled) and engine.steps != 1:
        raise ConfigError(f"{where}.steps: expected 1 (the classifier takes one step per outer step, so this "
                          f"is a one-step look-ahead), got {engine.steps}", field=f"{where}.steps")


@dataclass
class WeightNetConfig:
    hidden: int = 32
    lr: float = 0.01                 # Adam
    weight_decay: float = 1e-4
    normalize: bool = True           # divide the weighted loss by the sum of the weights
    engine: OneStepEngine = mlo.Unrolled()   # the classifier's engine: unrolled (exact one step) or
    #                                           finite_difference, with any of that engine's fields

    def validate(self) -> None:
        one_step(self.engine, "weight_net.engine")


@dataclass
class WeightTableConfig:
    lr: float = 3000.0               # SGD on the logits (a row's hypergradient is ~ classifier lr / batch size)
    init: float = 0.0                # initial logit of every example (0: uniform weights)
    sparse: bool = True              # declare the table row-sparse (False: dense, same numbers, table-sized steps)
    engine: OneStepEngine = mlo.Unrolled()   # the classifier's engine in this method (as weight_net.engine)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"weight_table.lr: must be > 0, got {self.lr}")
        one_step(self.engine, "weight_table.engine")


@dataclass
class ReweightConfig:
    steps: int = 600                 # outer steps = classifier minibatch steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    methods: list[str] = field(default_factory=lambda: list(problems.METHODS))
    log_every: int = 20
    checkpoint_every: int = 100
    threads: int = 1
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    weight_net: WeightNetConfig = field(default_factory=WeightNetConfig)
    weight_table: WeightTableConfig = field(default_factory=WeightTableConfig)

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in problems.METHODS]
        if bad or not self.methods:
            raise ConfigError(f"methods: expected a non-empty list of {', '.join(problems.METHODS)}, got {self.methods}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")


LOSS_GRID = [0.25 * i for i in range(21)]   # where the learned weight curve is reported


def run(r: Run) -> dict:
    cfg, device = r.cfg, r.device
    exp = Experiment(r, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)
    grid = torch.tensor(LOSS_GRID, device=device)
    per_seed: dict[str, dict[int, dict]] = {m: {} for m in cfg.methods}
    for seed in cfg.seeds:
        data = problems.load_data(seed, cfg.data.imbalance, cfg.data.noise, cfg.data.val_per_class,
                                  cfg.data.test_fraction, device)
        for method in cfg.methods:
            tcfg = cfg.weight_table
            engine = tcfg.engine if method == "weight_table" else cfg.weight_net.engine
            graph, clf, wnet = problems.build_graph(
                data, method, seed=seed, hidden=cfg.classifier.hidden, lr=cfg.classifier.lr,
                momentum=cfg.classifier.momentum, batch_size=cfg.classifier.batch_size,
                weight_net_hidden=cfg.weight_net.hidden, weight_net_lr=cfg.weight_net.lr,
                weight_net_decay=cfg.weight_net.weight_decay, normalize=cfg.weight_net.normalize,
                table_lr=tcfg.lr, table_init=tcfg.init, sparse_table=tcfg.sparse,
                engine=engine)

            def summary(clf=clf, wnet=wnet, data=data, method=method):
                out = problems.evaluate(clf, data)
                if method == "meta_weight_net":
                    out.update(problems.weight_profile(clf, wnet, data, grid))
                elif method == "weight_table":
                    out.update(problems.table_profile(wnet, data))
                return out

            per_seed[method][seed] = exp.arm(f"{method}-seed{seed}", graph, cfg.steps,
                                             evaluate=lambda clf=clf, data=data: problems.evaluate(clf, data),
                                             summary=summary)
    table = {}
    for method, runs in per_seed.items():
        row = over_seeds([r["balanced_test_acc"] for r in runs.values()], "balanced_test_acc")
        if method in ("meta_weight_net", "weight_table"):
            row["mean_weight_clean"] = round(statistics.fmean(r["mean_weight_clean"] for r in runs.values()), 4)
            noisy = [r["mean_weight_noisy"] for r in runs.values() if "mean_weight_noisy" in r]
            if noisy:
                row["mean_weight_noisy"] = round(statistics.fmean(noisy), 4)
        table[method] = row
    result = {"summary": table, "seeds": list(cfg.seeds), "loss_grid": LOSS_GRID,
              "runs": {m: {str(s): r for s, r in runs.items()} for m, runs in per_seed.items()}}
    return exp.finish(result, plot=lambda path: plot(exp.rows(), result, path), plot_name="reweight.png")


def plot(rows: list[dict], result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 if "weight_table" in result["runs"] else 3, figsize=(20, 4.2))
    methods = list(result["summary"])
    plot_over_seeds(axes[0], result["summary"], "balanced_test_acc", result["seeds"], "balanced test accuracy")

    ax = axes[1]
    seed0 = str(result["seeds"][0])
    for i, m in enumerate(methods):
        pts = [(r["step"], r["eval/balanced_test_acc"]) for r in rows if r["arm"] == f"{m}-seed{seed0}"]
        if pts:
            ax.plot(*zip(*pts), color=f"C{i}", label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("balanced test accuracy")
    ax.set_title(f"seed {seed0}")
    ax.legend()

    ax = axes[2]
    if "meta_weight_net" in result["runs"]:
        for s, r in result["runs"]["meta_weight_net"].items():
            ax.plot(result["loss_grid"], r["curve"], label=f"seed {s}")
        ax.set_xlabel("per-example training loss")
        ax.set_ylabel("learned weight V(loss)")
        ax.set_title("Meta-Weight-Net")
        ax.legend()
    if "weight_table" in result["runs"]:
        ax = axes[3]
        bins = [i / 20 for i in range(21)]
        for s, r in result["runs"]["weight_table"].items():
            w = [1 / (1 + math.exp(-t)) for t in r["logits"]]
            ax.hist(w, bins=bins, histtype="step", label=f"seed {s}")
        ax.set_xlabel("per-example weight σ(θ_i)")
        ax.set_ylabel("training examples")
        ax.set_title("weight table (end)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROGRAM = digits_program(
    "reweight", ReweightConfig, "Meta-Weight-Net and a per-example weight table on a long-tailed, "
                    "label-noised digits split vs uniform and class-balanced weights.",
    examples=[[], ["--config", "applications/reweight/configs/tiny.yaml", "--out", "runs/rw-tiny"],
     ["--set", "data.imbalance=100", "--set", "data.noise=0.4", "--set", "seeds=[0,1,2]"],
     ["--set", "methods=[uniform,weight_table]", "--set", "weight_table.lr=100"],
     ["--resume", "runs/rw-tiny"]],
    plot_name="reweight.png")


def main(argv: list[str] | None = None) -> int:
    return run_program(PROGRAM, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
