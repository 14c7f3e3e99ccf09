"""Learn per-feature weight decay on validation loss: ``python -m applications.hpo``.

Examples::

    python -m applications.hpo                                   # configs/default.yaml
    python -m applications.hpo --config applications/hpo/configs/tiny.yaml --out runs/hpo-tiny
    python -m applications.hpo --set engines.compare=[cg,unrolled] --set engines.cg.iterations=40
    python -m applications.hpo --resume runs/hpo-...             # continue after Ctrl-C

Arms, all from the same data split and the same (zero) initial classifier:
``fixed-<wd>`` for each weight decay of the hand-tuning grid (the one with the
lowest validation loss is "the hand-tuned baseline"), then ``learned-<engine>``
for each hypergradient engine in ``engines.compare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import mlo
from applications.common import ConfigError
from applications.common.run_folder import LoggingConfig, Run
from applications.experiment import Experiment, digits_program, run_program

from . import problems


@dataclass
class DataConfig:
    seed: int = 0                    # the stratified split and the noise columns
    train_per_class: int = 15
    val_per_class: int = 30          # the test set is every remaining digit
    noise_features: int = 64         # uniform-noise columns appended to the 64 pixels


@dataclass
class InnerConfig:
    lr: float = 0.1                  # SGD on the classifier
    momentum: float = 0.9
    steps: int = 10                  # classifier steps per outer step


@dataclass
class HyperConfig:
    lr: float = 0.05                 # Adam on θ = log(weight decay)
    init_weight_decay: float = 0.01


@dataclass
class EnginesConfig:
    """The engines to compare, and each engine's settings: a section per engine holds that mlo
    engine (``--set engines.cg.tol=1e-6``); fields left out keep these defaults."""

    compare: list[str] = field(default_factory=lambda: ["cg", "neumann", "unrolled"])
    cg: mlo.CG = mlo.CG(iterations=20)
    neumann: mlo.Neumann = mlo.Neumann(iterations=50, alpha=0.1)   # alpha null: the classifier's learning rate
    unrolled: mlo.Unrolled = mlo.Unrolled(steps=10)                 # at most inner.steps
    finite_difference: mlo.FiniteDifference = mlo.FiniteDifference()
    first_order: mlo.FirstOrder = mlo.FirstOrder()

    def validate(self) -> None:
        sections = [name for name in mlo.ENGINES if name in self.__dataclass_fields__]
        for name in self.compare:
            if name not in sections:
                raise ConfigError(f"engines.compare: unknown engine {name!r}; choose from {', '.join(sections)}",
                                  field="engines.compare")
        if len(set(self.compare)) != len(self.compare):
            raise ConfigError(f"engines.compare: an engine is listed twice: {self.compare}", field="engines.compare")

    def make(self, name: str) -> mlo.Engine:
        return getattr(self, name)


@dataclass
class HPOConfig:
    seed: int = 0                    # torch seed of every arm
    outer_steps: int = 200
    log_every: int = 10
    checkpoint_every: int = 50
    threads: int = 1                 # these problems are tiny: one thread is fastest
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    weight_decay_grid: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])

    def validate(self) -> None:
        if self.outer_steps < 1:
            raise ConfigError(f"outer_steps: must be >= 1, got {self.outer_steps}")
        if not self.weight_decay_grid or min(self.weight_decay_grid) <= 0:
            raise ConfigError(f"weight_decay_grid: needs positive values, got {self.weight_decay_grid}")
        if "unrolled" in self.engines.compare and self.engines.unrolled.steps > self.inner.steps:
            raise ConfigError(f"engines.unrolled.steps ({self.engines.unrolled.steps}) cannot exceed "
                              f"inner.steps ({self.inner.steps}): it reverses through the last K classifier steps",
                              field="engines.unrolled.steps")
        if self.hyper.init_weight_decay <= 0:
            raise ConfigError("hyper.init_weight_decay: must be > 0")


def run(r: Run) -> dict:
    cfg, device = r.cfg, r.device
    data = problems.load_data(cfg.data.seed, cfg.data.train_per_class, cfg.data.val_per_class,
                              cfg.data.noise_features, device)
    exp = Experiment(r, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)
    inner = dict(inner_lr=cfg.inner.lr, momentum=cfg.inner.momentum, inner_steps=cfg.inner.steps)

    fixed = {}
    for wd in cfg.weight_decay_grid:
        torch.manual_seed(cfg.seed)
        graph, model = problems.build_fixed(data, wd, **inner)
        fixed[f"{wd:g}"] = exp.arm(f"fixed-{wd:g}", graph, cfg.outer_steps,
                                   evaluate=lambda m=model: problems.evaluate(m, data),
                                   summary=lambda m=model: problems.evaluate(m, data))
    best_wd = min(fixed, key=lambda k: fixed[k]["val_loss"])

    learned = {}
    for name in cfg.engines.compare:
        torch.manual_seed(cfg.seed)
        graph, model, log_decay = problems.build_graph(
            data, cfg.engines.make(name), hyper_lr=cfg.hyper.lr,
            init_weight_decay=cfg.hyper.init_weight_decay, **inner)

        def summary(m=model, theta=log_decay):
            decay = theta.detach().exp().cpu()
            pixels, noise = decay[:decay.numel() - data.noise], decay[decay.numel() - data.noise:]
            out = problems.evaluate(m, data)
            out["median_decay_pixels"] = float(pixels.median())
            if data.noise:
                out["median_decay_noise"] = float(noise.median())
            out["log10_decay"] = [round(v, 4) for v in decay.log10().tolist()]
            return out

        learned[name] = exp.arm(f"learned-{name}", graph, cfg.outer_steps,
                                evaluate=lambda m=model: problems.evaluate(m, data), summary=summary)

    table = {f"fixed (hand-tuned wd={best_wd})": _row(fixed[best_wd])}
    table.update({f"learned ({name})": _row(r) for name, r in learned.items()})
    result = {"summary": table, "hand_tuned_weight_decay": float(best_wd), "fixed": fixed, "learned": learned}
    return exp.finish(result, plot=lambda path: plot(exp.rows(), result, data.noise, path), plot_name="hpo.png")


def _row(r: dict) -> dict:
    keep = ("val_loss", "test_acc", "median_decay_pixels", "median_decay_noise", "time_s")
    return {k: round(r[k], 4) for k in keep if k in r}


def plot(rows: list[dict], result: dict, noise: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name in result["learned"]:
        pts = [(r["step"], r["eval/val_loss"]) for r in rows if r["arm"] == f"learned-{name}"]
        ax.plot(*zip(*pts), label=f"learned ({name})")
    best = result["hand_tuned_weight_decay"]
    pts = [(r["step"], r["eval/val_loss"]) for r in rows if r["arm"] == f"fixed-{best:g}"]
    ax.plot(*zip(*pts), "k--", label=f"fixed wd={best:g} (hand-tuned)")
    ax.set_xlabel("outer step")
    ax.set_ylabel("validation loss")
    ax.legend()

    ax = axes[1]
    names = [f"wd={k}" for k in result["fixed"]] + [f"{k}" for k in result["learned"]]
    accs = [v["test_acc"] for v in result["fixed"].values()] + [v["test_acc"] for v in result["learned"].values()]
    colors = ["0.6"] * len(result["fixed"]) + ["C0"] * len(result["learned"])
    ax.bar(range(len(accs)), accs, color=colors)
    ax.set_xticks(range(len(accs)), names, rotation=45, ha="right")
    ax.set_ylim(min(accs) - 0.05, min(1.0, max(accs) + 0.02))
    ax.set_ylabel("test accuracy")
    ax.set_title("grey: fixed decay, blue: learned per feature")

    ax = axes[2]
    first = next(iter(result["learned"]), None)
    if first is not None:
        logd = result["learned"][first]["log10_decay"]
        n = len(logd)
        ax.scatter(range(n - noise), logd[: n - noise], s=10, label="pixel features")
        if noise:
            ax.scatter(range(n - noise, n), logd[n - noise:], s=10, label="noise features")
        ax.set_xlabel("feature")
        ax.set_ylabel("log10 learned decay")
        ax.set_title(f"learned decays ({first})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROGRAM = digits_program(
    "hpo", HPOConfig, "Learn per-feature weight decay of a digits classifier on validation "
                    "loss, with each hypergradient engine, against a hand-tuned fixed decay.",
    examples=[[], ["--config", "applications/hpo/configs/tiny.yaml", "--out", "runs/hpo-tiny"],
     ["--set", "engines.compare=[cg,unrolled]", "--set", "engines.cg.iterations=40"],
     ["--resume", "runs/hpo-tiny"]],
    plot_name="hpo.png")


def main(argv: list[str] | None = None) -> int:
    return run_program(PROGRAM, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
