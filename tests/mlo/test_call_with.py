"""``mlo.context.call_with`` (how ``ctx.forward`` substitutes parameters) against
``torch.func.functional_call``: same outputs and gradients, originals restored (also on error),
tied weights, and a module whose structure changed since the first call."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from mlo.context import call_with


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight          # tied

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _values(module):
    return {q: (t.detach() + 0.1).requires_grad_(True) for q, t in module.named_parameters(remove_duplicate=False)}


def test_same_output_and_gradients_as_functional_call():
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(6, 4)
    vals = _values(m)
    leaves = [dict(m.named_parameters())[q] for q in vals]
    got = call_with(m, vals, leaves, (x,), {})
    want = functional_call(m, vals, (x,), strict=False)
    assert torch.equal(got, want)
    g1 = torch.autograd.grad(got.sum(), list(vals.values()))
    g2 = torch.autograd.grad(want.sum(), list(vals.values()))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(isinstance(p, nn.Parameter) for p in m.parameters())      # originals back
    assert [id(p) for p in m.parameters()] == [id(t) for t in leaves]


def test_tied_weights_are_replaced_under_each_name():
    torch.manual_seed(0)
    m, x = Tied(), torch.randn(2, 3)
    vals = _values(m)
    vals["b.weight"] = vals["a.weight"]
    leaves = [dict(m.named_parameters(remove_duplicate=False))[q] for q in vals]
    assert torch.equal(call_with(m, vals, leaves, (x,), {}), functional_call(m, vals, (x,), strict=False))
    assert m.b.weight is m.a.weight


def test_originals_restored_when_the_call_raises():
    m = nn.Linear(2, 2)
    before = list(m.parameters())
    vals = _values(m)
    with pytest.raises(RuntimeError):
        call_with(m, vals, before, (torch.randn(3, 5),), {})            # wrong input width
    assert [id(p) for p in m.parameters()] == [id(p) for p in before]


def test_a_replaced_submodule_is_resolved_again():
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3)
    vals = _values(m)
    call_with(m, vals, [dict(m.named_parameters())[q] for q in vals], (x,), {})
    m[0] = nn.Linear(3, 3)                   # a new submodule under the same names
    vals = _values(m)
    leaves = [dict(m.named_parameters())[q] for q in vals]
    assert torch.equal(call_with(m, vals, leaves, (x,), {}), functional_call(m, vals, (x,), strict=False))
