"""`benchmarks.supernet_speed` runs (in a child process) and compares the layouts it promises."""
import json

from tests.subproc import run_module


def test_supernet_speed_times_both_layouts_and_reports_the_ratio(tmp_path):
    out = tmp_path / "speed"
    proc = run_module("benchmarks.supernet_speed", ["--cases", "digits", "--modes", "tuned,channels_last",
                                                    "--reps", "1", "--rounds", "1", "--warmup", "0",
                                                    "--threads", "1", "--out", str(out)])
    report = json.loads((out / "supernet_speed.json").read_text())
    assert report["modes"] == ["tuned", "channels_last"] and report["cases"] == ["digits"]
    for mode in report["modes"]:
        assert report["runs"][mode]["cases"]["digits"]["median_s"] > 0
        assert report["runs"][mode]["resnet18"]["median_s"] > 0
    assert "channels-last speed-up" in proc.stdout and "| digits |" in proc.stdout
