"""``benchmarks.gpu_check`` in its dry mode (tiny sizes, CPU), in a child process: the JSON schema,
every case timed, the projections consistent with step time × step count, the Markdown table,
the budget guard and the refusal to run the real check without a GPU. No timing assertions."""
import json
import math

import pytest

import mlo.precision
from benchmarks import gpu_check
from tests.subproc import child_env, run_module

CASE_KEYS = {"case", "preset", "precision", "status", "note", "size", "build_s", "step_ms", "weights_only_step_ms",
             "peak_mib", "resident_mib", "step_extra_mib", "wall_s"}
PROJECTION_KEYS = {"preset", "dataset", "method", "audience", "basis", "exact", "differences", "train_examples",
                   "steps_per_epoch", "stages", "epochs", "full_steps", "warmup_steps", "paper_gpu_hours", "step_s",
                   "weights_only_step_s", "gpu_hours"}
# (full steps, weights-only steps): 25,000 train images; DARTS 50 epochs of 25,000 // 64; PC-DARTS batch 256,
# 15 of 50 epochs weights only; P-DARTS batch 96, 3 stages of 25 epochs, 10 of them weights only
STEPS = {"darts-1st": (50 * 390, 0), "darts-2nd": (50 * 390, 0), "pc-darts": (35 * 97, 15 * 97),
         "p-darts": (3 * 15 * 260, 3 * 10 * 260)}


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run_module("benchmarks.gpu_check", ["--dry", "--device", "cpu", "--reps", "1", "--warmup", "0",
                                               "--out", str(out)])
    return json.loads((out / "result.json").read_text()), (out / "table.md").read_text(), proc.stdout


def test_every_case_is_timed(dry):
    result, _, _ = dry
    assert result["benchmark"] == "gpu_check" and result["dry"] is True and result["device"] == "cpu"
    assert {"torch", "torch_cuda", "python"} <= set(result["machine"])
    want = {(name, prec) for name in gpu_check.CASES for prec in gpu_check.PRECISIONS}
    assert {(c["case"], c["precision"]) for c in result["cases"]} == want
    bf16 = mlo.precision.autocast_available("cpu")
    for c in result["cases"]:
        if c["precision"] == "bf16" and not bf16:
            assert c["status"] == "skipped" and "bf16" in c["note"]
            continue
        assert c["status"] == "ok", c
        assert CASE_KEYS <= set(c), CASE_KEYS - set(c)
        for key in ("step_ms", "weights_only_step_ms"):
            s = c[key]
            assert s["n"] == 1 and all(_positive(s[k]) for k in ("median", "q25", "q75"))
        assert c["peak_mib"] is None          # CUDA only
        lease = c["case"] != "DARTS-2nd"
        assert c["size"]["C"] == gpu_check.DRY["space.C"] and (c["size"]["bank_rows"] is not None) == lease


def test_projections_are_step_time_times_steps(dry):
    result, _, _ = dry
    rows = {p["preset"]: p for p in result["projections"]}
    assert set(rows) == set(gpu_check.cifar_presets()) and len(rows) == 24
    ok = {(c["case"], c["precision"]): c for c in result["cases"] if c["status"] == "ok"}
    for name, p in rows.items():
        assert PROJECTION_KEYS <= set(p), PROJECTION_KEYS - set(p)
        assert p["train_examples"] == 25_000 and p["basis"] in gpu_check.CASES
        want = STEPS.get(p["method"])
        assert want is not None, name
        assert (p["full_steps"], p["warmup_steps"]) == want, name
        assert p["exact"] == (p["method"] == "darts-2nd") and p["exact"] == (not p["differences"]), name
        assert _positive(p["paper_gpu_hours"])
        for prec in gpu_check.PRECISIONS:
            case = ok.get((p["basis"], prec))
            if case is None:
                assert p["gpu_hours"][prec] is None
                continue
            t, tw = case["step_ms"]["median"] / 1000, case["weights_only_step_ms"]["median"] / 1000
            assert p["step_s"][prec] == pytest.approx(t) and p["weights_only_step_s"][prec] == pytest.approx(tw)
            assert p["gpu_hours"][prec] == pytest.approx((p["full_steps"] * t + p["warmup_steps"] * tw) / 3600)
    assert rows["cifar10-darts-2nd-resnet50"]["basis"] == "LeaSE-R50"
    assert rows["cifar100-pc-darts-baseline"]["basis"] == "DARTS-2nd"
    assert any("space.name pcdarts" in d for d in rows["cifar10-pc-darts-resnet18"]["differences"])


def test_smoke_test_and_table(dry):
    result, table, stdout = dry
    d = result["distributed"]
    assert d["status"] == "ok" and d["backend"] == "gloo" and d["world_size"] == 2 and len(d["ranks"]) == 2, d
    assert all(r["all_reduce_ok"] and r["in_sync"] for r in d["ranks"]) and _positive(d["dp_step_s"])
    assert table.strip() in stdout
    assert "DRY RUN" in table and "smoke test: ok" in table
    lines = [line for line in table.splitlines() if line.startswith("|")]
    for c in result["cases"]:
        assert any(line.startswith(f"| {c['case']} | {c['precision']} |") for line in lines)
    for p in result["projections"]:
        assert any(line.startswith(f"| {p['preset']} | {p['basis']} |") for line in lines)


def test_budget_guard_skips_everything(tmp_path):
    run_module("benchmarks.gpu_check", ["--dry", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["cases"]) == len(gpu_check.CASES) * len(gpu_check.PRECISIONS)
    assert all(c["status"] == "skipped" and c["note"].startswith("budget") for c in result["cases"])
    assert all(v is None for p in result["projections"] for v in p["gpu_hours"].values())
    assert result["distributed"]["status"] == "skipped" and "budget" in result["distributed"]["note"]
    assert "skipped" in (tmp_path / "table.md").read_text()


def test_needs_a_gpu_without_dry(tmp_path):
    proc = run_module("benchmarks.gpu_check", ["--out", str(tmp_path)], expect=2,
                      env=child_env(CUDA_VISIBLE_DEVICES=""))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU" in lines[0] and "--dry" in lines[0]
    assert not (tmp_path / "result.json").exists()
