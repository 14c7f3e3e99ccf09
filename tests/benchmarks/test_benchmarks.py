"""Smoke tests: every benchmark runs at ``--size tiny``, writes its files with the documented
JSON schema, and its accuracy numbers are within their documented tolerances. No timing
assertions: the numbers are only checked to be there and positive. Each benchmark runs in a child
process (a native crash fails its test with the child's stderr instead of ending the suite)."""
import json
import math

import pytest

from benchmarks import common, hypergrad, lease_step, overhead, vs_betty
from tests.subproc import run_module

TOP_KEYS = {"benchmark", "size", "device", "reps", "warmup", "machine", "timing", "memory_method", "rows", "checks",
            "goals", "tolerances"}
GOAL_KEYS = {"name", "value", "target", "direction", "met", "note"}
CHECK_KEYS = {"name", "value", "tolerance", "ok"}


def _run(module, tmp_path, *extra):
    name = module.__name__.rsplit(".", 1)[-1]
    out = tmp_path / name
    run_module(module.__name__, ["--size", "tiny", "--reps", "1", "--warmup", "0", "--out", str(out), *extra])
    result = json.loads((out / "result.json").read_text())
    assert result["benchmark"] == name and result["size"] == "tiny" and result["device"] == "cpu"
    assert (out / "table.md").read_text().strip()
    return out, result


def _check_schema(result, row_keys, with_plot_dir=None):
    assert TOP_KEYS <= set(result)
    assert result["rows"], "no measurements"
    for row in result["rows"]:
        assert row_keys <= set(row), row_keys - set(row)
    for g in result["goals"]:
        assert set(g) == GOAL_KEYS and g["met"] in (True, False, None)
    for c in result["checks"]:
        assert set(c) == CHECK_KEYS
        assert c["ok"], f"{c['name']}: {c['value']} > {c['tolerance']}"
    if with_plot_dir is not None:
        assert (with_plot_dir / "plot.png").stat().st_size > 1000


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_time_interleaved_reports_cpu_time_per_call():
    """CPU time counts the call's own compute (a sleep costs wall time, not CPU time)."""
    import time
    cpu = {}
    wall = common.time_interleaved({"sleep": lambda: time.sleep(0.02),
                                    "work": lambda: sum(i * i for i in range(200_000))}, reps=3, warmup=0, cpu=cpu)
    assert set(cpu) == {"sleep", "work"} and all(len(v) == 3 for v in cpu.values())
    assert min(wall["sleep"]) >= 0.02 and max(cpu["sleep"]) < 0.01
    assert min(cpu["work"]) > 0


def test_time_interleaved_block_times_consecutive_calls_and_reports_the_mean():
    import time
    calls = []
    times = common.time_interleaved({"f": lambda: calls.append(time.sleep(0.01))}, reps=3, warmup=1, block=5)
    assert len(calls) == 1 + 3 * 5 and len(times["f"]) == 3
    assert 0.01 <= min(times["f"]) and max(times["f"]) < 0.05    # per call, not per block of five


def test_statistics_helpers():
    assert common.quantiles([3.0, 1.0, 2.0, 4.0]) == (1.75, 2.5, 3.25)
    assert common.paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])["median"] == 2.0
    assert common.goal("g", 1.2, 1.05)["met"] is False and common.goal("g", None, 1.0)["met"] is None


def test_hypergrad(tmp_path):
    out, r = _run(hypergrad, tmp_path, "--no-memory")
    _check_schema(r, {"case", "engine", "k", "label", "rel_error", "time_ms", "time_q25_ms", "time_q75_ms",
                      "peak_mib"}, out)
    assert set(r["cases"]) == {"ridge", "quad-k10", "quad-k100", "quad-k1000", "logistic", "chain"}
    for case in r["cases"]:
        families = {row["engine"] for row in r["rows"] if row["case"] == case}
        assert families == {"first_order", "unrolled", "finite_difference", "neumann", "cg"}
    assert all(_positive(row["time_ms"]) for row in r["rows"])
    by = {(row["case"], row["label"]): row["rel_error"] for row in r["rows"]}
    assert by[("chain", "one-step")] <= hypergrad.TOL["chain_unrolled_exact"]
    assert by[("ridge", "first-order")] == pytest.approx(1.0)        # ridge: the hypergradient is all "hyper"
    assert len(r["checks"]) >= 10
    assert [row["eps"] for row in r["supernet_fd"]] == list(hypergrad.SUPERNET_EPS)


