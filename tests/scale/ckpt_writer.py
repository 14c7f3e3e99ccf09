"""Checkpoint every step as fast as possible until killed (test_crash_safety.py SIGKILLs it).

One problem, a parameter of 2**20 floats, loss sum(w): after step s every entry is exactly
1 - s/1024 (SGD, lr 2**-10, exact in float32), so a checkpoint proves its own consistency.
"""
import sys

import torch

import mlo

if __name__ == "__main__":
    torch.set_num_threads(1)
    w = torch.ones(2 ** 20, requires_grad=True)
    problem = mlo.Problem("p", w, lambda ctx, batch: ctx["p"].sum(), lambda p: torch.optim.SGD(p, lr=2.0 ** -10))
    mlo.Runner(mlo.Graph([problem]), progress=False, checkpoint=sys.argv[1], checkpoint_every=1).run(10 ** 9)
