"""The study's table: read the finished runs, compare the methods, write JSON, Markdown and a plot.

Schema of ``study.json`` (documented in docs/lease.md, "Study"):

* ``rows``: one per method — ``seeds_done`` (cells with every evaluation
  finished), ``test_acc_mean``/``test_acc_std`` (%, over seeds; each seed's value
  is the mean over its evaluation seeds), ``per_seed``, ``search_seconds`` and
  ``eval_seconds`` (mean per seed), ``agreement_edges``/``agreement_inputs`` (mean
  pairwise genotype agreement across seeds), ``arch_deviation``/``arch_margin``
  (mean of the searches' final max deviation from uniform and mean margin),
  ``target_op_share`` (fraction of the cells' edges using the task's ops) with
  ``target_op_share_p`` (one-sample t-test of the per-seed shares against the
  chance share) and ``target_op_mass`` (final softmax weight on them).
* ``paired``: per method against ``baseline`` and ``random``, and each LeaSE
  variant (``lease-exact``, ``lease-pgd``, ``lease-fd``) against ``lease``, and ``lease-fd``
  against ``baseline-fd`` (both on finite differences), on the seeds both
  finished — ``n``, ``mean_diff`` (points), ``ci95``, ``p_value`` (paired t).
* ``chance``: the agreement and the target-op share of uniformly random cells.
* ``evaluation_noise``: among the random cells, the std of cell means vs the
  std across evaluation seeds of one cell, and the one-way ANOVA F and p —
  whether this evaluation can tell cells apart at all; ``evaluation_noise_all``:
  the same over every finished cell of every method.
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np

from . import arch_stats

VARIANTS = ("lease-exact", "lease-pgd", "lease-fd")   # LeaSE with one setting changed: also compared with ``lease``
from .spaces.genotype import PRIMITIVES, genotype_from_json


def _read(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _eval_seconds(run: str) -> float:
    total = 0.0
    try:
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    total += float(json.loads(line).get("time_s", 0.0))
    except OSError:
        pass
    return total


def _final_alphas(search: str):
    last = None
    try:
        with open(os.path.join(search, "alphas.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    last = line
    except OSError:
        return None
    return json.loads(last) if last else None


def collect(study) -> dict:
    """Per method and seed: test accuracies, genotype, search facts (only cells with every evaluation done)."""
    cells: dict = {}
    for method in study.methods:
        for seed in study.seeds:
            folder = study.folder(method, seed)
            accs, secs = [], 0.0
            for e in study.eval_seeds:
                res = _read(os.path.join(folder, f"eval{e}", "result.json"))
                if res is None:
                    break
                accs.append(100.0 - float(res["test_error"]))
                secs += _eval_seconds(os.path.join(folder, f"eval{e}"))
            if len(accs) != len(study.eval_seeds):
                continue
            geno = _read(os.path.join(folder, "search" if method != "random" else "", "genotype.json"))
            search = _read(os.path.join(folder, "search", "result.json")) if method != "random" else {}
            cells.setdefault(method, {})[seed] = {
                "accs": accs, "eval_seconds": secs, "genotype": genotype_from_json(geno) if geno else None,
                "search": search or {}, "alphas": _final_alphas(os.path.join(folder, "search")),
            }
    return cells


def _one_sample_p(values, mean0: float) -> float | None:
    """Two-sided one-sample t-test p-value of ``values`` against ``mean0`` (None under 2 values)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    if v.std(ddof=1) == 0:
        return 1.0 if v.mean() == mean0 else 0.0
    return float(stats.ttest_1samp(v, mean0).pvalue)