def test_overhead_with_memory(tmp_path):
    out, r = _run(overhead, tmp_path)
    _check_schema(r, {"step", "mlo_ms", "plain_ms", "time_ratio", "time_ratio_iqr", "cpu_time_ratio",
                      "cpu_time_ratio_iqr", "mlo_peak_mib", "plain_peak_mib", "memory_ratio",
                      "float64_max_rel_diff"}, out)
    assert [row["mode"] for row in r["rows"]] == ["baseline", "lease"]
    assert len(r["goals"]) == 6 and len(r["checks"]) == 4     # tiny: clip-active and plain agreement, both steps
    for row in r["rows"]:
        assert _positive(row["time_ratio"]) and _positive(row["cpu_time_ratio"])
        assert row["float64_max_rel_diff"] <= overhead.TOL["float64_max_rel_diff"]
        if common.memory_supported("cpu"):
            assert _positive(row["mlo_peak_mib"]) and _positive(row["plain_peak_mib"])
    assert r["memory_method"] == common.MEMORY_METHOD_CPU
    assert r["profile_mlo"]["DARTS-2nd"]


def test_vs_betty(tmp_path):
    out, r = _run(vs_betty, tmp_path, "--no-memory")
    if not vs_betty.betty_available():
        assert vs_betty.INSTALL in r["skipped"] and r["rows"] == []
        pytest.skip("Betty is not installed; the benchmark wrote its skip message")
    _check_schema(r, {"case", "engines", "mlo_ms", "betty_ms", "time_ratio", "time_ratio_iqr", "cpu_time_ratio",
                      "memory_ratio"}, out)
    assert {row["case"] for row in r["rows"]} == {"hpo", "darts", "chain"}
    assert len(r["rows"]) == 9
    # the hand-written HPO step (the floor) is timed next to mlo's and Betty's, and is mlo's step exactly
    floors = [row for row in r["rows"] if row["plain_cpu_time_ratio"] is not None]
    assert [(row["case"], row["engines"]) for row in floors] == [("hpo", "darts ↔ FiniteDifference")]
    assert _positive(floors[0]["plain_cpu_time_ratio"])
    assert [c for c in r["checks"] if c["name"].startswith("hpo: hand-written")][0]["ok"]
    same = [a for a in r["agreement"] if a["same_definition"]]
    assert len(same) == 8           # darts (small R), neumann for each case; CG K=1 on the two bilevel cases
    for a in same:
        assert a["rel_diff"] <= a["tolerance"], a


def test_lease_step(tmp_path):
    out, r = _run(lease_step, tmp_path, "--no-memory")
    _check_schema(r, {"variant", "time_ms", "ratio_vs_darts", "ratio_iqr", "peak_mib"}, out)
    assert [row["variant"] for row in r["rows"]] == list(lease_step.VARIANTS)
    assert r["rows"][0]["ratio_vs_darts"] == pytest.approx(1.0)
    stages = r["stages_ms"]["LeaSE-R18"]
    for key in ("explainer", "explanation", "audience", "architecture", "architecture: direct + update"):
        assert _positive(stages[key]), key
    assert sum(1 for k in stages if k.startswith("edge ")) == 3
    assert {k for k in r["stages_ms"]["DARTS-2nd"] if k.startswith("edge ")} == {"edge explainer->architecture"}
    assert len(r["goals"]) == 2
