"""`benchmarks.shared_cores`: the table's structure, the settings' environments, and no competitor left behind."""
import json
import os

import pytest

from benchmarks import shared_cores
from tests.subproc import run_module


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:        # a zombie is gone in all but name
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_quick_run_writes_every_cell_and_kills_its_competitors(tmp_path):
    out = tmp_path / "sc"
    proc = run_module("benchmarks.shared_cores", ["--quick", "--settings", "free", "--competitors", "0,2",
                                                  "--out", str(out)], timeout=300)
    report = json.loads((out / "shared_cores.json").read_text())
    assert report["settings"] == ["free"] and report["competitors"] == [0, 2] and report["steps"] == 1
    assert [(c["setting"], c["competitors"]) for c in report["cells"]] == [("free", 0), ("free", 2)]
    for c in report["cells"]:
        assert c["steps"] == 1 and c["wall_s"] > 0 and c["cpu_s"] > 0
        assert 1 <= c["threads"] <= report["machine"]["cores"]
    assert report["reference"] == "free" and report["cells"][0]["ratio_to_reference"] == pytest.approx(1.0)
    idle, busy = report["cells"]
    assert busy["ratio_to_reference"] == pytest.approx(busy["wall_s"] / idle["wall_s"])
    assert len(report["competitor_pids"]) == 2
    if os.path.isdir("/proc"):
        assert not any(_alive(pid) for pid in report["competitor_pids"])
    table = (out / "table.md").read_text()
    assert table in proc.stdout and "| setting | competitors | threads |" in table
    assert len(table.strip().splitlines()) == 2 + 2


def test_each_setting_gets_its_own_environment_without_the_callers_thread_variables():
    caller = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE",
              "GOMP_SPINCOUNT": "0"}
    default, passive, free = (shared_cores.setting_env(s, caller) for s in ("default", "passive", "free"))
    for env in (default, free):
        assert not set(shared_cores.THREAD_VARS) & set(env) and env["PATH"] == "/bin"
    assert passive["OMP_WAIT_POLICY"] == "PASSIVE" and "OMP_NUM_THREADS" not in passive
    with pytest.raises(ValueError, match="unknown setting"):
        shared_cores.setting_env("spin", caller)


def test_ratios_are_to_idle_default_when_it_was_measured():
    cells = [{"setting": s, "competitors": k, "threads": 1, "steps": 1, "wall_s": w, "cpu_s": w,
              "ratio_to_reference": None}
             for s, k, w in (("free", 0, 1.0), ("default", 1, 4.0), ("default", 0, 2.0))]
    assert shared_cores.reference(cells)["setting"] == "default"
    assert "wall / idle default" in shared_cores.table(cells)
    assert shared_cores.reference([c for c in cells if c["setting"] == "free"])["wall_s"] == 1.0
    assert shared_cores.reference([cells[1]]) is None


@pytest.mark.parametrize("idle_ticks, expect", [(0, 1), (50, 1), (100, 2), (74, 1), (76, 2)])
def test_free_cores_counts_the_idle_share_of_the_allowed_cores(monkeypatch, idle_ticks, expect):
    from applications.common import cpu
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    samples = iter([(1000, 5000), (1000 + idle_ticks, 5100)])     # 100 ticks over both cores in the window
    monkeypatch.setattr(cpu, "_cpu_times", lambda cpus: next(samples))
    assert cpu.free_cores(window=0) == expect


def test_free_cores_falls_back_to_the_load_average(monkeypatch):
    from applications.common import cpu
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpu, "_cpu_times", lambda cpus: None)
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert cpu.free_cores(window=0) == 1
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cpu.free_cores(window=0) == 1
    monkeypatch.setattr(cpu.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert cpu.free_cores(window=0) == 4


def test_free_cores_reads_this_machine():
    from applications.common import cpu
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= cpu.free_cores(window=0.05) <= n