def t_interval(diffs) -> tuple[float, list[float], float]:
    """Mean, 95 % t confidence interval and two-sided paired-t p-value of ``diffs``."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, [float("nan"), float("nan")], float("nan")
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    if se == 0:
        return mean, [mean, mean], (1.0 if mean == 0 else 0.0)
    half = float(stats.t.ppf(0.975, len(d) - 1) * se)
    p = float(2 * stats.t.sf(abs(mean / se), len(d) - 1))
    return mean, [mean - half, mean + half], p


def evaluation_noise(cells: dict, methods=("random",)) -> dict | None:
    """Can the evaluation tell cells apart? Between-cell vs within-cell (training seed) spread of test accuracy."""
    from scipy import stats

    groups = [c["accs"] for m in methods for c in cells.get(m, {}).values() if len(c["accs"]) >= 2]
    if len(groups) < 2:
        return None
    f, p = stats.f_oneway(*groups)
    within = float(np.sqrt(np.mean([np.var(g, ddof=1) for g in groups])))
    return {"cells": len(groups), "between_cell_std": float(np.std([np.mean(g) for g in groups], ddof=1)),
            "within_cell_std": within, "F": float(f) if np.isfinite(f) else None,
            "p_value": float(p) if np.isfinite(p) else None}


def summarize(study, cells: dict) -> dict:
    ops = [list(PRIMITIVES)] * sum(n + 2 for n in range(study.nodes))
    space = {"normal": ops, "reduce": ops}
    target = study.target_ops
    chance = arch_stats.chance_agreement(space, study.nodes)
    if target:
        chance["target_op_share"] = len([o for o in target if o != "none"]) / (len(PRIMITIVES) - 1)
        chance["target_op_mass"] = len(target) / len(PRIMITIVES)        # uniform softmax
    rows = []
    for method in study.methods:
        got = cells.get(method, {})
        seeds = sorted(got)
        means = [float(np.mean(got[s]["accs"])) for s in seeds]
        row = {"method": method, "seeds_done": len(seeds),
               "test_acc_mean": float(np.mean(means)) if means else None,
               "test_acc_std": float(np.std(means, ddof=1)) if len(means) > 1 else None,
               "per_seed": {str(s): m for s, m in zip(seeds, means)},
               "search_seconds": float(np.mean([got[s]["search"].get("search_seconds", 0.0) for s in seeds]))
               if seeds and method != "random" else 0.0,
               "eval_seconds": float(np.mean([got[s]["eval_seconds"] for s in seeds])) if seeds else None}
        genos = [got[s]["genotype"] for s in seeds if got[s]["genotype"] is not None]
        pairs = [arch_stats.genotype_agreement(a, b) for a, b in itertools.combinations(genos, 2)]
        row["agreement_edges"] = float(np.mean([p["edges"] for p in pairs])) if pairs else None
        row["agreement_inputs"] = float(np.mean([p["inputs"] for p in pairs])) if pairs else None
        arch = [got[s]["search"].get("architecture") for s in seeds]
        arch = [a for a in arch if a]
        row["arch_deviation"] = float(np.mean([a["max_deviation_from_uniform"] for a in arch])) if arch else None
        row["arch_margin"] = float(np.mean([a["mean_margin"] for a in arch])) if arch else None
        if target:
            shares = [arch_stats.op_share(g, target) for g in genos]
            row["target_op_share"] = float(np.mean(shares)) if shares else None
            row["target_op_share_p"] = _one_sample_p(shares, chance["target_op_share"])
            mass = [np.mean([arch_stats.op_mass(a[k], space[k], target) for k in ("normal", "reduce")])
                    for a in (got[s]["alphas"] for s in seeds) if a]
            row["target_op_mass"] = float(np.mean(mass)) if mass else None
        rows.append(row)
    paired = []
    for ref in ("baseline", "random", "lease", "baseline-fd"):
        for method in study.methods:
            if method == ref or ref not in cells or method not in cells:
                continue
            if ref == "lease" and method not in VARIANTS:   # a variant against the LeaSE it changes
                continue
            if ref == "baseline-fd" and method != "lease-fd":   # finite-difference LeaSE vs its own baseline
                continue
            common = sorted(set(cells[method]) & set(cells[ref]))
            if not common:
                continue
            diffs = [np.mean(cells[method][s]["accs"]) - np.mean(cells[ref][s]["accs"]) for s in common]
            mean, ci, p = t_interval(diffs)
            paired.append({"method": method, "reference": ref, "n": len(common), "mean_diff": mean,
                           "ci95": ci, "p_value": p})
    return {"command": study.command, "config": study.config, "train_config": study.train_config,
            "seeds": study.seeds, "eval_seeds": len(study.eval_seeds), "methods": study.methods,
            "target_ops": target, "rows": rows, "paired": paired, "chance": chance,
            "evaluation_noise": evaluation_noise(cells),
            "evaluation_noise_all": evaluation_noise(cells, tuple(cells))}


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def markdown(summary: dict) -> str:
    target = summary["target_ops"]
    head = ["method", "seeds", "test acc. % (mean ± std)", "search s", "eval s", "agreement (edges)",
            "α max dev.", "α margin"] + (["target-op share", "p (share vs chance)", "target-op mass"] if target else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        acc = f"{_f(r['test_acc_mean'])} ± {_f(r['test_acc_std'])}" if r["test_acc_mean"] is not None else "–"
        cols = [r["method"], str(r["seeds_done"]), acc, _f(r["search_seconds"], "{:.0f}"),
                _f(r["eval_seconds"], "{:.0f}"), _f(r["agreement_edges"]), _f(r["arch_deviation"], "{:.3f}"),
                _f(r["arch_margin"], "{:.3f}")]
        if target:
            cols += [_f(r.get("target_op_share")), _f(r.get("target_op_share_p"), "{:.3f}"),
                     _f(r.get("target_op_mass"))]
        lines.append("| " + " | ".join(cols) + " |")
    ch = summary["chance"]
    lines += ["", f"Chance (uniformly random cells): agreement {ch['edges']:.2f} of edges (same input and op), "
              f"{ch['inputs']:.2f} of inputs" + (f"; target-op share {ch['target_op_share']:.2f}, target-op mass {ch['target_op_mass']:.3f} (uniform α)"
                 if target else "")
              + ".", "", "| method | vs | seeds | mean diff (points) | 95 % CI | p (paired t) |", "|---|---|---|---|---|---|"]
    for p in summary["paired"]:
        lines.append(f"| {p['method']} | {p['reference']} | {p['n']} | {p['mean_diff']:+.2f} | "
                     f"[{_f(p['ci95'][0], '{:+.2f}')}, {_f(p['ci95'][1], '{:+.2f}')}] | {_f(p['p_value'], '{:.3f}')} |")
    for key, what in (("evaluation_noise", "random cells"), ("evaluation_noise_all", "cells of every method")):
        noise = summary[key]
        if noise:
            lines += ["", f"Evaluation noise ({noise['cells']} {what} × {summary['eval_seeds']} training seeds): "
                      f"std of cell means {noise['between_cell_std']:.2f} points, std across training seeds "
                      f"{noise['within_cell_std']:.2f}; one-way ANOVA F = {_f(noise['F'])}, "
                      f"p = {_f(noise['p_value'], '{:.3f}')}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r["per_seed"]]
    if not rows:
        return
    target = summary["target_ops"]
    fig, axes = plt.subplots(1, 2 if target else 1, figsize=(11 if target else 6, 4), squeeze=False)
    ax = axes[0][0]
    for i, r in enumerate(rows):
        vals = list(r["per_seed"].values())
        ax.scatter([i] * len(vals), vals, color="0.5", s=14, zorder=2)
        ax.errorbar([i], [r["test_acc_mean"]], yerr=[r["test_acc_std"] or 0.0], fmt="o", color="tab:red", capsize=4)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["method"] for r in rows], rotation=20)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("cells trained from scratch (dots: seeds)")
    if target:
        ax = axes[0][1]
        ax.bar(range(len(rows)), [r.get("target_op_share") or 0.0 for r in rows], color="tab:blue")
        ax.axhline(summary["chance"]["target_op_share"], color="k", ls="--", label="chance")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["method"] for r in rows], rotation=20)
        ax.set_ylabel("share of the cells' edges")
        ax.set_title("edges using " + ", ".join(target), fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(study) -> dict:
    """Rewrite ``study.json``, ``study.md`` and ``study.png`` in the study folder from what has finished."""
    summary = summarize(study, collect(study))
    os.makedirs(study.out, exist_ok=True)
    for name, text in (("study.json", json.dumps(summary, indent=1)),
                       ("study.md", f"`{summary['command']}`\n\n" + markdown(summary))):
        tmp = os.path.join(study.out, f".{name}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(study.out, name))
    plot(summary, os.path.join(study.out, "study.png"))
    return summary
