"""Audience ResNets and evaluation networks."""

import pytest
import torch

from applications.lease.models import build_audience, build_eval_net, count_parameters, resnet18, resnet50
from applications.lease.spaces import DARTS_V2, PC_DARTS, P_DARTS


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread (and do not stall when the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet_parameter_counts():
    assert _count(resnet18(num_classes=10)) == 11_173_962
    assert _count(resnet50(num_classes=10)) == 23_520_842
    assert _count(resnet18(num_classes=10, width=0.25)) == 701_466


def test_resnet_any_channels_and_classes():
    model = build_audience("ResNet-18", num_classes=7, in_channels=1, width=0.125)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 8
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    small50 = build_audience("resnet50", num_classes=3, in_channels=3, width=0.0625)
    assert small50(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown audience"):
        build_audience("vgg16", 10)


def test_eval_net_parameter_counts():
    darts = build_eval_net(DARTS_V2, C=36, num_classes=10, layers=20, auxiliary=True)
    assert count_parameters(darts) == 3_349_342  # "3.3M" in the DARTS paper
    assert count_parameters(darts, include_auxiliary=True) > count_parameters(darts)
    no_aux = build_eval_net(DARTS_V2, C=36, num_classes=10, layers=20, auxiliary=False)
    assert _count(no_aux) == 3_349_342
    assert 3.5e6 < count_parameters(build_eval_net(PC_DARTS, 36, 10, 20, True)) < 3.7e6  # 3.6M published
    assert 3.3e6 < count_parameters(build_eval_net(P_DARTS, 36, 10, 20, True)) < 3.5e6  # 3.4M published


def test_eval_net_digits_forward_with_aux_and_drop_path():
    torch.manual_seed(0)
    model = build_eval_net(DARTS_V2, C=4, num_classes=10, layers=3, auxiliary=True, in_channels=1)
    model.drop_path_prob = 0.5
    x = torch.randn(4, 1, 8, 8)
    model.train()
    logits, aux = model(x)
    assert logits.shape == (4, 10) and aux.shape == (4, 10)
    (logits.sum() + aux.sum()).backward()
    model.eval()
    out1, aux_eval = model(x)
    out2, _ = model(x)
    assert aux_eval is None and torch.equal(out1, out2)  # no drop path at eval time


def test_imagenet_eval_net_small_input():
    torch.manual_seed(0)
    model = build_eval_net(DARTS_V2, C=8, num_classes=5, layers=3, auxiliary=True, imagenet=True)
    model.train()
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5) and aux.shape == (2, 5)
    assert model.stem0[0].stride == (2, 2) and model.stem1[1].stride == (2, 2)
