"""Pictures of a search: the derived cells, the architecture weights over time,
and images next to their explanations and reweighted versions (matplotlib, Agg)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .spaces import Genotype  # noqa: E402


def _draw_cell(ax, edges, concat, title: str) -> None:
    """Inputs on the left, intermediate nodes in the middle, the output on the right."""
    steps = len(edges) // 2
    pos = {0: (0.0, 0.75), 1: (0.0, 0.25)}
    for i in range(steps):
        pos[i + 2] = (0.35 + 0.45 * (i / max(steps - 1, 1)), 0.9 - 0.8 * (i / max(steps - 1, 1)))
    pos["out"] = (1.1, 0.5)
    labels = {0: "c_{k-2}", 1: "c_{k-1}", "out": "c_{k}"}
    for (op, j), k in zip(edges, range(len(edges))):
        node = k // 2 + 2
        (x0, y0), (x1, y1) = pos[j], pos[node]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.2, shrinkA=12, shrinkB=12))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.02 * (1 if k % 2 else -1), op, fontsize=7, ha="center",
                color="tab:blue", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
    for node in concat:
        (x0, y0), (x1, y1) = pos[node], pos["out"]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color="0.6", lw=0.8, ls="--", shrinkA=12, shrinkB=12))
    for key, (x, y) in pos.items():
        color = "lightgreen" if key in (0, 1) else ("khaki" if key == "out" else "lightblue")
        ax.text(x, y, labels.get(key, str(key - 2) if isinstance(key, int) else key), ha="center", va="center",
                fontsize=9, bbox=dict(boxstyle="round", facecolor=color, edgecolor="0.3"))
    ax.set_xlim(-0.15, 1.25)
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.axis("off")


def plot_genotype(genotype: Genotype, path: str) -> None:
    """The normal and the reduction cell side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw_cell(axes[0], genotype.normal, genotype.normal_concat, "normal cell")
    _draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "reduction cell")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
