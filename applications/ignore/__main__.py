"""Learning by ignoring, three levels vs its two-level ablation: ``python -m applications.ignore``.

Examples::

    python -m applications.ignore                                  # configs/default.yaml
    python -m applications.ignore --config applications/ignore/configs/tiny.yaml --out runs/ignore-tiny
    python -m applications.ignore --set engines.pretrain.name=cg --set engines.pretrain.iterations=20
    python -m applications.ignore --resume runs/ignore-...

Arms: ``<method>-seed<s>`` for ``no_ignore`` (all source weights equal, one
level), ``two_level`` (α learned on V's target validation loss) and
``three_level`` (α learned on the fine-tuned W's). Every arm is scored the same
way: a fresh W fine-tuned from its V (``final``), tested on the target test set.
``target_only`` (the same fine-tuning from zero, no source) is reported per seed.
"""

from __future__ import annotations

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
    source_per_class: int = 60
    corrupt: float = 0.4             # fraction of source labels replaced by another class
    target_train_per_class: int = 3
    target_val_per_class: int = 10   # the target test set is every remaining digit
    shift: int = 1                   # target images move this many pixels to the right (0: same domain)


@dataclass
class EnginesConfig:
    """mlo engines, written ``{name: cg, iterations: 20, tol: 1e-6}``; fields left out keep mlo's defaults."""

    pretrain: mlo.Engine = mlo.Unrolled(steps=10)    # dV/dα
    finetune: mlo.Engine = mlo.CG(iterations=20)     # dW/dV

    def make(self, level: str) -> mlo.Engine:
        return getattr(self, level)


@dataclass
class TrainConfig:
    lr: float = 0.1                  # SGD for V and W
    momentum: float = 0.9
    pretrain_steps: int = 10         # per outer step
    finetune_steps: int = 10
    ignore_lr: float = 0.1           # Adam on α
    gamma: float = 0.1               # fine-tuning's pull towards V
    source_decay: float = 0.001      # λ, keeps the pretraining problem strongly convex


@dataclass
class FinalConfig:
    steps: int = 300                 # fine-tuning steps of the evaluation protocol


