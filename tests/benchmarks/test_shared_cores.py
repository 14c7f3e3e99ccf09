"""`benchmarks.shared_cores`: the table's structure, the settings' environments, and no competitor left behind."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from applications.common.run_folder import LoggingConfig, Program, cli_main
from benchmarks import shared_cores
from tests.subproc import ROOT, child_env, run_module


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


@dataclasses.dataclass
class _Config:
    seed: int = 0
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def _threads_seen_by_a_program(tmp_path, name: str) -> int:
    seen = []

    def body(run):
        seen.append(torch.get_num_threads())
        return {}
    program = Program(module="tiny", config_cls=_Config, description="d", default_config=None,
                      default_out=lambda cfg: str(tmp_path / "default"))
    assert cli_main(program, body, ["--out", str(tmp_path / name), "--device", "cpu", "--no-progress"]) == 0
    return seen[0]


def test_programs_take_their_thread_count_from_the_free_cores_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    from applications.common import cpu
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "free_cores", lambda window=0.25: 3)
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert _threads_seen_by_a_program(tmp_path, "unset") == 3
        assert torch.get_num_threads() == 2                 # the caller's count is back afterwards
        monkeypatch.setenv("OMP_NUM_THREADS", "2")          # the user's setting wins
        assert _threads_seen_by_a_program(tmp_path, "set") == 2
        assert cpu.threads_from_free_cores() is None and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", " ")          # empty: not a setting
        assert cpu.threads_from_free_cores() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_program_started_with_omp_num_threads_keeps_it(tmp_path):
    """End to end: a real program's process, started beside nothing in particular, keeps the user's count."""
    code = ("import sys, torch; from applications.common.run_folder import cli_main; "
            "from tests.benchmarks.test_shared_cores import _Config; from applications.common.run_folder import Program; "
            "p = Program(module='tiny', config_cls=_Config, description='d', default_config=None, "
            "default_out=lambda c: sys.argv[1]); "
            "start = torch.get_num_threads(); "
            "sys.exit(cli_main(p, lambda run: {'start': start, 'threads': torch.get_num_threads()}, "
            "['--out', sys.argv[1]]))")
    for threads in ("1", "2"):
        env = child_env(OMP_NUM_THREADS=threads)
        env.pop("MKL_NUM_THREADS", None)             # torch takes the smaller of the two
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / threads)], cwd=ROOT, capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout)
        assert got["threads"] == got["start"]        # torch's count from the user's variable, untouched
        if threads == "1":
            assert got["threads"] == 1
