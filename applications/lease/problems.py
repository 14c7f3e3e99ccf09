"""The four LeaSE problems (paper Eq. 5, Algorithm 1), declared on the public mlo API.

    E'  = E − ξ_E ∇_E  CE(f(x; E, A), y)                       explainer learns      (min, reads A)
    Δ'  = Δ + ξ_Δ ∇_Δ  Σ_i CE(f(x_i+δ_i; E'), f(x_i; E'))        explainer explains    (max, reads E';
                                                                 A is a declared constant)
    W'  = W − ξ_W ∇_W  CE(g(x ⊙ δ'; W), y)                      audience learns       (min, reads Δ')
    A  ← A − η ∇_A [CE(f(x_v; E', A), y_v) + γ CE(g(x_v; W'), y_v)]   architecture  (min, reads E', W')

mlo runs them in this order and brings A's gradient back through the whole
chain A → E' → Δ' → W' and the direct path A → E', one VJP per edge. The
baseline mode (plain DARTS / PC-DARTS / P-DARTS) keeps only E and A.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mlo
import mlo.precision

from . import explain
from .config import SearchConfig


@dataclass
class Loaders:
    explainer_train: object      # D_e^tr
    audience_train: object       # D_a^tr (its batches carry example indices for the bank)
    val: object                  # D_e^val = D_a^val


class OnDevice:
    """Iterate a loader, moving each ``(x, y, index)`` batch to a device (and dtype)."""

    def __init__(self, loader, device: torch.device, dtype: torch.dtype = torch.float32):
        self.loader, self.device, self.dtype = loader, device, dtype
        self.generator = getattr(loader, "generator", None)   # lets mlo replay the shuffle on resume

    def __iter__(self):
        for x, y, idx in self.loader:
            yield (x.to(self.device, self.dtype, non_blocking=True), y.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))

    def __len__(self):
        return len(self.loader)


def _sgd(cfg, total_steps: int):
    def make(params):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def schedule(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=cfg.lr_min)
    return make, schedule


def bank_rows(batch) -> torch.Tensor:
    """The bank rows a ``(x, y, index)`` batch reads: its example indices."""
    return batch[2]


def build_problems(cfg: SearchConfig, explainer: nn.Module, audience: nn.Module | None,
                   bank: torch.Tensor | None, loaders: Loaders, total_steps: int,
                   sparse_bank: bool = True) -> list[mlo.Problem]:
    """The LeaSE problems (or the baseline's two) in execution order.

    The explanation problem declares the bank row-sparse (``mlo.Problem(rows=...)``): each step
    only the batch's rows are gathered, differentiated and updated. ``sparse_bank=False``
    declares it one dense parameter (the same results; every step then costs a bank-sized
    gradient, update and engine vectors — kept for the benchmarks' comparison).
    """
    lease = cfg.mode == "lease"
    # bf16 autocast on the real steps (CUDA, or CPU); the engines' passes run on the fp32 master values
    autocast = mlo.precision.Autocast(next(explainer.parameters()).device.type, enabled=cfg.bf16)

    def fp(t):  # losses in fp32 under bf16 autocast; otherwise the parameters' own precision
        return t.float() if cfg.bf16 else t

    def explainer_loss(ctx, batch):
        x, y, _ = batch
        with autocast(ctx):
            logits = ctx.forward(explainer, x)
        return F.cross_entropy(fp(logits), y)

    def explanation_loss(ctx, batch):
        x, _, idx = batch
        delta = ctx["explanation"][idx]
        with autocast(ctx):
            perturbed, clean = ctx.forward(explainer, x + delta), ctx.forward(explainer, x)
        return explain.explanation_loss(fp(perturbed), fp(clean))

    def audience_loss(ctx, batch):
        x, y, idx = batch
        inputs = explain.reweight(x, ctx["explanation"][idx], cfg.explain.reweight)
        with autocast(ctx):
            logits = ctx.forward(audience, inputs)
        return F.cross_entropy(fp(logits), y)

    def architecture_loss(ctx, batch):
        x, y, _ = batch
        total = x.new_zeros(())
        if not cfg.audience_only:
            # first order (DARTS-1st style): this term does not differentiate E'(A), only A directly
            stop = ("explainer",) if cfg.explainer_val_order == "first" else ()
            with autocast(ctx):
                logits = fp(ctx.forward(explainer, x, constants=stop))
            total = total + F.cross_entropy(logits, y)
            ctx.log("explainer_val_acc", (logits.argmax(1) == y).float().mean())
        if lease:
            with autocast(ctx):
                logits_a = fp(ctx.forward(audience, x))
            loss_a = F.cross_entropy(logits_a, y)
            ctx.log("audience_val_loss", loss_a)
            ctx.log("audience_val_acc", (logits_a.argmax(1) == y).float().mean())
            total = total + cfg.gamma * loss_a
        return total

    sgd_e, sched_e = _sgd(cfg.weights, total_steps)
    problems = [mlo.Problem(
        "explainer", dict(explainer.named_weight_parameters()), explainer_loss, sgd_e, scheduler=sched_e,
        data=loaders.explainer_train, reads=["architecture"], engine=cfg.engines.build("explainer"),
        grad_clip=cfg.weights.grad_clip, modules=[explainer])]
    if lease:
        pgd = cfg.explain.method == "pgd"
        if pgd:
            opt = lambda p: explain.SignedProjected(p, lr=cfg.explain.pgd_step_size, eps=cfg.explain.pgd_eps)  # noqa: E731
        else:
            opt = lambda p: torch.optim.SGD(p, lr=cfg.explain.lr)  # noqa: E731
        problems.append(mlo.Problem(
            "explanation", bank, explanation_loss, opt, data=loaders.audience_train, reads=["explainer"],
            constants=["architecture"], mode="max", steps=cfg.explain.pgd_steps if pgd else 1,
            engine=mlo.FirstOrder() if pgd else cfg.engines.build("explanation"),
            rows=bank_rows if sparse_bank else None))
        sgd_w, sched_w = _sgd(cfg.audience_optim, total_steps)
        problems.append(mlo.Problem(
            "audience", audience, audience_loss, sgd_w, scheduler=sched_w, data=mlo.SameBatch("explanation"),
            reads=["explanation"], engine=cfg.engines.build("audience"), grad_clip=cfg.audience_optim.grad_clip))
    a = cfg.arch
    reads = (["explainer"] if not cfg.audience_only else []) + (["audience"] if lease else [])
    problems.append(mlo.Problem(
        "architecture", dict(explainer.named_arch_parameters()), architecture_loss,
        lambda p: torch.optim.Adam(p, lr=a.lr, betas=(a.beta1, a.beta2), weight_decay=a.weight_decay),
        data=loaders.val, reads=reads))
    return problems