@dataclass
class IgnoreConfig:
    steps: int = 100                 # outer steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(problems.METHODS))
    log_every: int = 10
    checkpoint_every: int = 25
    threads: int = 1
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    final: FinalConfig = field(default_factory=FinalConfig)

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in problems.METHODS]
        if bad or not self.methods:
            raise ConfigError(f"methods: expected a non-empty list of {', '.join(problems.METHODS)}, got {self.methods}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        for level in ("pretrain", "finetune"):
            engine, budget = getattr(self.engines, level), getattr(self.train, f"{level}_steps")
            if isinstance(engine, mlo.Unrolled) and engine.steps > budget:
                raise ConfigError(f"engines.{level}.steps ({engine.steps}) cannot exceed "
                                  f"train.{level}_steps ({budget})", field=f"engines.{level}.steps")


def run(r: Run) -> dict:
    cfg, device = r.cfg, r.device
    exp = Experiment(r, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)
    t, final = cfg.train, dict(steps=cfg.final.steps, lr=cfg.train.lr, momentum=cfg.train.momentum,
                               gamma=cfg.train.gamma)
    per_seed: dict[str, dict[int, dict]] = {m: {} for m in ("target_only", *cfg.methods)}
    for seed in cfg.seeds:
        d = cfg.data
        data = problems.load_data(seed, d.source_per_class, d.corrupt, d.target_train_per_class,
                                  d.target_val_per_class, d.shift, device)
        torch.manual_seed(seed)
        per_seed["target_only"][seed] = {"test_acc": problems.accuracy(problems.finetune_from(None, data, **final),
                                                                       data.target_test)}
        for method in cfg.methods:
            torch.manual_seed(seed)
            graph, V, W, alpha = problems.build_graph(
                data, method, pretrain_engine=cfg.engines.make("pretrain"), finetune_engine=cfg.engines.make("finetune"),
                pretrain_steps=t.pretrain_steps, finetune_steps=t.finetune_steps, lr=t.lr, momentum=t.momentum,
                ignore_lr=t.ignore_lr, gamma=t.gamma, source_decay=t.source_decay)

            def summary(V=V, alpha=alpha, data=data, method=method):
                out = {"test_acc": problems.accuracy(problems.finetune_from(V, data, **final), data.target_test),
                       "pretrain_test_acc": problems.accuracy(V, data.target_test)}
                if method != "no_ignore":
                    a = torch.sigmoid(alpha.detach())
                    out.update(mean_weight_clean=float(a[~data.corrupted].mean()),
                               mean_weight_corrupted=float(a[data.corrupted].mean()),
                               weights=[round(v, 4) for v in a.tolist()],
                               corrupted=data.corrupted.int().tolist())
                return out

            W_logged = W if method == "three_level" else None
            per_seed[method][seed] = exp.arm(
                f"{method}-seed{seed}", graph, cfg.steps,
                evaluate=lambda V=V, W=W_logged, data=data: problems.evaluate(V, data, W), summary=summary)

    table = {}
    for method, runs in per_seed.items():
        row = over_seeds([r["test_acc"] for r in runs.values()], "test_acc")
        if method in ("two_level", "three_level"):
            for k in ("mean_weight_clean", "mean_weight_corrupted"):
                row[k] = round(statistics.fmean(r[k] for r in runs.values()), 4)
        table[method] = row
    result = {"summary": table, "seeds": list(cfg.seeds),
              "runs": {m: {str(s): r for s, r in runs.items()} for m, runs in per_seed.items()}}
    return exp.finish(result, plot=lambda path: plot(exp.rows(), result, path), plot_name="ignore.png")


def plot(rows: list[dict], result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = list(result["summary"])
    plot_over_seeds(axes[0], result["summary"], "test_acc", result["seeds"], "target test accuracy (fine-tuned W)",
                    rotation=15)

    ax = axes[1]
    seed0 = str(result["seeds"][0])
    for i, m in enumerate(methods):
        pts = [(r["step"], r["eval/pretrain_val_loss"]) for r in rows if r["arm"] == f"{m}-seed{seed0}"]
        if pts:
            ax.plot(*zip(*pts), color=f"C{i}", label=m)
    ax.set_xlabel("outer step")
    ax.set_ylabel("target validation loss of V")
    ax.set_title(f"seed {seed0}")
    ax.legend()

    ax = axes[2]
    for m, style in (("three_level", "C3"), ("two_level", "C2")):
        r = result["runs"].get(m, {}).get(seed0)
        if r is None:
            continue
        w = torch.tensor(r["weights"])
        bad = torch.tensor(r["corrupted"]).bool()
        ax.hist(w[~bad].tolist(), bins=30, alpha=0.5, color=style, label=f"{m}: clean")
        ax.hist(w[bad].tolist(), bins=30, alpha=0.5, color=style, hatch="//", histtype="step",
                label=f"{m}: corrupted")
    ax.set_xlabel("learned source weight a_i")
    ax.set_ylabel("source examples")
    ax.set_title(f"seed {seed0}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROGRAM = digits_program(
    "ignore", IgnoreConfig, "Learning by ignoring on digits: a three-level program "
                    "(pretrain, fine-tune, source weights) vs its two-level ablation.",
    examples=[[], ["--config", "applications/ignore/configs/tiny.yaml", "--out", "runs/ignore-tiny"],
     ["--set", "engines.pretrain.name=cg", "--set", "engines.pretrain.iterations=20"],
     ["--resume", "runs/ignore-tiny"]],
    plot_name="ignore.png")


def main(argv: list[str] | None = None) -> int:
    return run_program(PROGRAM, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
