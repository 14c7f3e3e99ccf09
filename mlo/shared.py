"""Module calls shared between evaluations of one objective at several points.

The finite difference evaluates a problem's objective twice, at ``w ± εv``,
with the values it reads held fixed. A module call whose inputs are all tensors
of the record's batch (the same objects both times) and whose parameters are
all reads, none of ``w``, returns the same value at both points — the clean pass
``f(x; E')`` of the LeaSE explanation loss is one. ``SharedCalls`` runs such a
call once, hands both evaluations a cut copy of its output (a leaf), and lets
the engine push the summed cotangent back through the real output once at the
end: three passes instead of four, and the peak memory of one evaluation.

A call is only reused when the RNG state before it is the same (dropout masks
would differ otherwise); the RNG state after it is then restored, so later calls
see what they would have seen. Each evaluation gets its own copy of the output,
so an objective may modify it in place.
"""
from __future__ import annotations

from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import rng


class SharedCalls:
    """Reuse of batch-only module calls across the evaluations of one engine VJP."""

    def __init__(self, batch, own: str):
        self._batch = batch
        self._stable: set[int] | None = None    # ids of the batch's tensors, collected on first use
        self._own = own
        self._entries: dict[tuple, tuple] = {}
        self.outputs: list[Tensor] = []     # the real outputs (with graph) of the cut calls
        self.leaves: list[Tensor] = []      # their cut copies, in the same order

    def eligible(self, args, kwargs, owners: list[str]) -> bool:
        """Inputs are all batch tensors and no parameter belongs to the perturbed problem."""
        if self._own in owners:
            return False
        if self._stable is None:
            self._stable = {id(t) for t in tree_flatten(self._batch)[0] if isinstance(t, Tensor)}
        flat = tree_flatten((args, kwargs))[0]
        return all(id(t) in self._stable for t in flat if isinstance(t, Tensor))

    def call(self, key: tuple, run):
        """``run()``'s result, computed once per ``key`` and RNG state."""
        before = rng.capture_torch()
        hit = self._entries.get(key)
        if hit is not None and rng.same_torch_state(hit[0], before):
            rng.restore_torch(hit[1])
            return _fresh(hit[2])
        out = run()
        flat, spec = tree_flatten(out)
        cut = []
        for t in flat:
            if isinstance(t, Tensor) and t.requires_grad:
                leaf = t.detach().requires_grad_(True)
                self.outputs.append(t)
                self.leaves.append(leaf)
                cut.append(leaf)
            else:
                cut.append(t)
        result = tree_unflatten(cut, spec)
        self._entries[key] = (before, rng.capture_torch(), result)
        return _fresh(result)


def _fresh(result):
    """Copies (differentiable, for cut leaves) that the objective may modify in place."""
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, result)

