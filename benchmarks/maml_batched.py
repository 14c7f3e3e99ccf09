"""``python -m benchmarks.maml_batched``: a meta-batch of tasks as one task-batched problem.

One MAML outer step (Adam on θ, exact second-order meta-gradient through
``inner_steps`` SGD steps from φ = θ) on a meta-batch of ``--tasks`` 5-way
1-shot digits tasks with a 4-layer conv net, three ways:

* ``vectorized``: one ``Problem(tasks=N)`` (per-task parameters stacked, the
  objective under ``torch.func.vmap``) plus the meta problem;
* ``separate``: N task problems plus the meta problem (what mlo offered before);
* ``vectorized-reuse`` / ``separate-reuse``: the same with
  ``Unrolled(steps=inner_steps, reuse_step_graph=True)``: the meta-gradient goes back through the
  graphs the real inner steps kept, so the inner loop runs once;
* ``handwritten``: the same step in plain ``torch.func`` (``vmap`` over tasks of
  ``grad`` through the inner loop, ``grad`` for the meta-gradient, ``Adam``).

Each variant runs in its own process (so peak memory is its own): ``--warmup``
steps, then ``--steps`` timed steps; reported are wall time and process CPU
time per step and the growth of the peak resident set over the process's size
before the first (warm-up) step: the memory the steps need. ``--check`` first asserts in float64 (4 tasks) that the
variants compute the same θ after one step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import mlo
from applications import digits

WAYS, SHOTS, QUERY = 5, 1, 5


def make_net() -> nn.Module:
    c = 16
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(c * 64, WAYS))


def meta_batches(count: int, tasks: int, seed: int, dtype=torch.float32):
    """``count`` meta-batches: (support x, support y, query x, query y), each with a leading task dimension."""
    x, y = digits.load()
    x = torch.as_tensor(x, dtype=dtype).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(y)
    pools = [x[y == c] for c in range(10)]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        parts = [[], [], [], []]
        for _ in range(tasks):
            classes = torch.randperm(10, generator=gen)[:WAYS].tolist()
            xs, ys, xq, yq = [], [], [], []
            for label, c in enumerate(classes):
                idx = torch.randperm(len(pools[c]), generator=gen)[:SHOTS + QUERY]
                xs.append(pools[c][idx[:SHOTS]])
                xq.append(pools[c][idx[SHOTS:]])
                ys += [label] * SHOTS
                yq += [label] * QUERY
            for part, v in zip(parts, (torch.cat(xs), torch.tensor(ys), torch.cat(xq), torch.tensor(yq))):
                part.append(v)
        out.append(tuple(torch.stack(p) for p in parts))
    return out


def _loss(net, params, x, y):
    return F.cross_entropy(functional_call(net, params, (x,)), y)


def build(variant: str, batches, tasks: int, inner_steps: int, inner_lr: float, meta_lr: float, dtype):
    """``(step(), theta)`` for one variant; every variant starts from the same θ."""
    torch.manual_seed(0)
    net = make_net().to(dtype)
    theta0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    if variant == "handwritten":
        theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
        opt = torch.optim.Adam(list(theta.values()), lr=meta_lr)
        it = iter(batches)

        def task_loss(th, xs, ys, xq, yq):
            phi = th
            for _ in range(inner_steps):
                g = grad(lambda p: _loss(net, p, xs, ys))(phi)
                phi = {k: phi[k] - inner_lr * g[k] for k in phi}
            return _loss(net, phi, xq, yq)

        def meta_loss(th, b):
            return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(th, *b).mean()

        def step():
            g = grad(meta_loss)({k: v.detach() for k, v in theta.items()}, next(it))
            for k, v in theta.items():
                v.grad = g[k]
            opt.step()
        return step, theta

    sgd = lambda p: torch.optim.SGD(p, lr=inner_lr)          # noqa: E731
    variant, _, reuse = variant.partition("-")
    if reuse not in ("", "reuse"):
        raise ValueError(f"unknown variant {variant}-{reuse!r}")
    engine = mlo.Unrolled(steps=inner_steps, reuse_step_graph=bool(reuse))
    if variant == "vectorized":
        def task_objective(ctx, batch):
            xs, ys, _, _ = batch
            return _loss(net, ctx["tasks"], xs, ys)

        def meta_objective(ctx, batch):
            _, _, xq, yq = batch
            return vmap(lambda p, x, y: _loss(net, p, x, y))(ctx["tasks"], xq, yq).mean()

        stacked = {k: torch.zeros(tasks, *v.shape, dtype=dtype, requires_grad=True) for k, v in theta0.items()}
        problems = [mlo.Problem("tasks", stacked, task_objective, sgd, data=batches, steps=inner_steps,
                                init_from="meta", engine=engine, tasks=tasks)]
        reads = ["tasks"]
    elif variant == "separate":
        def task_objective(t):
            return lambda ctx, b: _loss(net, ctx[f"t{t}"], b[0][t], b[1][t])

        def meta_objective(ctx, b):
            return sum(_loss(net, ctx[f"t{t}"], b[2][t], b[3][t]) for t in range(tasks)) / tasks

        problems = [mlo.Problem(f"t{t}", {k: torch.zeros_like(v, requires_grad=True) for k, v in theta0.items()},
                                task_objective(t), sgd, data=batches if t == 0 else mlo.SameBatch("t0"),
                                steps=inner_steps, init_from="meta", engine=engine) for t in range(tasks)]
        reads = [p.name for p in problems]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    source = "tasks" if variant == "vectorized" else "t0"
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    meta = mlo.Problem("meta", theta, meta_objective, lambda p: torch.optim.Adam(p, lr=meta_lr),
                       data=mlo.SameBatch(source), reads=reads)
    stepper = mlo.Stepper(mlo.Graph(problems + [meta]), nan_policy="off")
    return (lambda: stepper.step()), theta


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(variant: str, args) -> dict:
    torch.set_num_threads(args.threads)
    batches = meta_batches(args.warmup + args.steps, args.tasks, seed=1)
    step, _ = build(variant, batches, args.tasks, args.inner_steps, args.inner_lr, args.meta_lr, torch.float32)
    before = _rss_mib()          # data and models built; no step taken yet
    for _ in range(args.warmup):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    wall, cpu = (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "wall_ms": 1000 * wall, "cpu_ms": 1000 * cpu, "peak_growth_mib": peak - before,
            "rss_before_mib": before}


def check(tasks: int = 4) -> None:
    """The variants give the same θ after one step (float64)."""
    batches = meta_batches(1, tasks, seed=2, dtype=torch.float64)
    out = {}
    for v in ("vectorized", "vectorized-reuse", "separate", "handwritten"):
        step, theta = build(v, batches, tasks, 2, 0.4, 1e-3, torch.float64)
        step()
        out[v] = theta
    for v in ("vectorized-reuse", "separate", "handwritten"):
        for k in out[v]:
            diff = float((out[v][k] - out["vectorized"][k]).detach().abs().max())
            assert diff < 1e-10, f"{v} differs from vectorized in {k}: {diff:.2e}"
    print(f"check: vectorized (with and without reuse), separate and hand-written steps agree in float64 "
          f"({tasks} tasks)", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--inner-lr", type=float, default=0.4)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="vectorized,vectorized-reuse,separate,separate-reuse,handwritten")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return 0
    if args.check:
        check()
    rows = []
    own = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--check"]
    for v in args.variants.split(","):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.maml_batched", *own, "--one", v],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next(r for r in rows if r["variant"] == "vectorized")
    print(f"{args.tasks} tasks, {WAYS}-way {SHOTS}-shot, {args.inner_steps} inner step(s), 4-layer conv net, "
          f"{args.threads} thread(s), {args.steps} timed steps")
    print("| variant | wall ms/step | CPU ms/step | peak growth MiB | CPU time / vectorized | memory / vectorized |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | {r['peak_growth_mib']:.1f} | "
              f"{r['cpu_ms'] / base['cpu_ms']:.2f} | "
              f"{r['peak_growth_mib'] / max(base['peak_growth_mib'], 1e-9):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
