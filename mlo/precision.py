"""Mixed precision for objectives: bf16 autocast on real steps, fp32 for the engines.

Parameters (the optimizers' master values) stay in their own precision
(float32). ``Autocast`` is a context factory for the forward passes inside an
objective::

    amp = mlo.precision.Autocast("cuda")              # or "cpu" where supported
    def loss(ctx, batch):
        with amp(ctx):
            logits = ctx.forward(model, x)
        return F.cross_entropy(logits.float(), y)     # the loss itself in fp32

It autocasts the *real* evaluations (``ctx.real_step``: the step's loss, its
gradient and the adjoint seeds). The engines' auxiliary evaluations (finite
difference ± passes, Hessian-vector products of the implicit engines, unrolled
look-aheads) run with autocast switched off, on the fp32 master values: a finite
difference divides a gradient difference by ``2ε``, so bf16 rounding
(``u ≈ 4e-3``) would swamp it, and the implicit solvers' Krylov iterations lose
accuracy in bf16. Pass ``engines=True`` to autocast those passes too.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_available(device_type: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``torch.autocast(device_type, dtype)`` is supported here."""
    try:
        if not torch.amp.is_autocast_available(device_type):
            return False
    except (AttributeError, RuntimeError):
        return False
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return dtype == torch.bfloat16      # CPU autocast supports bf16 (fp16 only on recent builds)
    return True


class Autocast:
    """``amp(ctx)`` -> a context manager (see the module docstring).

    ``device_type``: ``"cuda"`` or ``"cpu"``; ``dtype``: ``torch.bfloat16`` (default)
    or ``torch.float16`` (CUDA); ``enabled=False`` gives a no-op;
    ``engines=True`` also autocasts the engines' auxiliary passes.
    """

    def __init__(self, device_type: str, dtype: torch.dtype | str = torch.bfloat16, enabled: bool = True,
                 engines: bool = False):
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ConfigError(f"Autocast.dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        self.device_type, self.dtype, self.enabled, self.engines = device_type, dtype, bool(enabled), engines
        if self.enabled and not autocast_available(device_type, dtype):
            raise ConfigError(f"Autocast: {str(dtype).replace('torch.', '')} autocast is not supported on "
                              f"{device_type!r} here")

    def __call__(self, ctx=None):
        if not self.enabled:
            return contextlib.nullcontext()
        if ctx is not None and not getattr(ctx, "real_step", True) and not self.engines:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __repr__(self) -> str:
        return (f"Autocast({self.device_type!r}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"enabled={self.enabled}, engines={self.engines})")
