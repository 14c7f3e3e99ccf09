"""``mlo.updates.apply(snapshot(opt, params, clip), w, g)`` equals what ``opt.step()``
(after ``clip_grad_norm_``) really does, over consecutive steps."""
import pytest
import torch

import mlo
from mlo import updates

CONFIGS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_wd": (torch.optim.SGD, dict(lr=0.1, weight_decay=0.05)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "sgd_momentum_dampening_wd": (torch.optim.SGD, dict(lr=0.07, momentum=0.8, dampening=0.3, weight_decay=0.02)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_maximize": (torch.optim.SGD, dict(lr=0.1, momentum=0.5, weight_decay=0.1, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adam_betas_eps": (torch.optim.Adam, dict(lr=0.02, betas=(0.7, 0.9), eps=1e-3)),
    "adam_l2": (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
    "adam_maximize": (torch.optim.Adam, dict(lr=0.01, maximize=True)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.3, amsgrad=True)),
}


def _params():
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_(),
            "b": torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()}


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    # shrinking gradients make AMSGrad's running max matter
    s = 3.0 / (1 + 2 * step)
    return {"a": s * torch.randn(4, 3, generator=gen, dtype=torch.float64),
            "b": s * torch.randn(5, generator=gen, dtype=torch.float64)}


def _check(cls, kw, clip, steps=3, groups=False):
    params = _params()
    if groups:  # two parameter groups with different hyperparameters
        g2 = dict(kw, lr=kw["lr"] * 0.5)
        opt = cls([{"params": [params["a"]]}, {"params": [params["b"]], **g2}], **kw)
    else:
        opt = cls(list(params.values()), **kw)
    chained = None
    chained_w = {k: v.detach().clone() for k, v in params.items()}
    for step in range(steps):
        g = _grads(step)
        snap = updates.snapshot(opt, params, clip)
        predicted, nxt = updates.apply(snap, {k: v.detach().clone() for k, v in params.items()}, g)
        if chained is None:
            chained = snap
        chained_w, chained = updates.apply(chained, chained_w, g)  # the snapshot apply() returns
        for k, p in params.items():
            p.grad = g[k].clone()
        if clip is not None:
            total = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
            assert total > clip  # the clip is active
        opt.step()
        for k, p in params.items():
            assert torch.allclose(predicted[k], p.detach(), rtol=1e-12, atol=1e-14), (step, k)
            assert torch.allclose(chained_w[k], p.detach(), rtol=1e-12, atol=1e-14), (step, k)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("clip", [None, 0.5])
def test_apply_equals_optimizer_step(name, clip):
    cls, kw = CONFIGS[name]
    _check(cls, kw, clip)


@pytest.mark.parametrize("name", ["sgd_momentum_dampening_wd", "adam_amsgrad", "adamw"])
def test_apply_equals_optimizer_step_with_param_groups(name):
    cls, kw = CONFIGS[name]
    _check(cls, kw, None, groups=True)


def test_adam_decoupled_weight_decay_flag():
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1, decoupled_weight_decay=True)
    except TypeError:
        pytest.skip("this torch has no Adam(decoupled_weight_decay=...)")
    _check(torch.optim.Adam, dict(lr=0.01, weight_decay=0.2, decoupled_weight_decay=True), None)


def test_linear_in_grad_flag():
    p = _params()
    assert updates.snapshot(torch.optim.SGD(list(p.values()), lr=0.1, momentum=0.9), p, None).linear_in_grad
    assert not updates.snapshot(torch.optim.SGD(list(p.values()), lr=0.1), p, 1.0).linear_in_grad
    assert not updates.snapshot(torch.optim.Adam(list(p.values()), lr=0.1), p, None).linear_in_grad


def test_apply_is_differentiable_in_w_and_g():
    """The Jacobian of apply w.r.t. g matches finite differences for Adam + clip (what engines use)."""
    params = _params()
    opt = torch.optim.Adam(list(params.values()), lr=0.01, amsgrad=True)
    for step in range(2):
        for k, p in params.items():
            p.grad = _grads(step)[k]
        opt.step()
    snap = updates.snapshot(opt, params, 2.0)
    w = {k: v.detach().clone() for k, v in params.items()}
    g = {k: v.requires_grad_() for k, v in _grads(5).items()}
    u = {k: torch.randn_like(v) for k, v in w.items()}
    out, _ = updates.apply(snap, w, g)
    jv = torch.autograd.grad([out[k] for k in out], [g[k] for k in out], [u[k] for k in out])
    dg = {k: torch.randn_like(v) for k, v in g.items()}
    eps = 1e-6
    plus, _ = updates.apply(snap, w, {k: g[k].detach() + eps * dg[k] for k in g})
    minus, _ = updates.apply(snap, w, {k: g[k].detach() - eps * dg[k] for k in g})
    numeric = sum(((plus[k] - minus[k]) / (2 * eps) * u[k]).sum() for k in w)
    analytic = sum((j * dg[k]).sum() for j, k in zip(jv, out))
    assert abs(float(numeric - analytic)) < 1e-7 * max(1.0, abs(float(analytic)))


def test_unsupported_optimizer_message():
    p = _params()
    with pytest.raises(mlo.ConfigError, match="RMSprop"):
        updates.check_supported(torch.optim.RMSprop(list(p.values()), lr=0.1), "here")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("clip", [None, 0.5, 100.0])      # clip active (‖g‖ ≈ 4–6) and inactive
@pytest.mark.parametrize("prior_steps", [0, 2])            # momentum buffer absent / present
def test_grad_vjp_equals_autograd_through_apply(name, clip, prior_steps):
    """The closed-form ``(∂U/∂g)ᵀu`` the finite difference uses equals autograd through ``apply``."""
    cls, kw = CONFIGS[name]
    params = _params()
    opt = cls(list(params.values()), **kw)
    for step in range(prior_steps):
        for k, p in params.items():
            p.grad = _grads(step)[k]
        opt.step()
    snap = updates.snapshot(opt, params, clip)
    w = {k: v.detach().clone() for k, v in params.items()}
    g = _grads(7)
    gen = torch.Generator().manual_seed(3)
    u = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in w.items()}
    got = updates.grad_vjp(snap, w, g, u)
    want = updates._autograd_vjp(snap, w, g, u)
    for k in w:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)
