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
