"""Checkpoint mid-run, resume in a new process: bit-identical to an uninterrupted run.
Damaged checkpoints fall back to ``<path>.prev``."""
import copy
import importlib.util
import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import mlo

SCRIPT = textwrap.dedent('''
    """Small bilevel run: shuffled DataLoaders, SGD momentum, LR schedulers, dropout noise."""
    import sys

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import mlo

    torch.set_num_threads(1)
    F64 = torch.float64


    def build():
        torch.manual_seed(0)
        X = torch.randn(40, 3, dtype=F64)
        y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.1 * torch.randn(40, dtype=F64)
        Xv = torch.randn(30, 3, dtype=F64)
        yv = Xv @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)
        train = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)   # 5 batches / epoch
        val = DataLoader(TensorDataset(Xv, yv), batch_size=6, shuffle=True)   # 5 batches / epoch
        w = torch.zeros(3, dtype=F64, requires_grad=True)
        theta = torch.tensor(-1.0, dtype=F64, requires_grad=True)

        def inner_obj(ctx, batch):
            x, t = batch
            r = torch.nn.functional.dropout(x @ ctx["inner"] - t, 0.2, training=True)
            return (r ** 2).mean() + torch.exp(ctx["outer"]) * (ctx["inner"] ** 2).sum()

        def outer_obj(ctx, batch):
            x, t = batch
            return ((x @ ctx["inner"] - t) ** 2).mean()

        step_lr = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7)
        inner = mlo.Problem("inner", w, inner_obj, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                            data=train, reads=["outer"], steps=2, scheduler=step_lr)
        outer = mlo.Problem("outer", theta, outer_obj, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5),
                            data=val, reads=["inner"], scheduler=step_lr)
        return mlo.Graph([inner, outer])


    def params(graph):
        return {n: {k: v.detach().clone() for k, v in p.params_tree.items()} for n, p in graph.problems.items()}


    if __name__ == "__main__":
        mode, ckpt, out, steps = sys.argv[1:]
        graph = build()
        runner = mlo.Runner(graph, progress=False, checkpoint=ckpt)
        if mode == "resume":
            runner.resume()
        start = runner.step
        runner.run(until=int(steps))
        torch.save({"params": params(graph), "step": runner.step, "start": start}, out)
''')

TOTAL, CUT = 8, 3


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "run_small.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("run_small", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return path, mod


def _assert_same(a, b):
    assert a and a.keys() == b.keys()
    for n in a:
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), (n, k, a[n][k], b[n][k])


def test_resume_in_a_new_process_is_bit_identical(script, tmp_path):
    path, mod = script
    # uninterrupted run (in this process)
    graph = mod.build()
    mlo.Runner(graph, progress=False).run(TOTAL)
    full = mod.params(graph)
    # first part, checkpointed mid-epoch (in this process)
    ckpt = tmp_path / "ckpt" / "run.pt"
    graph = mod.build()
    mlo.Runner(graph, progress=False, checkpoint=ckpt, checkpoint_every=2).run(CUT)
    assert ckpt.exists() and os.path.exists(str(ckpt) + ".prev")
    part = mod.params(graph)
    assert not torch.equal(part["inner"][""], full["inner"][""])
    # second part in a new process
    out = tmp_path / "resumed.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, str(path), "resume", str(ckpt), str(out), str(TOTAL)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resumed = torch.load(out, weights_only=True)
    assert resumed["start"] == CUT and resumed["step"] == TOTAL     # it continued; it did not start over
    _assert_same(full, resumed["params"])


def test_resume_in_process_is_bit_identical(script, tmp_path):
    _, mod = script
    graph = mod.build()
    mlo.Runner(graph, progress=False).run(TOTAL)
    full = mod.params(graph)
    ckpt = tmp_path / "run.pt"
    mlo.Runner(mod.build(), progress=False, checkpoint=ckpt).run(CUT)
    graph = mod.build()
    runner = mlo.Runner(graph, progress=False)
    runner.resume(ckpt)
    assert runner.step == CUT
    runner.run(until=TOTAL)
    _assert_same(full, mod.params(graph))


