"""Optimizer update rules as pure, differentiable functions.

The unrolled and finite-difference engines differentiate *the step that really
ran*: ``w' = U(w, g, state)``. These functions mirror ``torch.optim.SGD``,
``Adam`` and ``AdamW`` (momentum, dampening, Nesterov, weight decay, AMSGrad,
maximize) and the optional global-norm gradient clip, so "exact" means exact
for the optimizer the user chose. A test checks each against ``optimizer.step()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError
from .tree import Tree

SUPPORTED = ("SGD", "Adam", "AdamW")


@dataclass
class Snapshot:
    """Hyperparameters and optimizer state of one problem just before a step."""

    kind: str                       # "sgd" or "adam"
    hyper: dict[str, dict]          # per parameter key: lr, momentum, betas, ...
    state: dict[str, dict[str, Tensor]]
    clip: float | None

    @property
    def linear_in_grad(self) -> bool:
        """True when ``U`` is affine in ``g`` (then its Jacobian needs no gradient)."""
        return self.kind == "sgd" and self.clip is None


def check_supported(optimizer: torch.optim.Optimizer, where: str) -> None:
    name = type(optimizer).__name__
    if name not in SUPPORTED:
        raise ConfigError(f"{where}: the unrolled and finite-difference engines differentiate the "
                          f"optimizer's update rule, which is known for {', '.join(SUPPORTED)}; "
                          f"got {name}. Use one of those optimizers or an implicit / first-order engine.")


def snapshot(optimizer: torch.optim.Optimizer, params: Tree, clip: float | None) -> Snapshot:
    """Copy what ``U`` needs, taken before ``optimizer.step()`` changes it."""
    kind = "sgd" if type(optimizer).__name__ == "SGD" else "adam"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    hyper, state = {}, {}
    for key, p in params.items():
        g = group_of[id(p)]
        st = optimizer.state.get(p, {})
        if kind == "sgd":
            hyper[key] = {k: g[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
            buf = st.get("momentum_buffer")
            state[key] = {} if buf is None else {"buf": buf.detach().clone()}
        else:
            decoupled = type(optimizer).__name__ == "AdamW" or g.get("decoupled_weight_decay", False)
            hyper[key] = {k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")}
            hyper[key]["decoupled"] = bool(decoupled)
            hyper[key]["step"] = int(st["step"]) if "step" in st else 0
            state[key] = {k: st[k].detach().clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in st}
        hyper[key]["lr"] = float(hyper[key]["lr"])
    return Snapshot(kind, hyper, state, clip)


def apply(snap: Snapshot, w: Tree, g: Tree) -> tuple[Tree, Snapshot]:
    """One differentiable step ``(w, g) -> w'``; also returns the next snapshot."""
    if snap.clip is not None:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in g.values()]))
        coef = torch.clamp(snap.clip / (total + 1e-6), max=1.0)
        g = {k: v * coef for k, v in g.items()}
    step = _sgd if snap.kind == "sgd" else _adam
    new_w, new_hyper, new_state = {}, {}, {}
    for k in w:
        new_w[k], new_hyper[k], new_state[k] = step(w[k], g[k], snap.hyper[k], snap.state[k])
    return new_w, Snapshot(snap.kind, new_hyper, new_state, snap.clip)


def _sgd(w: Tensor, g: Tensor, h: dict, st: dict):
    d = -g if h["maximize"] else g
    if h["weight_decay"]:
        d = d + h["weight_decay"] * w
    new_st = {}
    if h["momentum"]:
        buf = st.get("buf")
        buf = d if buf is None else h["momentum"] * buf + (1 - h["dampening"]) * d
        new_st["buf"] = buf
        d = d + h["momentum"] * buf if h["nesterov"] else buf
    return w - h["lr"] * d, h, new_st


def _adam(w: Tensor, g: Tensor, h: dict, st: dict):
    d = -g if h["maximize"] else g
    lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    if wd and h["decoupled"]:
        w = w * (1 - lr * wd)
    elif wd:
        d = d + wd * w
    step = h["step"] + 1
    m = b1 * st["exp_avg"] + (1 - b1) * d if "exp_avg" in st else (1 - b1) * d
    v = b2 * st["exp_avg_sq"] + (1 - b2) * d * d if "exp_avg_sq" in st else (1 - b2) * d * d
    new_st = {"exp_avg": m, "exp_avg_sq": v}
    if h["amsgrad"]:
        vmax = torch.maximum(st["max_exp_avg_sq"], v) if "max_exp_avg_sq" in st else v
        new_st["max_exp_avg_sq"] = vmax
        v = vmax
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    denom = _safe_sqrt(v) / math.sqrt(bc2) + eps
    return w - (lr / bc1) * m / denom, dict(h, step=step), new_st


def _safe_sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) derivative where ``v == 0``."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))
