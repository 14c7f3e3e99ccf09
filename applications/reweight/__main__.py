"""Meta-Weight-Net data reweighting on long-tailed, noisy digits: ``python -m applications.reweight``.

Examples::

    python -m applications.reweight                               # configs/default.yaml
    python -m applications.reweight --config applications/reweight/configs/tiny.yaml --out runs/rw-tiny
    python -m applications.reweight --set data.imbalance=100 --set data.noise=0.4 --set seeds=[0,1,2]
    python -m applications.reweight --resume runs/reweight-...

Arms: ``<method>-seed<s>`` for every method in ``methods`` and every seed in
``seeds`` (the seed fixes the split, the long-tail class order, the flipped
labels, the initial weights and the batch order; all methods of one seed share them).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

import mlo
from applications.common import ConfigError
from applications.experiment import Experiment, main_for, over_seeds, plot_over_seeds

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


@dataclass
class WeightNetConfig:
    hidden: int = 32
    lr: float = 0.01                 # Adam
    weight_decay: float = 1e-4
    normalize: bool = True           # divide the weighted loss by the sum of the weights
    engine: str = "unrolled"         # the classifier's engine: unrolled (exact one step) or finite_difference

    def validate(self) -> None:
        if self.engine not in ("unrolled", "finite_difference"):
            raise ConfigError(f"weight_net.engine: expected 'unrolled' or 'finite_difference', got {self.engine!r} "
                              "(the classifier takes one step per outer step, so this is a one-step look-ahead)")


@dataclass
class ReweightConfig:
    steps: int = 600                 # outer steps = classifier minibatch steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    methods: list[str] = field(default_factory=lambda: list(problems.METHODS))
    log_every: int = 20
    checkpoint_every: int = 100
    threads: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    weight_net: WeightNetConfig = field(default_factory=WeightNetConfig)

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in problems.METHODS]
        if bad or not self.methods:
            raise ConfigError(f"methods: expected a non-empty list of {', '.join(problems.METHODS)}, got {self.methods}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")


LOSS_GRID = [0.25 * i for i in range(21)]   # where the learned weight curve is reported


def run(cfg: ReweightConfig, out_dir: str, device: torch.device, resume: bool = False, progress: bool = True) -> dict:
    exp = Experiment("reweight", cfg, out_dir, resume=resume, log_every=cfg.log_every,
                     checkpoint_every=cfg.checkpoint_every, progress=progress)
    grid = torch.tensor(LOSS_GRID, device=device)
    per_seed: dict[str, dict[int, dict]] = {m: {} for m in cfg.methods}
    for seed in cfg.seeds:
        data = problems.load_data(seed, cfg.data.imbalance, cfg.data.noise, cfg.data.val_per_class,
                                  cfg.data.test_fraction, device)
        for method in cfg.methods:
            graph, clf, wnet = problems.build_graph(
                data, method, seed=seed, hidden=cfg.classifier.hidden, lr=cfg.classifier.lr,
                momentum=cfg.classifier.momentum, batch_size=cfg.classifier.batch_size,
                weight_net_hidden=cfg.weight_net.hidden, weight_net_lr=cfg.weight_net.lr,
                weight_net_decay=cfg.weight_net.weight_decay, normalize=cfg.weight_net.normalize,
                engine=mlo.make_engine(cfg.weight_net.engine))

            def summary(clf=clf, wnet=wnet, data=data):
                out = problems.evaluate(clf, data)
                if wnet is not None:
                    out.update(problems.weight_profile(clf, wnet, data, grid))
                return out

            per_seed[method][seed] = exp.arm(f"{method}-seed{seed}", graph, cfg.steps,
                                             evaluate=lambda clf=clf, data=data: problems.evaluate(clf, data),
                                             summary=summary)
    table = {}
    for method, runs in per_seed.items():
        row = over_seeds([r["balanced_test_acc"] for r in runs.values()], "balanced_test_acc")
        if method == "meta_weight_net":
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

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return main_for("reweight", ReweightConfig, run, "Meta-Weight-Net on a long-tailed, label-noised digits split "
                    "vs uniform and class-balanced weights.", argv)


if __name__ == "__main__":
    raise SystemExit(main())
