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


def snapshot(optimizer: torch.optim.Optimizer, params: Tree, clip: float | None, rows=None) -> Snapshot:
    """Copy what ``U`` needs, taken before ``optimizer.step()`` changes it.

    ``rows`` (a ``mlo.rows.Rows``, SGD only): the state of those rows of a row-sparse table;
    with momentum, a row never visited has a zero buffer (lazy momentum).
    """
    kind = "sgd" if rows is not None or type(optimizer).__name__ == "SGD" else "adam"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    hyper, state = {}, {}
    for key, p in params.items():
        g = group_of[id(p)]
        st = optimizer.state.get(p, {})
        if kind == "sgd":
            hyper[key] = {k: g[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
            buf = st.get("momentum_buffer")
            if rows is None:
                state[key] = {} if buf is None else {"buf": buf.detach().clone()}
            elif g["momentum"]:
                state[key] = {"buf": buf[rows.index].clone() if buf is not None else p.new_zeros(
                    (rows.index.numel(), *p.shape[1:]))}
            else:
                state[key] = {}
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


def grad_vjp(snap: Snapshot, w: Tree, g: Tree, u: Tree) -> Tree:
    """``(∂U/∂g)ᵀ u`` at ``(w, g)``: how the step turns a change of its gradient into a
    change of the parameters (the vector the finite difference perturbs along).

    SGD (any momentum, dampening, Nesterov, weight decay, maximize) and the
    global-norm clip in closed form, with ``torch._foreach`` ops; Adam by autograd
    through ``apply``. ``g`` is the unclipped gradient the step used.
    """
    if snap.kind != "sgd":
        return _autograd_vjp(snap, w, g, u)
    keys = list(u)
    coefs = [-_sgd_gain(snap.hyper[k], snap.state[k]) for k in keys]
    if len(set(coefs)) == 1:
        y = torch._foreach_mul([u[k] for k in keys], coefs[0])
    else:
        y = torch._foreach_mul([u[k] for k in keys], coefs)
    if snap.clip is not None:
        y = _clip_vjp(snap.clip, [g[k] for k in keys], y)
    return dict(zip(keys, y))


def _sgd_gain(h: dict, st: dict) -> float:
    """``∂w'/∂g`` of one SGD step, a scalar times the identity (``-lr·gain``; this returns ``lr·gain``)."""
    a = 1.0 if not h["momentum"] or st.get("buf") is None else 1.0 - h["dampening"]
    gain = 1.0 + h["momentum"] * a if h["momentum"] and h["nesterov"] else (a if h["momentum"] else 1.0)
    return (-1.0 if h["maximize"] else 1.0) * h["lr"] * gain


def _clip_vjp(clip: float, g: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    """``(∂ g_c / ∂g)ᵀ y`` for ``g_c = g · min(1, clip / (‖g‖ + 1e-6))`` (``clip_grad_norm_``)."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
    ratio = clip / (total + 1e-6)
    active = ratio <= 1.0          # where autograd's clamp(max=1) passes the gradient
    coef = torch.where(active, ratio, torch.ones_like(ratio))
    gy = torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g, y)]).sum()
    # d ratio / d g = -clip / (‖g‖ + 1e-6)² · g / ‖g‖   (only while the clip is active)
    k = torch.where(active, -clip * gy / ((total + 1e-6) ** 2 * torch.clamp(total, min=1e-30)),
                    torch.zeros_like(total))
    out = torch._foreach_mul(y, coef)
    torch._foreach_add_(out, torch._foreach_mul(g, k))
    return out


def _autograd_vjp(snap: Snapshot, w: Tree, g: Tree, u: Tree) -> Tree:
    g0 = {k: t.detach().requires_grad_(True) for k, t in g.items()}
    w1, _ = apply(snap, {k: t.detach() for k, t in w.items()}, g0)
    keys = list(w1)
    vs = torch.autograd.grad([w1[k] for k in keys], [g0[k] for k in keys], grad_outputs=[u[k] for k in keys],
                             allow_unused=True, materialize_grads=True)
    return dict(zip(keys, vs))


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
