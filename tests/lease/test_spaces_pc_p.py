"""PC-DARTS (partial channels, edge normalization) and P-DARTS (progressive stages)."""

import math

import pytest
import torch

from applications.common.config import ConfigError
from applications.lease.spaces import PRIMITIVES, PDartsSchedule, build_stage, build_supernet, final_genotype, next_stage_ops
from applications.lease.spaces.darts import MixedOp
from applications.lease.spaces.pcdarts import PartialMixedOp, channel_shuffle, edge_normalization


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread (and do not stall when the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- PC-DARTS


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_edge_normalization_is_a_softmax_per_node():
    beta = torch.randn(14)
    w = edge_normalization(beta, 4)
    sums = [float(part.sum()) for part in torch.split(w, [2, 3, 4, 5])]
    assert sums == pytest.approx([1.0] * 4)
    assert torch.allclose(w[2:5], torch.softmax(beta[2:5], 0))


def test_partial_op_searches_only_a_slice():
    torch.manual_seed(0)
    op = PartialMixedOp(8, 1, PRIMITIVES, k=4)
    assert op.inner.ops[4][0].in_channels == 2  # sep_conv_3x3 sees C / K channels
    x = torch.randn(2, 8, 4, 4)
    out = op(x, x.relu(), torch.softmax(torch.zeros(8), 0))
    assert out.shape == x.shape
    # the 6 bypassed channels come through untouched, at shuffled positions
    bypass = x[:, 2:]
    shuffled_back = out.view(2, 2, 4, 4, 4).transpose(1, 2).reshape(2, 8, 4, 4)
    assert torch.equal(shuffled_back[:, 2:], bypass)
    reduce = PartialMixedOp(8, 2, PRIMITIVES, k=4)
    assert reduce(x, x.relu(), torch.softmax(torch.zeros(8), 0)).shape == (2, 8, 2, 2)


def test_pcdarts_supernet_has_betas_and_trains_them():
    torch.manual_seed(0)
    model = build_supernet("pcdarts", C=8, num_classes=10, layers=3, in_channels=1)
    names = [n for n, _ in model.named_arch_parameters()]
    assert names == ["arch.normal", "arch.reduce", "arch.normal_beta", "arch.reduce_beta"]
    assert model.arch.normal_beta.shape == (14,)
    model(torch.randn(4, 1, 8, 8)).logsumexp(1).sum().backward()
    assert model.arch.normal_beta.grad.abs().sum() > 0 and model.arch.reduce_beta.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible"):
        build_supernet("pcdarts", C=6, num_classes=10, layers=3, k=4)


def test_pcdarts_genotype_uses_beta():
    torch.manual_seed(0)
    model = build_supernet("pcdarts", C=4, num_classes=10, layers=3, in_channels=1)
    a = torch.zeros(14, 8)
    a[0, PRIMITIVES.index("sep_conv_3x3")] = 3.0  # node 0: edge 0 has the stronger op ...
    a[1, PRIMITIVES.index("skip_connect")] = 2.0
    a[2, PRIMITIVES.index("max_pool_3x3")] = 1.0  # node 1: edges 2, 3, 4
    a[3, PRIMITIVES.index("avg_pool_3x3")] = 1.0
    a[4, PRIMITIVES.index("dil_conv_3x3")] = 1.0
    beta = torch.zeros(14)
    beta[2] = -5.0  # ... but beta makes node 1 drop its edge from input 0
    with torch.no_grad():
        model.arch.normal.copy_(a)
        model.arch.normal_beta.copy_(beta)
    g = model.genotype()
    assert g.normal[:2] == [("sep_conv_3x3", 0), ("skip_connect", 1)]
    assert sorted(g.normal[2:4]) == [("avg_pool_3x3", 1), ("dil_conv_3x3", 2)]


# ----------------------------------------------------------------------------- P-DARTS


def test_schedule_defaults_and_drop_rate():
    s = PDartsSchedule()
    s.validate()
    assert s.cells == [5, 11, 17] and s.ops_kept == [8, 5, 3, 1] and s.dropout == [0.1, 0.4, 0.7]
    assert s.warmup_epochs == 10 and s.max_skip == 2
    assert s.drop_rate(1, 0) == pytest.approx(0.4 * 24 / 25)
    assert s.drop_rate(2, 10) == pytest.approx(0.7)
    assert s.drop_rate(2, 15) == pytest.approx(0.7 * math.exp(-1.0))
    with pytest.raises(ConfigError, match="ops_kept"):
        PDartsSchedule(ops_kept=[8, 5, 3]).validate()


def test_stage_ops_shrink_by_alpha():
    torch.manual_seed(0)
    sched = PDartsSchedule(cells=[2, 3, 3])
    model = build_stage(sched, 0, C=4, num_classes=10, in_channels=1)
    assert model.layers == 2 and model.arch.normal.shape == (14, 8)
    ranking = ["sep_conv_5x5", "none", "skip_connect", "dil_conv_3x3", "max_pool_3x3"]
    a = torch.zeros(14, 8)
    for r, op in enumerate(ranking):
        a[:, PRIMITIVES.index(op)] = 5.0 - r
    with torch.no_grad():
        model.arch.normal.copy_(a)
        model.arch.reduce.copy_(a)
    normal, reduce = next_stage_ops(model, 5)
    assert normal[0] == ["none", "max_pool_3x3", "skip_connect", "sep_conv_5x5", "dil_conv_3x3"]  # PRIMITIVES order
    stage1 = build_stage(sched, 1, C=4, num_classes=10, normal_ops=normal, reduce_ops=reduce, in_channels=1)
    assert stage1.layers == 3 and stage1.arch.normal.shape == (14, 5)
    assert stage1(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with torch.no_grad():
        stage1.arch.normal.copy_(torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0]).expand(14, 5))
    last, _ = next_stage_ops(stage1, 1)
    assert last[0] == ["skip_connect"]  # `none` is excluded at the final cut
    assert next_stage_ops(stage1, 1, exclude_none=False)[0][0] == ["none"]


