"""How far a search moved its architecture, and how much two searches agree.

A differentiable search that does not learn ends with softmax(α) near uniform
and a genotype decided by the initialisation noise. These statistics make that
visible:

* per edge: the largest softmax weight, the entropy (nats; uniform is
  ``log K``), the margin between the chosen op (the strongest non-``none`` op,
  the one :func:`derive_cell` keeps) and the runner-up, and the largest
  distance of any weight from uniform ``1/K``;
* between two genotypes: the fraction of cell edges (input, op) they share,
  and the chance level of that fraction for two genotypes drawn uniformly from
  the same space (per node two distinct inputs, an op uniform among the edge's
  non-``none`` ops) — the standard random-search baseline of NAS.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

from .spaces.genotype import Genotype

KINDS = ("normal", "reduce")


def edge_stats(probs, op_names: Sequence[Sequence[str]]) -> dict:
    """Per-edge statistics of one cell type's op weights ``probs`` (edges, ops), plus their means.

    ``op_names[e]`` names the ops of edge ``e`` (the margin ignores ``none``, as the
    genotype does).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected (edges, ops) weights, got shape {p.shape}")
    k = p.shape[1]
    max_p = p.max(axis=1)
    entropy = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)
    dev = np.abs(p - 1.0 / k).max(axis=1)
    margin = []
    for e, names in enumerate(op_names):
        real = sorted((float(p[e, i]) for i, n in enumerate(names) if n != "none"), reverse=True)
        margin.append(real[0] - real[1] if len(real) > 1 else 0.0)
    margin = np.asarray(margin)
    return {
        "max_softmax": max_p.round(6).tolist(), "entropy": entropy.round(6).tolist(),
        "margin": margin.round(6).tolist(), "deviation_from_uniform": dev.round(6).tolist(),
        "uniform": 1.0 / k, "uniform_entropy": round(math.log(k), 6),
        "mean_max_softmax": round(float(max_p.mean()), 6), "max_max_softmax": round(float(max_p.max()), 6),
        "mean_entropy": round(float(entropy.mean()), 6), "mean_margin": round(float(margin.mean()), 6),
        "max_deviation_from_uniform": round(float(dev.max()), 6),
    }


def movement(history: dict[str, list], op_names: dict[str, Sequence[Sequence[str]]]) -> dict:
    """Summary of an architecture history ``{kind: [softmax (edges, ops) per logged step]}``.

    Per cell type: the statistics of the last weights (:func:`edge_stats`) and
    ``moved``, the largest change of any weight between the first and the last
    logged step. ``max_deviation_from_uniform`` (over both cell types) is the
    headline: about 1e-4 for the 1e-3 initialisation, several hundredths once
    the search has chosen.
    """
    out: dict = {}
    for kind in KINDS:
        steps = history.get(kind) or []
        if not steps:
            continue
        first, last = np.asarray(steps[0], dtype=np.float64), np.asarray(steps[-1], dtype=np.float64)
        if first.shape != last.shape:       # P-DARTS stages change the op set: compare within the last stage
            same = [np.asarray(s) for s in steps if np.asarray(s).shape == last.shape]
            first = same[0]
        st = edge_stats(last, op_names[kind])
        st["moved"] = round(float(np.abs(last - first).max()), 6)
        out[kind] = st
    cells = list(out.values())
    if cells:
        out["max_deviation_from_uniform"] = max(v["max_deviation_from_uniform"] for v in cells)
        out["mean_margin"] = round(float(np.mean([v["mean_margin"] for v in cells])), 6)
        out["moved"] = max(v["moved"] for v in cells)
    return out


def headline(stats: dict) -> dict:
    """The few numbers of :func:`movement` worth a metrics row (flat, floats only)."""
    row = {}
    for kind in KINDS:
        if kind in stats:
            s = stats[kind]
            row[f"arch/{kind}_mean_max_softmax"] = s["mean_max_softmax"]
            row[f"arch/{kind}_mean_entropy"] = s["mean_entropy"]
            row[f"arch/{kind}_mean_margin"] = s["mean_margin"]
            row[f"arch/{kind}_max_deviation"] = s["max_deviation_from_uniform"]
    return row


