"""Explanations: the per-example perturbation bank, the two ways to update it,
and how the audience reweights its inputs with them.

Stage 2 of LeaSE maximizes ``Σ_i CE(f(x_i + δ_i; E'), f(x_i; E'))`` over the
bank ``Δ = {δ_i}``. Two update rules:

* ``ascent`` (default, the paper's Eq. 7 read as the ascent it must be): one
  plain gradient-ascent step ``δ' = δ + ξ_Δ ∇_δ``. It is differentiable, so the
  architecture's hypergradient reaches E' through Δ' (the link E' → Δ' is kept).
* ``pgd``: k signed steps of size α projected onto the ε-box (the variant of
  related public code). ``sign`` has zero derivative, so this *cuts* the E' → Δ'
  link: the audience term then contributes no architecture gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REWEIGHTS = {
    "mul": lambda x, d: x * d,                     # x ⊙ δ (the paper)
    "mul_abs": lambda x, d: x * d.abs(),           # x ⊙ |δ|
    "mul_one_plus_abs": lambda x, d: x * (1 + d.abs()),   # x ⊙ (1 + |δ|)
}


def reweight(x: Tensor, delta: Tensor, kind: str = "mul") -> Tensor:
    """The audience's input built from an image batch and its explanations."""
    return REWEIGHTS[kind](x, delta)


def init_bank(num_examples: int, shape: tuple[int, ...], scale: float, generator: torch.Generator,
              dtype=torch.float32) -> Tensor:
    """A bank of explanations, uniform in ``[-scale, scale]`` (a random start: at δ = 0 the
    explanation loss has zero gradient)."""
    bank = (torch.rand((num_examples, *shape), generator=generator, dtype=dtype) * 2 - 1) * scale
    return bank.requires_grad_(True)


def explanation_loss(logits_perturbed: Tensor, logits_clean: Tensor) -> Tensor:
    """``Σ_i CE(softmax(f(x_i+δ_i)), softmax(f(x_i)))`` = ``−Σ_i Σ_k p_k(x_i) log p_k(x_i+δ_i)``.

    Summed over the batch, so each δ_i's step does not depend on the batch size.
    The clean prediction is *not* detached: it depends on E' as in the paper.
    """
    return -(F.softmax(logits_clean, dim=1) * F.log_softmax(logits_perturbed, dim=1)).sum()


class SignedProjected(torch.optim.Optimizer):
    """PGD on a bank: ``δ ← clip(δ − α·sign(grad), −ε, ε)`` (descends on the signed loss,
    i.e. ascends the explanation loss). Rows with a zero gradient do not move.

    ``row_step`` is the same update on the rows a row-sparse bank's batch names (what
    ``mlo`` calls for ``Problem(rows=...)``); the rows it does not name are not
    projected either, which differs from ``step`` only for rows outside the ε-box
    (a bank initialised wider than ``eps``)."""

    def __init__(self, params, lr: float, eps: float):
        if lr <= 0 or eps <= 0:
            raise ValueError(f"SignedProjected needs lr > 0 and eps > 0, got lr={lr}, eps={eps}")
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * torch.sign(p.grad)).clamp_(-group["eps"], group["eps"])

    @torch.no_grad()
    def row_step(self, group: dict, param: Tensor, rows: Tensor, grad: Tensor) -> None:
        """``step`` on the rows ``rows`` of ``param`` (``grad``: their gradient, one row each)."""
        param[rows] = (param[rows] - group["lr"] * torch.sign(grad)).clamp_(-group["eps"], group["eps"])