def test_final_genotype_limits_skip_connections():
    torch.manual_seed(0)
    ops = [["skip_connect", "sep_conv_3x3", "none"]] * 14
    model = build_supernet("pdarts", C=4, num_classes=10, layers=3, in_channels=1, normal_ops=ops, reduce_ops=ops)
    a = torch.zeros(14, 3)
    a[:, 0] = torch.linspace(3.0, 4.3, 14)  # skip wins everywhere, with different margins
    with torch.no_grad():
        model.arch.normal.copy_(a)
        model.arch.reduce.copy_(a)
    plain = model.genotype()
    assert sum(op == "skip_connect" for op, _ in plain.normal) == 8
    g = final_genotype(model, max_skip=2)
    assert [idx for _, idx in g.normal] == [idx for _, idx in plain.normal]  # same edges, ops replaced
    kept = [pos for pos, (op, _) in enumerate(g.normal) if op == "skip_connect"]
    assert len(kept) == 2
    assert all(op in ("skip_connect", "sep_conv_3x3") for op, _ in g.normal)
    assert sum(op == "skip_connect" for op, _ in g.reduce) == 8  # the limit applies to the normal cell only
    # the skips kept are the strongest ones (the last node's edges have the largest alphas)
    assert kept == [6, 7]


def test_skip_dropout_only_in_training():
    torch.manual_seed(0)
    model = build_supernet("pdarts", C=4, num_classes=10, layers=3, in_channels=1, drop_rate=0.3)
    assert all(e.drop_rate == 0.3 for c in model.cells for e in c.edges)
    model.set_drop_rate(0.0)
    assert all(e.drop_rate == 0.0 for c in model.cells for e in c.edges)
    op = MixedOp(4, 1, ["skip_connect"])
    op.drop_rate = 0.5
    x = torch.ones(1, 4, 8, 8)
    w = torch.ones(1)
    assert (op(x, x, w) == 0).any()
    op.eval()
    assert torch.equal(op(x, x, w), x)
    with pytest.raises(ValueError, match="drop rate"):
        model.set_drop_rate(1.0)
