"""`mlo.rng.replay`: what an engine uses to evaluate an objective with the random state of the real step."""
import pytest
import torch

from mlo import rng


def test_rng_replay_runs_the_block_at_the_state_and_puts_the_current_one_back():
    torch.manual_seed(0)
    saved = rng.capture_torch()
    first = torch.rand(3)
    torch.manual_seed(123)
    after_seed = torch.get_rng_state()
    with rng.replay(saved):
        assert torch.equal(torch.rand(3), first)            # the block draws what was drawn at capture
    assert torch.equal(torch.get_rng_state(), after_seed)   # and the caller's stream is untouched
    with pytest.raises(KeyError):
        with rng.replay(saved):
            torch.rand(1)
            raise KeyError("inside")
    assert torch.equal(torch.get_rng_state(), after_seed)   # also when the block raises
    with rng.replay(None):                                  # nothing recorded: nothing changes
        torch.rand(1)
    assert not torch.equal(torch.get_rng_state(), after_seed)
