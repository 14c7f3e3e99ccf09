"""Architecture-movement statistics, genotype agreement and its chance level, random cells."""
import math
import random

import numpy as np
import pytest
import torch

from applications.lease import arch_stats
from applications.lease.spaces import build_supernet
from applications.lease.spaces.genotype import DARTS_V1, DARTS_V2, PRIMITIVES

STEPS = 4
OPS = [list(PRIMITIVES)] * sum(n + 2 for n in range(STEPS))
SPACE = {"normal": OPS, "reduce": OPS}


def test_edge_stats_uniform_and_decided():
    k = len(PRIMITIVES)
    uniform = np.full((2, k), 1.0 / k)
    s = arch_stats.edge_stats(uniform, OPS[:2])
    assert s["mean_max_softmax"] == pytest.approx(1 / k)
    assert s["mean_entropy"] == pytest.approx(math.log(k), abs=1e-6)
    assert s["mean_margin"] == 0 and s["max_deviation_from_uniform"] == 0
    decided = np.full((1, k), 0.05)
    decided[0, PRIMITIVES.index("sep_conv_3x3")] = 0.45
    decided[0, PRIMITIVES.index("dil_conv_5x5")] = 0.2
    s = arch_stats.edge_stats(decided, OPS[:1])
    assert s["max_softmax"] == [0.45] and s["margin"] == [pytest.approx(0.25)]
    assert s["deviation_from_uniform"] == [pytest.approx(0.45 - 1 / k)]
    assert s["mean_entropy"] < math.log(k)


def test_margin_ignores_none_like_the_genotype():
    k = len(PRIMITIVES)
    p = np.full((1, k), 0.05)
    p[0, PRIMITIVES.index("none")] = 0.5
    p[0, PRIMITIVES.index("skip_connect")] = 0.2
    assert arch_stats.edge_stats(p, OPS[:1])["margin"] == [pytest.approx(0.15)]


def test_movement_reports_change_between_first_and_last():
    e, k = len(OPS), len(PRIMITIVES)
    first = np.full((e, k), 1.0 / k)
    last = first.copy()
    last[3] = 0.0
    last[3, 4] = 1.0
    m = arch_stats.movement({"normal": [first, last], "reduce": [first, first]}, SPACE)
    assert m["normal"]["moved"] == pytest.approx(1 - 1 / k)
    assert m["reduce"]["moved"] == 0
    assert m["moved"] == pytest.approx(1 - 1 / k)
    assert m["max_deviation_from_uniform"] == pytest.approx(1 - 1 / k)
    row = arch_stats.headline(m)
    assert row["arch/reduce_max_deviation"] == 0 and row["arch/normal_max_deviation"] > 0.8


def test_agreement_identity_and_disjoint():
    assert arch_stats.genotype_agreement(DARTS_V2, DARTS_V2) == {"edges": 1.0, "inputs": 1.0}
    a = arch_stats.genotype_agreement(DARTS_V1, DARTS_V2)
    assert 0 < a["edges"] < a["inputs"] <= 1


def test_chance_agreement_matches_sampling():
    exact = arch_stats.chance_agreement(SPACE, STEPS)
    # node n has n + 2 inputs, 2 chosen: sum_j (2/n)^2 = 4/n per node, over 8 edges; ops match 1 in 7
    inputs = sum(4 / (n + 2) for n in range(STEPS)) / 8
    assert exact["inputs"] == pytest.approx(inputs)
    assert exact["edges"] == pytest.approx(inputs / 7)
    rng = random.Random(0)
    draws = [arch_stats.genotype_agreement(arch_stats.random_genotype(SPACE, STEPS, rng),
                                           arch_stats.random_genotype(SPACE, STEPS, rng)) for _ in range(4000)]
    assert np.mean([d["edges"] for d in draws]) == pytest.approx(exact["edges"], abs=0.01)
    assert np.mean([d["inputs"] for d in draws]) == pytest.approx(exact["inputs"], abs=0.01)


def test_random_genotype_is_a_valid_cell_and_uses_every_op():
    rng = random.Random(1)
    seen = set()
    for _ in range(50):
        g = arch_stats.random_genotype(SPACE, STEPS, rng)
        for cell in (g.normal, g.reduce):
            assert len(cell) == 2 * STEPS
            for i in range(STEPS):
                (op_a, a), (op_b, b) = cell[2 * i], cell[2 * i + 1]
                assert a != b and 0 <= a < i + 2 and 0 <= b < i + 2
                seen.update((op_a, op_b))
    assert seen == set(PRIMITIVES) - {"none"}


def test_op_share_and_mass():
    assert arch_stats.op_share(DARTS_V2, ["sep_conv_3x3"]) == pytest.approx(
        sum(op == "sep_conv_3x3" for op, _ in DARTS_V2.normal + DARTS_V2.reduce) / 16)
    k = len(PRIMITIVES)
    assert arch_stats.op_mass(np.full((len(OPS), k), 1.0 / k), OPS, ["sep_conv_5x5", "dil_conv_3x3"]) == \
        pytest.approx(2 / k)


def test_reseed_alphas_changes_only_the_alphas_and_is_reproducible():
    torch.manual_seed(0)
    model = build_supernet("darts", 2, 10, 3, in_channels=1, steps=2, multiplier=2)
    weights = [p.clone() for p in model.weight_parameters()]
    arch_stats.reseed_alphas(model, 5)
    a5 = [p.detach().clone() for p in model.arch_parameters()]
    arch_stats.reseed_alphas(model, 6)
    assert not torch.equal(a5[0], model.arch_parameters()[0])
    arch_stats.reseed_alphas(model, 5)
    assert all(torch.equal(x, y) for x, y in zip(a5, model.arch_parameters()))
    assert all(torch.equal(x, y) for x, y in zip(weights, model.weight_parameters()))
    assert float(a5[0].abs().max()) < 1e-2


@pytest.mark.slow
def test_default_preset_moves_the_architecture(tmp_path):
    """The default search must learn α: a change that silently stops it (learning rate, warm-up, a cut
    hypergradient) fails here. The default preset, only shortened to 3 epochs × 2 steps (2 weights-only,
    then 4 architecture steps): measured max |softmax - 1/8| 0.078 and mean largest weight 0.170 / 0.179
    (normal / reduce; uniform 0.125) on digits; an architecture lr of 3e-3 moved it by 0.0028 in 72 steps.
    Thresholds 0.02 and 0.14, about a third of the measured movement."""
    import json
    import os

    from tests.subproc import run_module

    out = str(tmp_path / "run")
    run_module("applications.lease.search", ["--out", out, "--device", "cpu", "--set", "epochs=3",
                                             "--set", "max_steps_per_epoch=2"])
    arch = json.load(open(os.path.join(out, "result.json")))["architecture"]
    assert arch["max_deviation_from_uniform"] > 0.02, arch
    assert arch["normal"]["mean_max_softmax"] > 0.14 and arch["reduce"]["mean_max_softmax"] > 0.14, arch
