"""Child-process driver for tests/lease/test_native_safety.py (not collected by pytest).

    python tests/lease/native_shapes.py CASE DTYPE[,DTYPE...] ITERATIONS

Runs forward + backward (inputs and weights, as the LeaSE engines do) of one of the
project's own modules at the shapes where oneDNN's AVX2 stride-2 1x1 backward-data
kernel wrote out of bounds on channels-last inputs with fewer than 8 channels, with
the layout the networks really hand those modules. A memory error kills this process
(or corrupts its numbers, which the finite-value and repeat checks catch); the parent
test reports it as one failed test.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from applications.lease.models.resnet import build_audience
from applications.lease.spaces import build_supernet
from applications.lease.spaces.ops import FactorizedReduce, activation_layout


def _modules(case: str):
    """``(module, input)`` for ``case``: the input laid out as the networks lay it out."""
    torch.manual_seed(0)
    if case == "factorized_reduce":     # skip_connect at stride 2 in a C=2 reduction cell
        x = activation_layout(torch.relu(torch.randn(8, 2, 8, 8)))
        return FactorizedReduce(2, 2), x
    if case == "supernet":              # the tests' and benchmarks' tiny DARTS supernet
        return build_supernet("darts", 2, 10, 3, in_channels=1, steps=2, multiplier=2), torch.randn(4, 1, 8, 8)
    if case == "resnet":                # the narrowest audience: 4-channel stride-2 1x1 shortcut
        return build_audience("resnet18", 10, in_channels=1, width=1 / 16), torch.randn(8, 1, 8, 8)
    raise SystemExit(f"unknown case {case!r}")


def main(case: str, dtype: str, iterations: int) -> None:
    torch.set_num_threads(1)
    model, x = _modules(case)
    model = model.to(getattr(torch, dtype))
    x = x.to(getattr(torch, dtype)).requires_grad_()
    params = [p for p in model.parameters() if p.requires_grad]
    first = None
    for _ in range(iterations):
        out = model(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x, *params])
        total = sum(g.double().abs().sum() for g in grads)
        if not torch.isfinite(total):
            raise SystemExit(f"{case} {dtype}: non-finite gradient")
        if first is None:
            first = total
        elif total != first:            # same input, same weights: every repeat must agree exactly
            raise SystemExit(f"{case} {dtype}: gradients changed between repeats ({first} vs {total})")
    print("ok", case, dtype, float(first))


if __name__ == "__main__":
    for name in sys.argv[2].split(","):      # one process for every dtype: each prints its own "ok" line
        main(sys.argv[1], name, int(sys.argv[3]))
