"""Pictures of a search: the derived cells, the architecture weights over time,
and images next to their explanations and reweighted versions (matplotlib, Agg)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .spaces import Genotype  # noqa: E402


#: Radius of a node's disc in ``cell_layout`` units; every edge clears other nodes by at least ``CLEARANCE``.
NODE_RADIUS = 0.2
CLEARANCE = 0.3


def cell_layout(steps: int) -> dict:
    """Where ``_draw_cell`` puts the nodes of a cell with ``steps`` intermediate nodes: every node on one
    circle, in the order c_{k-1}, c_{k-2}, node 0, ..., node steps-1, c_{k} (clockwise over the top from
    the lower left), evenly spaced.

    A straight line meets a circle in at most two points, so an edge (a chord) never runs through a node
    other than its own two, and no two edges lie on one line; the radius grows with the node count so
    that every chord stays ``CLEARANCE`` away from the nodes it passes (a chord skipping one node is the
    closest: ``radius·(1 − cos θ)``, θ the spacing). Keys: 0 and 1 (the inputs), ``i + 2`` for
    intermediate node i, ``"out"``."""
    keys = [1, 0] + [i + 2 for i in range(steps)] + ["out"]
    theta = 2 * np.pi / len(keys)
    radius = max(1.4, CLEARANCE / (1 - np.cos(theta)))     # 1.4: an op's name fits between two neighbours
    start = np.pi + theta / 2          # c_{k-1} just below the left, then clockwise
    return {k: (radius * float(np.cos(start - i * theta)), radius * float(np.sin(start - i * theta)))
            for i, k in enumerate(keys)}


def cell_edges(edges, concat) -> list[tuple]:
    """``(source, target, op or None)`` of every arrow ``_draw_cell`` draws (None: into the output)."""
    return [(j, k // 2 + 2, op) for k, (op, j) in enumerate(edges)] + [(n, "out", None) for n in concat]


def _draw_cell(ax, edges, concat, title: str) -> None:
    """The cell's nodes on a circle (``cell_layout``), an arrow per edge labelled with its op, dashed
    arrows into the output."""
    from matplotlib.patches import Circle

    steps = len(edges) // 2
    pos = cell_layout(steps)
    labels = {0: "c_{k-2}", 1: "c_{k-1}", "out": "c_{k}"}
    placed: list[np.ndarray] = []
    for source, target, op in cell_edges(edges, concat):
        p0, p1 = np.array(pos[source]), np.array(pos[target])
        u = (p1 - p0) / np.linalg.norm(p1 - p0)
        a, b = p0 + NODE_RADIUS * u, p1 - NODE_RADIUS * u
        style = dict(arrowstyle="->", lw=1.2, color="tab:blue", shrinkA=0, shrinkB=0) if op is not None else \
            dict(arrowstyle="->", lw=0.8, color="0.6", ls="--", shrinkA=0, shrinkB=0)
        ax.annotate("", xy=tuple(b), xytext=tuple(a), arrowprops=style)
        if op is None:
            continue
        # the label lies along its own edge, where it is farthest from the labels placed so far
        spots = [a + t * (b - a) for t in (0.5, 0.38, 0.62)]      # clear of the arrow heads
        spot = max(spots, key=lambda q: min((np.linalg.norm(q - o) for o in placed), default=np.inf))
        placed.append(spot)
        angle = float(np.degrees(np.arctan2(u[1], u[0])))
        angle = angle - 180 if angle > 90 else angle + 180 if angle < -90 else angle     # upright text
        ax.text(*spot, op, fontsize=7, ha="center", va="center", color="tab:blue", zorder=3, rotation=angle,
                rotation_mode="anchor", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.3))
    for key, (x, y) in pos.items():
        color = "lightgreen" if key in (0, 1) else ("khaki" if key == "out" else "lightblue")
        ax.add_patch(Circle((x, y), NODE_RADIUS, facecolor=color, edgecolor="0.3", zorder=4))
        ax.text(x, y, labels.get(key, str(key - 2) if isinstance(key, int) else key), ha="center", va="center",
                fontsize=8, zorder=5)
    r = max(abs(v) for xy in pos.values() for v in xy) + NODE_RADIUS + 0.05
    ax.set_xlim(-r, r)
    ax.set_ylim(-r, r)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.axis("off")


def plot_genotype(genotype: Genotype, path: str) -> None:
    """The normal and the reduction cell side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    _draw_cell(axes[0], genotype.normal, genotype.normal_concat, "normal cell")
    _draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "reduction cell")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_alpha_history(steps: list[int], history: dict[str, list[np.ndarray]], op_names: dict[str, list[list[str]]],
                       path: str) -> None:
    """Heatmaps of softmax(alpha) - 1/K over time: one row per (edge, op), one column per logged step.

    The deviation from uniform, on a colour scale centred at 0 and stretched to the
    largest deviation (the title gives it), shows change however small: red ops
    gain weight, blue ops lose it. A search that has not moved says so in the title.
    """
    kinds = [k for k in ("normal", "reduce") if history.get(k)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 9), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        arr = np.stack(history[kind])                       # (T, edges, ops)
        t, e, o = arr.shape
        img = arr.reshape(t, e * o).T - 1.0 / o
        scale = max(float(np.abs(img).max()), 1e-6)
        im = ax.imshow(img, aspect="auto", cmap="RdBu_r", interpolation="nearest", vmin=-scale, vmax=scale)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=f"softmax - 1/{o}")
        names = op_names[kind]
        ax.set_yticks(range(e * o))
        ax.set_yticklabels([f"e{i}:{names[i][k]}" for i in range(e) for k in range(o)], fontsize=4)
        ticks = np.linspace(0, t - 1, min(t, 6)).astype(int)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[i]) for i in ticks])
        ax.set_xlabel("step")
        final = arr[-1]
        ax.set_title(f"{kind} cell: softmax(alpha) - uniform\nlargest |deviation| over the run {scale:.4f}, "
                     f"final mean max weight {final.max(axis=1).mean():.3f} (uniform {1.0 / o:.3f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_explanations(x: torch.Tensor, delta: torch.Tensor, reweighted: torch.Tensor, path: str, n: int = 8) -> None:
    """Rows: images, explanations δ, reweighted images x ⊙ δ (each shown min-max scaled)."""
    n = min(n, x.shape[0])
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.4), squeeze=False)
    for row, (name, t) in enumerate((("x", x), ("δ", delta), ("x ⊙ δ", reweighted))):
        for i in range(n):
            img = t[i].detach().float().cpu()
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
            img = img.permute(1, 2, 0).numpy()
            ax = axes[row][i]
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