def test_state_dict_is_a_snapshot(script):
    """Taking ``state_dict()`` and training on must not change what was taken."""
    _, mod = script
    graph = mod.build()
    runner = mlo.Runner(graph, progress=False)
    runner.run(CUT)
    taken = runner.state_dict()
    frozen = torch.load(_roundtrip(taken), weights_only=True)  # an independent copy, made now
    runner.run(until=TOTAL)
    full = mod.params(graph)
    buf_taken = taken["graph"]["problems"]["inner"]["optimizer"]["state"][0]["momentum_buffer"]
    buf_frozen = frozen["graph"]["problems"]["inner"]["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf_taken, buf_frozen), "state_dict() aliases live optimizer state"
    graph2 = mod.build()
    runner2 = mlo.Runner(graph2, progress=False)
    runner2.load_state_dict(taken)
    runner2.run(until=TOTAL)
    _assert_same(full, mod.params(graph2))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_corrupted_checkpoint_falls_back_to_prev(script, tmp_path):
    _, mod = script
    graph = mod.build()
    seen = {}
    ckpt = tmp_path / "c.pt"
    runner = mlo.Runner(graph, progress=False, checkpoint=ckpt,
                        callbacks=[lambda step, row: seen.__setitem__(step, mod.params(graph))])
    runner.run(1)  # writes c.pt (step 1) at the end
    runner.run(1)  # c.pt (step 2), c.pt.prev (step 1)
    assert torch.load(str(ckpt) + ".prev", weights_only=True)["step"] == 1
    # damage c.pt
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="previous"):
        state = mlo.load_checkpoint(ckpt)
    assert state["step"] == 1
    graph2 = mod.build()
    r2 = mlo.Runner(graph2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r2.resume(ckpt)
    assert r2.step == 1
    _assert_same(seen[1], mod.params(graph2))
    # both damaged: a clear error naming both files
    prev = tmp_path / "c.pt.prev"
    prev.write_bytes(b"not a checkpoint")
    with pytest.raises(mlo.MLOError, match="no readable checkpoint") as e:
        mlo.load_checkpoint(ckpt)
    assert "c.pt.prev" in str(e.value)


def test_checkpoint_does_not_match_graph(script, tmp_path):
    _, mod = script
    ckpt = tmp_path / "c.pt"
    mlo.Runner(mod.build(), progress=False, checkpoint=ckpt).run(1)
    w = torch.zeros(2, requires_grad=True)
    other = mlo.Graph([mlo.Problem("solo", w, lambda c, b: (c["solo"] ** 2).sum(),
                                   lambda p: torch.optim.SGD(p, lr=0.1))])
    with pytest.raises(mlo.MLOError, match="does not match"):
        mlo.Runner(other, progress=False).resume(ckpt)


def test_save_is_atomic_and_keeps_prev(tmp_path):
    p = tmp_path / "x.pt"
    mlo.save_checkpoint({"a": torch.tensor(1)}, p)
    mlo.save_checkpoint({"a": torch.tensor(2)}, p)
    assert torch.load(p, weights_only=True)["a"].item() == 2
    assert torch.load(str(p) + ".prev", weights_only=True)["a"].item() == 1
    assert sorted(os.listdir(tmp_path)) == ["x.pt", "x.pt.prev"]  # no temp files left
    assert copy.deepcopy(mlo.load_checkpoint(p))["a"].item() == 2


def test_temporaries_of_a_killed_writer_are_found_and_removed_by_the_next_save(tmp_path):
    p = tmp_path / "x.pt"
    mlo.save_checkpoint({"a": torch.tensor(1)}, p)
    dead = [tmp_path / ".x.pt.k3j9.tmp", tmp_path / "x.pt.prev.tmp"]   # what a SIGKILL mid-save leaves
    for f in dead:
        f.write_bytes(b"partial")
    (tmp_path / ".y.pt.abcd.tmp").write_bytes(b"another checkpoint's")
    assert mlo.checkpoint.temporary_files(p) == sorted(str(f) for f in dead)
    mlo.save_checkpoint({"a": torch.tensor(2)}, p)
    assert mlo.checkpoint.temporary_files(p) == []
    assert sorted(os.listdir(tmp_path)) == [".y.pt.abcd.tmp", "x.pt", "x.pt.prev"]
