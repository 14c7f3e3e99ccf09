"""DARTS supernet: parameter count, arch/weight split, gradients, genotype derivation."""

import json

import pytest
import torch
from torch.func import functional_call

from applications.lease.spaces import (
    DARTS_V2,
    P_DARTS,
    PRIMITIVES,
    build_supernet,
    genotype_from_json,
    genotype_to_json,
    get_genotype,
    save_genotype,
)
from applications.lease.spaces.genotype import derive_cell


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread (and do not stall when the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(space="darts", **kw):
    torch.manual_seed(0)
    return build_supernet(space, C=4, num_classes=10, layers=3, in_channels=1, **kw)


def test_default_supernet_parameter_count():
    model = build_supernet("darts", C=16, num_classes=10, layers=8)
    assert sum(p.numel() for p in model.weight_parameters()) == 1_930_618
    assert model.reductions == [2, 5]


def test_arch_parameters_are_separate_and_named():
    model = _tiny()
    names = [n for n, _ in model.named_arch_parameters()]
    assert names == ["arch.normal", "arch.reduce"]
    assert model.arch.normal.shape == (14, 8) and model.arch.reduce.shape == (14, 8)
    assert model.arch.normal.abs().max() < 0.01  # 1e-3 * randn
    all_names = {n for n, _ in model.named_parameters()}
    weight_names = {n for n, _ in model.named_weight_parameters()}
    assert weight_names == all_names - set(names)
    assert not any(n.startswith("arch.") for n in weight_names)
    for p in model.modules():
        if isinstance(p, torch.nn.BatchNorm2d) and p is not model.stem[1]:
            assert not p.affine  # search-time BN has no affine parameters


def test_digits_forward_backward_reaches_alphas_and_weights():
    model = _tiny()
    x = torch.randn(4, 1, 8, 8)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.logsumexp(1).sum().backward()
    assert model.arch.normal.grad.abs().sum() > 0 and model.arch.reduce.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.weight_parameters())


def test_functional_call_with_replacement_alphas_and_second_order():
    model = _tiny()
    x = torch.randn(2, 1, 8, 8)
    base = model(x)
    alphas = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_arch_parameters()}
    alphas["arch.normal"] = alphas["arch.normal"] + torch.zeros(14, 8).index_fill_(1, torch.tensor([3]), 5.0)
    out = functional_call(model, alphas, (x,))
    assert not torch.allclose(out, base)
    # a second derivative through the weights' gradient reaches the alphas
    w = dict(model.named_weight_parameters())["classifier.weight"]
    loss = functional_call(model, alphas, (x,)).pow(2).mean()
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (ga,) = torch.autograd.grad(g.pow(2).sum(), alphas["arch.reduce"])
    assert ga.abs().sum() > 0


def _hand_set(model, winners):
    """Alphas where edge e has logit `strength` on op `op` and 0 elsewhere."""
    a = torch.zeros(14, 8)
    for e, (op, strength) in enumerate(winners):
        a[e, PRIMITIVES.index(op)] = strength
    with torch.no_grad():
        model.arch.normal.copy_(a)
        model.arch.reduce.copy_(a.flip(0))


def test_genotype_picks_top2_non_none_edges():
    model = _tiny()
    # edges: node0 {0,1}, node1 {2,3,4}, node2 {5..8}, node3 {9..13}
    winners = [("sep_conv_3x3", 2.0), ("max_pool_3x3", 1.0),
               ("skip_connect", 0.5), ("dil_conv_3x3", 3.0), ("sep_conv_5x5", 2.5),
               ("none", 9.0), ("avg_pool_3x3", 1.0), ("dil_conv_5x5", 4.0), ("sep_conv_3x3", 0.1),
               ("skip_connect", 0.2), ("sep_conv_3x3", 0.3), ("max_pool_3x3", 0.1), ("dil_conv_3x3", 6.0), ("sep_conv_5x5", 5.0)]
    _hand_set(model, winners)
    g = model.genotype()
    assert g.normal == [("sep_conv_3x3", 0), ("max_pool_3x3", 1),
                        ("dil_conv_3x3", 1), ("sep_conv_5x5", 2),
                        ("dil_conv_5x5", 2), ("avg_pool_3x3", 1),
                        ("dil_conv_3x3", 3), ("sep_conv_5x5", 4)]
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce_concat == [2, 3, 4, 5]


def test_derive_cell_excludes_none_even_when_dominant():
    probs = torch.full((2, 8), 0.01)
    probs[:, 0] = 0.9  # none dominates both edges
    probs[0, PRIMITIVES.index("skip_connect")] = 0.05
    probs[1, PRIMITIVES.index("sep_conv_3x3")] = 0.06
    assert derive_cell(probs, [PRIMITIVES] * 2, steps=1) == [("sep_conv_3x3", 1), ("skip_connect", 0)]


def test_genotype_json_roundtrip_and_lookup(tmp_path):
    assert genotype_from_json(json.loads(json.dumps(genotype_to_json(DARTS_V2)))) == DARTS_V2
    assert get_genotype("darts_v2") is DARTS_V2 and get_genotype("P-DARTS") is P_DARTS
    path = tmp_path / "g.json"
    save_genotype(P_DARTS, path)
    assert get_genotype(str(path)) == P_DARTS
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"genotype": genotype_to_json(DARTS_V2), "epoch": 3}))
    assert get_genotype(str(wrapped)) == DARTS_V2
    with pytest.raises(ValueError, match="unknown genotype"):
        get_genotype("NOT_A_GENOTYPE")
    bad = genotype_to_json(DARTS_V2)
    bad["normal"][0] = ["conv_9x9", 0]
    with pytest.raises(ValueError, match="unknown op"):
        genotype_from_json(bad)


def test_configurable_nodes_and_reductions():
    torch.manual_seed(0)
    model = build_supernet("darts", C=4, num_classes=3, layers=2, in_channels=1, steps=3, multiplier=2, reductions=[1])
    assert model.arch.normal.shape == (9, 8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    g = model.genotype()
    assert len(g.normal) == 6 and g.normal_concat == [3, 4]
    with pytest.raises(ValueError, match="unknown search space"):
        build_supernet("enas", 4, 10, 3)
