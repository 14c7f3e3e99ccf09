"""The tiny four-problem LeaSE graph the step, checker and precision tests build (not collected).

:func:`exact_config` is a float64 search config whose optimizers are plain SGD with the
learning rates below, so a test can write the same step out in autograd;
:func:`tiny_lease_graph` builds the supernet, audience, bank and one fixed batch per problem.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

import mlo
from applications.common import load_config
from applications.lease import explain
from applications.lease.config import SearchConfig
from applications.lease.models.resnet import build_audience
from applications.lease.problems import Loaders, build_problems
from applications.lease.spaces import build_supernet

LR_E, LR_D, LR_W, GAMMA = 0.1, 0.5, 0.1, 0.7


def exact_config(engine: str, mode: str = "lease", dtype: str = "float64", **extra) -> SearchConfig:
    """Every edge on ``engine``; plain SGD (no momentum, decay or clipping) at LR_E/LR_D/LR_W; reweight ``mul``."""
    sets = [f"mode={mode}", f"gamma={GAMMA}", f"dtype={dtype}", f"explain.lr={LR_D}", "explain.reweight=mul",
            f"weights.lr={LR_E}", "weights.momentum=0", "weights.weight_decay=0", "weights.grad_clip=null",
            f"audience_optim.lr={LR_W}", "audience_optim.momentum=0", "audience_optim.weight_decay=0",
            "audience_optim.grad_clip=null"]
    sets += [f"engines.{e}.name={engine}" for e in ("explainer", "explanation", "audience")]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(SearchConfig, None, sets)


def tiny_lease_graph(cfg: SearchConfig, seed: int = 0, sparse_bank: bool = True, *, C: int = 2, classes: int = 3,
                     size: int = 6, rows: int = 10, batch: int = 4, init_scale: float = 0.3,
                     dtype: torch.dtype = torch.float64):
    """``(graph, explainer, audience, bank, batches)``: a DARTS supernet (3 cells, 2 nodes) and a
    ResNet-18 audience at width 1/16 (none in baseline mode) on ``size``x``size`` grey images."""
    torch.manual_seed(seed)
    explainer = build_supernet("darts", C, classes, 3, in_channels=1, steps=2, multiplier=2).to(dtype)
    audience = build_audience("resnet18", classes, 1, width=0.0625).to(dtype) if cfg.mode == "lease" else None
    bank = explain.init_bank(rows, (1, size, size), init_scale, torch.Generator().manual_seed(seed), dtype)

    def draw(with_idx: bool):
        x = torch.rand(batch, 1, size, size, dtype=dtype)
        y = torch.randint(0, classes, (batch,))
        idx = torch.randperm(rows)[:batch] if with_idx else torch.arange(batch)
        return x, y, idx
    batches = {"explainer": draw(False), "explanation": draw(True), "architecture": draw(False)}
    loaders = Loaders([batches["explainer"]], [batches["explanation"]], [batches["architecture"]])
    problems = build_problems(cfg, explainer, audience, bank if cfg.mode == "lease" else None, loaders, classes,
                              sparse_bank=sparse_bank)
    return mlo.Graph(problems), explainer, audience, bank, batches


def explainer_step_by_autograd(explainer, audience, bank, batches):
    """The start of an independent plain-autograd LeaSE step (float64 references in the tests):
    fresh leaves E, A, W, D, the explainer and audience as functions ``f(e, a, x)``, ``g(w, x)``, and
    E' = E − ξ_E ∇L_E with its graph."""
    E = {k: v.detach().clone().requires_grad_() for k, v in explainer.named_weight_parameters()}
    A = {k: v.detach().clone().requires_grad_() for k, v in explainer.named_arch_parameters()}
    W = {k: v.detach().clone().requires_grad_() for k, v in audience.named_parameters()}
    D = bank.detach().clone().requires_grad_()
    f = lambda e, a, x: functional_call(explainer, {**e, **a}, (x,))  # noqa: E731
    g = lambda w, x: functional_call(audience, w, (x,))  # noqa: E731
    xe, ye, _ = batches["explainer"]
    gE = torch.autograd.grad(F.cross_entropy(f(E, A, xe), ye), list(E.values()), create_graph=True)
    E1 = {k: v - LR_E * gk for (k, v), gk in zip(E.items(), gE)}
    return E, A, W, D, f, g, E1
