"""``benchmarks.lease_step --variants engines``: finite differences against the exact engine per mode."""
import json
import math

import mlo
from benchmarks import lease_step, nas
from tests.subproc import run_module


def test_fixtures_keep_finite_differences_whatever_the_preset_default():
    """The digits preset runs exact engines; the benchmarks' FD variants must not follow it."""
    edges = ("explainer", "explanation", "audience")
    fd = nas.config("tiny", mode="lease")
    assert all(isinstance(fd.engines.build(e), mlo.FiniteDifference) for e in edges)
    mode, audience, extra = lease_step.ALL["LeaSE-R18, exact, step graph"]
    exact = nas.config("tiny", mode=mode, audience=audience, **extra)
    for e in edges:
        engine = exact.engines.build(e)
        assert isinstance(engine, mlo.Unrolled) and engine.steps == 1 and engine.reuse_step_graph
    cut = nas.config("tiny", mode="lease", **lease_step.ALL["LeaSE-R18, Δ edge cut"][2])
    assert isinstance(cut.engines.build("explanation"), mlo.FirstOrder)
    assert isinstance(cut.engines.build("audience"), mlo.FiniteDifference)
    assert nas.config("tiny", **{"data.name": "synthetic"}).data.name == "synthetic"


def test_engines_variants_pair_each_exact_step_with_its_own_fd_step(tmp_path):
    out = tmp_path / "steps"
    run_module("benchmarks.lease_step", ["--size", "tiny", "--reps", "2", "--warmup", "0", "--no-memory",
                                         "--no-breakdown", "--variants", "engines", "--data", "synthetic",
                                         "--out", str(out)])
    r = json.loads((out / "result.json").read_text())
    assert r["data"] == "synthetic" and r["stages_ms"] == {}
    rows = {row["variant"]: row for row in r["rows"]}
    assert list(rows) == list(lease_step.ENGINES)
    for name, row in rows.items():
        assert row["cpu_ms"] > 0 and row["time_ms"] > 0
        if name in lease_step.FD_OF:
            assert math.isfinite(row["cpu_ratio_vs_fd"]) and row["cpu_ratio_vs_fd"] > 0
            assert row["ratio_vs_fd_iqr"][0] <= row["ratio_vs_fd"] <= row["ratio_vs_fd_iqr"][1]
        else:
            assert "ratio_vs_fd" not in row
    assert "CPU × its FD step" in (out / "table.md").read_text()
