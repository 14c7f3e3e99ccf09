"""What applications use of a Runner and its checkpoints, on the public API only."""
import os
import random

import numpy as np
import pytest
import torch

import mlo


def _graph(nan_at=None):
    torch.manual_seed(0)
    w = torch.zeros(3, requires_grad=True)
    theta = torch.tensor(0.5, requires_grad=True)
    X, y = torch.randn(8, 3), torch.randn(8)

    def inner(ctx, batch):
        return ((X @ ctx["inner"] - y) ** 2).mean() + ctx["outer"].exp() * (ctx["inner"] ** 2).sum()

    def outer(ctx, batch):
        loss = ((X @ ctx["inner"] - y) ** 2).mean()
        return loss * float("nan") if nan_at is not None and ctx.step in nan_at else loss

    return mlo.Graph([mlo.Problem("inner", w, inner, lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"]),
                      mlo.Problem("outer", theta, outer, lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])])


def test_a_bad_log_every_is_an_mlo_config_error():
    with pytest.raises(mlo.ConfigError, match="log_every: expected an integer >= 1, got 0"):
        mlo.Runner(_graph(), log_every=0)


def test_last_saved_step_and_extra_state(tmp_path):
    ckpt = tmp_path / "c.pt"
    runner = mlo.Runner(_graph(), progress=False, checkpoint=ckpt, checkpoint_every=2,
                        extra_state=lambda: {"stage": 1})
    assert runner.last_saved_step is None
    runner.run(3)
    assert runner.last_saved_step == 3            # the final save
    saved = mlo.read_checkpoint(ckpt)
    assert (saved.step, saved.extra, saved.path, saved.fallback_reason) == (3, {"stage": 1}, str(ckpt), None)
    other = mlo.Runner(_graph(), progress=False)
    other.restore(saved)
    assert other.step == 3 and other.last_saved_step == 3


def test_skip_counts_are_read_only_and_restored(tmp_path):
    ckpt = tmp_path / "c.pt"
    runner = mlo.Runner(_graph(nan_at={0, 1}), progress=False, nan_policy="skip", checkpoint=ckpt)
    runner.run(3)
    counts = runner.skip_counts
    assert counts == {"outer": 2}
    counts["outer"] = 99                          # a copy: the runner's count does not change
    assert runner.skip_counts == {"outer": 2}
    assert mlo.read_checkpoint(ckpt).skip_counts == {"outer": 2}
    again = mlo.Runner(_graph(), progress=False)
    again.resume(ckpt)
    assert again.skip_counts == {"outer": 2}
    again.reset_skip_counts()
    assert again.skip_counts == {}


def test_read_checkpoint_falls_back_and_sets_the_damaged_file_aside(tmp_path):
    ckpt = tmp_path / "c.pt"
    assert not mlo.has_checkpoint(ckpt)
    runner = mlo.Runner(_graph(), progress=False, checkpoint=ckpt, checkpoint_every=1)
    runner.run(2)
    assert mlo.has_checkpoint(ckpt)
    ckpt.write_bytes(b"truncated")
    saved = mlo.read_checkpoint(ckpt)
    assert saved.step == 1 and saved.path == str(ckpt) + ".prev" and saved.fallback_reason
    assert ckpt.exists()                                  # reading alone changes nothing
    saved = mlo.read_checkpoint(ckpt, set_aside_damaged=True)
    assert not ckpt.exists() and (tmp_path / "c.pt.damaged").read_bytes() == b"truncated"
    assert mlo.has_checkpoint(ckpt)                       # the backup is still there
    os.unlink(str(ckpt) + ".prev")
    with pytest.raises(mlo.CheckpointError, match="no readable checkpoint"):
        mlo.read_checkpoint(ckpt)


def test_read_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    mlo.save_checkpoint({"weights": torch.zeros(2)}, path)
    with pytest.raises(mlo.CheckpointError, match="not a checkpoint written by mlo.Runner"):
        mlo.read_checkpoint(path)


def test_loading_graph_state_leaves_global_rng_alone_unless_asked():
    graph = _graph()
    state = mlo.graph_state_dict(graph)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    mlo.load_graph_state_dict(graph, state)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    mlo.load_graph_state_dict(graph, state, rng_state=True)
    assert not torch.equal(torch.get_rng_state(), before[0])


def _draw():
    return torch.rand(1).item(), float(np.random.rand()), random.random()


def test_submodules_are_exported_and_rng_preserved_restores_every_stream():
    assert mlo.distributed.ShardedSampler and mlo.precision.Autocast and mlo.rng.capture_all
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = _draw()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with mlo.rng.preserved():
        _draw(), _draw()
    assert _draw() == expected
