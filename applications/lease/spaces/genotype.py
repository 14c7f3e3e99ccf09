"""Genotypes: the discrete cell a search produces, plus the published ones.

A :class:`Genotype` follows the convention of the DARTS code base: ``normal`` and
``reduce`` list two ``(op_name, input_index)`` pairs per intermediate node (input
0 and 1 are the cell's two inputs, ``k >= 2`` is intermediate node ``k - 2``),
and ``*_concat`` names the nodes concatenated into the cell output.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from typing import Sequence

import torch

__all__ = [
    "PRIMITIVES",
    "Genotype",
    "DARTS_V1",
    "DARTS_V2",
    "PC_DARTS",
    "PC_DARTS_IMAGENET",
    "P_DARTS",
    "PUBLISHED",
    "genotype_to_json",
    "genotype_from_json",
    "get_genotype",
    "save_genotype",
    "derive_cell",
]

#: Candidate operations of the DARTS search space, in the standard order (alpha columns).
PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

_CONCAT = [2, 3, 4, 5]

#: DARTS first order (Liu et al., 2019).
DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=list(_CONCAT),
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=list(_CONCAT),
)

#: DARTS second order (Liu et al., 2019); about 3.35M parameters at 20 cells, C=36.
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=list(_CONCAT),
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=list(_CONCAT),
)

#: PC-DARTS searched on CIFAR-10 (Xu et al., 2020).
PC_DARTS = Genotype(
    normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    normal_concat=list(_CONCAT),
    reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    reduce_concat=list(_CONCAT),
)

#: PC-DARTS searched on the ImageNet subsets (Xu et al., 2020).
PC_DARTS_IMAGENET = Genotype(
    normal=[("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
    normal_concat=list(_CONCAT),
    reduce=[("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
            ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
    reduce_concat=list(_CONCAT),
)

#: P-DARTS searched on CIFAR-10 (Chen et al., 2019).
P_DARTS = Genotype(
    normal=[("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
    normal_concat=list(_CONCAT),
    reduce=[("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
    reduce_concat=list(_CONCAT),
)

#: Published genotypes by name; lookups ignore case, ``-`` and ``_``.
PUBLISHED = {
    "DARTS_V1": DARTS_V1,
    "DARTS_V2": DARTS_V2,
    "DARTS": DARTS_V2,
    "PC_DARTS": PC_DARTS,
    "PC_DARTS_IMAGENET": PC_DARTS_IMAGENET,
    "P_DARTS": P_DARTS,
}


def _norm_name(name: str) -> str:
    return name.upper().replace("-", "").replace("_", "")


def genotype_to_json(g: Genotype) -> dict:
    """JSON-ready dict: ``{"normal": [[op, index], ...], "normal_concat": [...], ...}``."""
    return {
        "normal": [[str(op), int(idx)] for op, idx in g.normal],
        "normal_concat": [int(i) for i in g.normal_concat],
        "reduce": [[str(op), int(idx)] for op, idx in g.reduce],
        "reduce_concat": [int(i) for i in g.reduce_concat],
    }


def genotype_from_json(d: dict) -> Genotype:
    """Inverse of :func:`genotype_to_json`; checks op names and input indices."""
    missing = [k for k in Genotype._fields if k not in d]
    if missing:
        raise ValueError(f"genotype JSON lacks {', '.join(missing)}; expected keys {', '.join(Genotype._fields)}")
    g = Genotype(
        normal=[(str(op), int(idx)) for op, idx in d["normal"]],
        normal_concat=[int(i) for i in d["normal_concat"]],
        reduce=[(str(op), int(idx)) for op, idx in d["reduce"]],
        reduce_concat=[int(i) for i in d["reduce_concat"]],
    )
    _check(g)
    return g


def _check(g: Genotype) -> None:
    for kind in ("normal", "reduce"):
        edges = getattr(g, kind)
        if len(edges) % 2:
            raise ValueError(f"genotype.{kind} must list two (op, input) pairs per node, got {len(edges)} entries")
        for k, (op, idx) in enumerate(edges):
            if op not in PRIMITIVES or op == "none":
                raise ValueError(f"genotype.{kind}[{k}]: unknown op {op!r}; expected one of {PRIMITIVES[1:]}")
            node = k // 2
            if not 0 <= idx < node + 2:
                raise ValueError(f"genotype.{kind}[{k}]: node {node} cannot read input {idx}")
        steps = len(edges) // 2
        for i in getattr(g, f"{kind}_concat"):
            if not 0 <= i < steps + 2:
                raise ValueError(f"genotype.{kind}_concat: node {i} does not exist")


def save_genotype(g: Genotype, path: str | os.PathLike) -> None:
    """Write ``g`` as JSON (readable by :func:`get_genotype`)."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(genotype_to_json(g), fh, indent=1)
        fh.write("\n")


def get_genotype(name_or_path: str | os.PathLike | Genotype) -> Genotype:
    """A published genotype by name (``DARTS_V2``, ``pc-darts``, ...) or one read from a JSON file.

    The JSON file may hold the genotype itself or an object with a ``"genotype"`` key
    (as written by a search run).
    """
    if isinstance(name_or_path, Genotype):
        return name_or_path
    text = os.fspath(name_or_path)
    for key, g in PUBLISHED.items():
        if _norm_name(key) == _norm_name(text):
            return g
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{text}: not a JSON genotype ({exc})") from None
        if isinstance(data, dict) and "genotype" in data and "normal" not in data:
            data = data["genotype"]
        return genotype_from_json(data)
    raise ValueError(f"unknown genotype {text!r}: not a file and not one of {', '.join(PUBLISHED)}")


def derive_cell(
    probs: torch.Tensor,
    edge_ops: Sequence[Sequence[str]],
    steps: int,
    edge_weights: torch.Tensor | None = None,
    inputs_per_node: int = 2,
) -> list[tuple[str, int]]:
    """Discretize one cell type: per node keep the strongest ``inputs_per_node`` incoming edges.

    ``probs[e, k]`` is the weight of op ``edge_ops[e][k]`` on edge ``e`` (edges ordered
    node by node, each node's inputs in index order). An edge's strength is its
    largest non-``none`` weight (times ``edge_weights[e]`` when given, as in PC-DARTS)
    and it contributes its argmax non-``none`` op. Pairs come out strongest first,
    matching the DARTS code's ordering.
    """
    probs = probs.detach().float().cpu()
    if edge_weights is not None:
        probs = probs * edge_weights.detach().float().cpu().reshape(-1, 1)
    gene: list[tuple[str, int]] = []
    start = 0
    for node in range(steps):
        n_in = node + 2
        candidates = []
        for j in range(n_in):
            e = start + j
            best_op, best_w = None, float("-inf")
            for k, name in enumerate(edge_ops[e]):
                w = float(probs[e, k])
                if name != "none" and w > best_w:
                    best_op, best_w = name, w
            if best_op is not None:
                candidates.append((best_w, j, best_op))
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep the lower input index first
        for _, j, op in candidates[:inputs_per_node]:
            gene.append((op, j))
        start += n_in
    return gene
