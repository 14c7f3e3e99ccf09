"""End to end: ``python -m applications.hpo`` on configs/tiny.yaml (in a child process, a few seconds).

Direction checked: every learned per-feature decay ends with a lower validation
loss and a higher test accuracy than the best fixed decay of the grid, and
decays the noise features more than the pixels. Robust for the tiny config with
``seed = data.seed`` in {0, 1, 2} (checked by hand; this test runs seed 0).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from applications.hpo import __main__ as cli
from tests.subproc import describe, popen_module, run_module

from .helpers import check_outputs, doc_code_is_current, tiny

pytestmark = pytest.mark.slow

ARGS = ["--device", "cpu", "--no-progress"]


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "time_s"}
    return value


def _result(out_dir):
    with open(os.path.join(out_dir, "result.json"), encoding="utf-8") as fh:
        return _without_times(json.load(fh))


def test_tiny_run_learns_better_decays_than_hand_tuned(tmp_path):
    out = str(tmp_path / "run")
    run_module("applications.hpo", ["--config", tiny("hpo"), "--out", out, *ARGS])
    result = check_outputs(out, "hpo.png")
    fixed = result["fixed"][f"{result['hand_tuned_weight_decay']:g}"]
    assert set(result["learned"]) == {"cg", "neumann", "unrolled"}
    for name, r in result["learned"].items():
        assert r["val_loss"] < fixed["val_loss"], name
        assert r["test_acc"] > fixed["test_acc"], name
        assert r["median_decay_noise"] > r["median_decay_pixels"], name


def test_interrupted_run_resumes_exactly(tmp_path):
    """Ctrl-C after the first checkpoint (the end of the first arm), then --resume: the same result and rows."""
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    small = ["--config", tiny("hpo"), "--set", "weight_decay_grid=[0.01]", "--set", "engines.compare=[cg,unrolled]",
             "--set", "outer_steps=200", *ARGS]
    run_module("applications.hpo", [*small, "--out", ref])

    proc = popen_module("applications.hpo", [*small, "--out", cut], sigint_ignored=True)    # as `cmd &` starts it
    while not os.path.exists(os.path.join(cut, "checkpoint.pt")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, f"Ctrl-C did not stop the run: {describe(proc.returncode)}\n{err[-3000:]}"
    assert f"--resume {cut}" in err
    assert not os.path.exists(os.path.join(cut, "result.json"))
    resumed = run_module("applications.hpo", ["--resume", cut, *ARGS])
    assert "resuming from step" in resumed.stderr
    assert _result(cut) == _result(ref)
    with open(os.path.join(ref, "metrics.jsonl")) as a, open(os.path.join(cut, "metrics.jsonl")) as b:
        assert a.read() == b.read()


def test_bad_override_is_rejected_before_running(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["--config", tiny("hpo"), "--out", out, "--set", "engines.compare=[cg,newton]", *ARGS]) == 2
    assert "newton" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_doc_shows_the_current_declaration():
    doc_code_is_current("hpo.md")
