"""cells.png: every edge is visible (none runs behind a node or along another edge), for every cell shape."""
import itertools

import numpy as np
import pytest

from applications.lease import viz
from applications.lease.spaces import Genotype


def _complete(steps: int) -> list[tuple]:
    """Every edge a cell of ``steps`` nodes can have: each node from each of its predecessors, each into the
    output."""
    return [(j, i + 2) for i in range(steps) for j in range(i + 2)] + [(i + 2, "out") for i in range(steps)]


def _distance(p, a, b) -> float:
    """From point ``p`` to the segment ``a``-``b``."""
    p, a, b = map(np.asarray, (p, a, b))
    t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + t * (b - a))))


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 8])
def test_no_edge_passes_behind_a_node_or_lies_on_another_edge(steps):
    """All the edges a cell can have, at once: each clears every node but its own two by ``CLEARANCE``
    (more than a node's radius), no two edges share a line, and no two nodes overlap."""
    pos = viz.cell_layout(steps)
    assert len(pos) == steps + 3
    edges = _complete(steps)
    assert viz.CLEARANCE > viz.NODE_RADIUS
    for s, t in edges:
        for node, p in pos.items():
            if node not in (s, t):
                assert _distance(p, pos[s], pos[t]) >= viz.CLEARANCE - 1e-9, (s, t, node)
    for (s1, t1), (s2, t2) in itertools.combinations(edges, 2):
        a, b, c, d = (np.asarray(pos[k]) for k in (s1, t1, s2, t2))
        u, v = b - a, d - c
        cross = u[0] * v[1] - u[1] * v[0]
        on_line = abs(u[0] * (c - a)[1] - u[1] * (c - a)[0]) / np.linalg.norm(u)
        assert abs(cross) > 1e-6 or on_line > 1e-6, ((s1, t1), (s2, t2))       # not on one line
    for (k1, p1), (k2, p2) in itertools.combinations(pos.items(), 2):
        assert np.linalg.norm(np.subtract(p1, p2)) > 2 * viz.NODE_RADIUS, (k1, k2)


def test_the_picture_draws_each_edge_between_its_nodes(tmp_path):
    """The drawn arrows run between the layout's node discs (the normal cell of a searched genotype whose
    old picture hid node0->node2 behind node 1 and laid node1->node3 on node1->node2)."""
    import matplotlib.pyplot as plt

    normal = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 2),
              ("dil_conv_3x3", 0), ("sep_conv_5x5", 2), ("max_pool_3x3", 3), ("skip_connect", 1)]
    fig, ax = plt.subplots()
    viz._draw_cell(ax, normal, [2, 3, 4, 5], "normal cell")
    pos = viz.cell_layout(4)
    arrows = [(np.array(a.xyann), np.array(a.xy)) for a in ax.texts if hasattr(a, "xyann")]
    wanted = viz.cell_edges(normal, [2, 3, 4, 5])
    assert len(arrows) == len(wanted)
    for (start, end), (s, t, _) in zip(arrows, wanted):
        assert np.linalg.norm(start - pos[s]) == pytest.approx(viz.NODE_RADIUS)
        assert np.linalg.norm(end - pos[t]) == pytest.approx(viz.NODE_RADIUS)
    centres = sorted(tuple(np.round(p.center, 9)) for p in ax.patches)
    assert centres == sorted(tuple(np.round(p, 9)) for p in pos.values())
    plt.close(fig)
    genotype = Genotype(normal=normal, normal_concat=[2, 3, 4, 5], reduce=normal, reduce_concat=[2, 3, 4, 5])
    viz.plot_genotype(genotype, str(tmp_path / "cells.png"))
    assert (tmp_path / "cells.png").stat().st_size > 0