# --------------------------------------------------------------------------- genotypes


def _edges(cell: Sequence) -> list[set]:
    """Per node, the set of (input, op) pairs of a genotype cell (two entries per node)."""
    cell = [(str(op), int(j)) for op, j in cell]
    return [{(j, op) for op, j in cell[i:i + 2]} for i in range(0, len(cell), 2)]


def genotype_agreement(a: Genotype, b: Genotype, kinds: Sequence[str] = KINDS) -> dict:
    """Fraction of cell edges two genotypes share: ``edges`` (same input and op) and ``inputs`` (same input)."""
    same = same_in = total = 0
    for kind in kinds:
        for na, nb in zip(_edges(getattr(a, kind)), _edges(getattr(b, kind))):
            same += len(na & nb)
            same_in += len({j for j, _ in na} & {j for j, _ in nb})
            total += len(na)
    return {"edges": same / max(total, 1), "inputs": same_in / max(total, 1)}


def _space_ops(op_names: dict[str, Sequence[Sequence[str]]], kind: str) -> list[list[str]]:
    return [[n for n in names if n != "none"] for names in op_names[kind]]


def chance_agreement(op_names: dict[str, Sequence[Sequence[str]]], steps: int, kinds: Sequence[str] = KINDS) -> dict:
    """Expected :func:`genotype_agreement` of two genotypes drawn by :func:`random_genotype` (exact).

    Node ``i`` picks 2 of its ``i + 2`` inputs, so input ``j`` is in both draws with
    probability ``(2 / n)^2``, and then shares the op with probability ``1 / ops_j``.
    """
    same = same_in = total = 0.0
    for kind in kinds:
        ops = _space_ops(op_names, kind)
        e = 0
        for node in range(steps):
            n = node + 2
            for j in range(n):
                both = (min(2, n) / n) ** 2
                same_in += both
                same += both / len(ops[e + j])
            total += min(2, n)
            e += n
    return {"edges": same / total, "inputs": same_in / total}


def random_genotype(op_names: dict[str, Sequence[Sequence[str]]], steps: int, rng: random.Random) -> Genotype:
    """A cell drawn uniformly from the space: per node two distinct inputs, each with a uniform non-``none`` op."""
    cells = {}
    for kind in KINDS:
        ops = _space_ops(op_names, kind)
        gene, e = [], 0
        for node in range(steps):
            n = node + 2
            for j in sorted(rng.sample(range(n), min(2, n))):
                gene.append((rng.choice(ops[e + j]), j))
            e += n
        cells[kind] = gene
    concat = list(range(2, 2 + steps))
    return Genotype(normal=cells["normal"], normal_concat=concat, reduce=cells["reduce"], reduce_concat=concat)


def op_share(genotype: Genotype, ops: Sequence[str], kinds: Sequence[str] = KINDS) -> float:
    """Fraction of a genotype's edges whose op is in ``ops`` (the known-answer task's measure)."""
    cells = [e for kind in kinds for e in getattr(genotype, kind)]
    return sum(op in ops for op, _ in cells) / max(len(cells), 1)


def op_mass(probs, names: Sequence[Sequence[str]], ops: Sequence[str]) -> float:
    """Mean over edges of the softmax weight on ``ops`` (uniform: ``len(ops) / K``)."""
    p = np.asarray(probs, dtype=np.float64)
    return float(np.mean([sum(p[e, i] for i, n in enumerate(row) if n in ops) for e, row in enumerate(names)]))


def reseed_alphas(model, seed: int) -> None:
    """Redraw the architecture parameters as ``1e-3 * randn`` from their own generator.

    Two runs with the same ``seed`` (weights, data order) and different ``seed``
    here differ only in the α initialisation, which isolates whether the data or
    the initial noise decides the genotype.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.arch_parameters():
            p.copy_((1e-3 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p))
