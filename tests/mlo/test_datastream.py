"""DataStream resume: the same batches as an uninterrupted stream, across epoch boundaries,
for loaders that shuffle with the global RNG and with their own generator."""
import pytest
import torch
from torch.utils.data import DataLoader

from mlo.problem import DataStream


@pytest.mark.parametrize("own_generator", [False, True])
def test_resume_mid_epoch_replays_this_and_later_epochs(own_generator):
    def loader():
        gen = torch.Generator().manual_seed(5) if own_generator else None
        return DataLoader(list(range(10)), batch_size=3, shuffle=True, generator=gen)

    torch.manual_seed(0)
    a = DataStream(loader())
    for _ in range(2):
        a.next()
    saved = a.state_dict()
    rng = torch.get_rng_state()
    expected = [a.next().tolist() for _ in range(9)]      # crosses two epoch boundaries

    torch.manual_seed(123)
    b = DataStream(loader())
    b.load_state_dict(saved)
    torch.set_rng_state(rng)                               # what the graph's RNG restore does
    got = [b.next().tolist() for _ in range(9)]
    assert got == expected
    assert b.epoch == a.epoch


def test_forward_constants_stop_the_gradient_of_one_term():
    import mlo
    lin = torch.nn.Linear(2, 1, bias=False).double()
    lam = torch.ones(2, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)

    def inner_obj(ctx, b):
        return ((ctx.forward(lin, x) - 1) ** 2).sum() + (ctx["outer"] * ctx["inner"]["weight"] ** 2).sum()

    def outer_obj(ctx, b):   # the same value twice; the second term does not differentiate the lower solution
        return ctx.forward(lin, x).sum() + ctx.forward(lin, x, constants=("inner",)).sum()

    def build():
        inner = mlo.Problem("inner", lin, inner_obj, lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"])
        outer = mlo.Problem("outer", lam, outer_obj, lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])
        return mlo.Graph([inner, outer])
    both = mlo.hypergradient(build(), "outer")["total"]
    assert both.abs().sum() > 0
    def outer_single(ctx, b):
        return ctx.forward(lin, x).sum()
    inner = mlo.Problem("inner", lin, inner_obj, lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"])
    outer = mlo.Problem("outer", lam, outer_single, lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])
    single = mlo.hypergradient(mlo.Graph([inner, outer]), "outer")["total"]
    assert torch.allclose(both, single, rtol=1e-12)
