"""The LeaSE graph with ``Unrolled(reuse_step_graph=True)`` on every edge gives the exact engine's
four-level hypergradient (float64, momentum and an active clip on the weights); the row-sparse
bank's edge falls back to the recomputation."""
import torch

import mlo
import mlo.engines.unrolled as unrolled

from .tiny_graph import exact_config, tiny_lease_graph


def _flat(h):
    return torch.cat([v.reshape(-1) for v in h["total"].values()])


def test_lease_hypergradient_through_the_kept_step_graphs(monkeypatch):
    calls = []
    real = unrolled._through_step_graph
    monkeypatch.setattr(unrolled, "_through_step_graph", lambda *a, **k: calls.append(1) or real(*a, **k))
    graph = tiny_lease_graph(exact_config("unrolled", **{"weights.grad_clip": 0.01, "weights.momentum": 0.9}))[0]
    plain = _flat(mlo.hypergradient(graph, "architecture"))
    reuse = graph.with_engines(lambda e: mlo.Unrolled(steps=1, reuse_step_graph=True))
    got = _flat(mlo.hypergradient(reuse, "architecture"))
    assert float((got - plain).norm() / plain.norm()) < 1e-13
    assert len(calls) == 2          # explanation->explainer and explainer->architecture; the bank's edge recomputes
