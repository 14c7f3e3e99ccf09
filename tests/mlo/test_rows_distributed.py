"""A row-sparse table under ``mlo.distributed.DataParallel`` (two gloo processes, torchrun): its
rows are all-gathered and summed per row — a row drawn on both processes included — and the run
equals one process with the whole batch (first order, float64, 1e-12) and the dense declaration
with ``DataParallel(rows=...)`` (any engine)."""
import os
import subprocess
import sys

import pytest
import torch

import mlo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DT = torch.float64
N, D = 10, 3
_g = torch.Generator().manual_seed(0)
X, Y = torch.randn(N, D, generator=_g, dtype=DT), torch.randn(N, generator=_g, dtype=DT)
FULL = [torch.tensor([1, 3, 3, 7, 3, 2]), torch.tensor([0, 9, 9, 4, 5, 0])]   # row 3 / 9 on both processes


def build(batches, sparse: bool, second_order: bool, momentum: float = 0.0):
    """T (table, summed loss, reads w as a value) -> w (mean loss on T's rows, reads T's solution).
    (Momentum only for row-sparse runs: dense momentum also moves the rows a step does not visit.)"""
    g = torch.Generator().manual_seed(1)
    T = (0.1 * torch.randn(N, D, generator=g, dtype=DT)).requires_grad_()
    w = torch.randn(D, generator=g, dtype=DT).requires_grad_()

    def t_loss(ctx, b):
        i = b[0]
        return (((X[i] + ctx["T"][i]) @ ctx["w"] - Y[i]) ** 2).sum()

    def w_loss(ctx, b):
        i = b[0]
        return (((X[i] * ctx["T"][i]) @ ctx["w"] - Y[i]) ** 2).mean() + 0.1 * (ctx["w"] ** 2).sum()

    return mlo.Graph([
        mlo.Problem("T", T, t_loss, lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum), data=[(b,) for b in batches],
                    reads=["w"], engine=mlo.Unrolled() if second_order else mlo.FirstOrder(),
                    rows=(lambda b: b[0]) if sparse else None),
        mlo.Problem("w", w, w_loss, lambda p: torch.optim.SGD(p, lr=0.1), data=mlo.SameBatch("T"), reads=["T"])])


def params(graph):
    return {f"{n}/{k}": v.detach().clone() for n, p in graph.problems.items() for k, v in p.params_tree.items()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("rows_ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "mlo", "rows_ddp_worker.py"), str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)]


def test_two_processes_equal_one_with_the_whole_batch(ranks):
    """First order, lazy momentum on the table: the per-row sums are the whole batch's gradient."""
    torch.set_num_threads(1)
    graph = build(FULL, sparse=True, second_order=False, momentum=0.5)
    stepper = mlo.Stepper(graph)
    for _ in range(len(FULL)):
        stepper.step()
    ref = params(graph)
    for r in ranks:
        for k in ref:
            err = float((r["momentum"][k] - ref[k]).abs().max())
            assert err <= 1e-12, (k, err)


@pytest.mark.parametrize("second_order", [False, True])
def test_row_sparse_equals_dense_with_rows_mapping_and_replicas_agree(ranks, second_order):
    r0, r1 = ranks
    sparse, dense = r0[(second_order, True)], r0[(second_order, False)]
    for k in dense:
        assert torch.equal(r0[(second_order, True)][k], r1[(second_order, True)][k]), k
        err = float((sparse[k] - dense[k]).abs().max())
        assert err <= 1e-12, (k, err)
    # the table: one all-gather of counts and one of rows per update, as the dense row gather
    assert r0[("collectives", second_order, True)] == {"T": 2 * len(FULL), "w": len(FULL)}
