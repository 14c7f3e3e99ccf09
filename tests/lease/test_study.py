"""`python -m applications.lease.study` end to end at tiny size, in child processes: table schema, skip, resume."""
import json
import os

import pytest

from tests.subproc import ROOT, run_module

from .tiny import search_args

TINY_SEARCH = search_args("--search-set", cpu=False, epochs=2, max_steps_per_epoch=2, arch_start_epoch=1)
TINY_TRAIN = ["--train-set", "train.epochs=1", "--train-set", "model.C=4", "--train-set", "model.layers=2",
              "--train-set", "data.subset_fraction=0.1"]
ROW_KEYS = {"method", "seeds_done", "test_acc_mean", "test_acc_std", "per_seed", "search_seconds", "eval_seconds",
            "agreement_edges", "agreement_inputs", "arch_deviation", "arch_margin"}


FLAGS = ["--seeds", "1", "--seed", "0", "--eval-seeds", "2", "--device", "cpu", "--methods", "lease,baseline,random",
         *TINY_SEARCH, *TINY_TRAIN]


def _study(out, *extra, **kw):
    return run_module("applications.lease.study", ["--out", out, *FLAGS, *extra], **kw)


@pytest.mark.slow
def test_study_runs_end_to_end_skips_finished_and_resumes(tmp_path, capsys):
    """Two runs at once (``--jobs 2``: each child one thread, as the tests' environment sets it)."""
    from applications.lease import study as study_mod

    out = str(tmp_path / "study")
    proc = _study(out, "--jobs", "2")
    assert "3/3 runs done, 0 left" in proc.stderr
    locks = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f == ".run.lock"]
    assert locks == []                   # a finished study, and every run it started, leaves no lock file
    summary = json.load(open(os.path.join(out, "study.json")))
    assert {"command", "rows", "paired", "chance", "evaluation_noise", "seeds", "eval_seeds", "methods"} <= set(summary)
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"lease", "baseline", "random"}
    for r in rows.values():
        assert ROW_KEYS <= set(r) and r["seeds_done"] == 1 and 0 <= r["test_acc_mean"] <= 100
    assert rows["lease"]["search_seconds"] > 0 and rows["random"]["search_seconds"] == 0
    assert rows["lease"]["arch_deviation"] > 0          # the search reports how far alpha moved
    assert {(p["method"], p["reference"]) for p in summary["paired"]} >= {("lease", "baseline"), ("lease", "random")}
    assert 0 < summary["chance"]["edges"] < summary["chance"]["inputs"] < 1
    md = open(os.path.join(out, "study.md")).read()
    assert "| lease |" in md and "| baseline |" in md and "95 % CI" in md
    assert os.path.getsize(os.path.join(out, "study.png")) > 0
    for method in ("lease", "baseline"):
        assert os.path.exists(os.path.join(out, "runs", method, "seed0", "search", "genotype.json"))
    assert os.path.exists(os.path.join(out, "runs", "random", "seed0", "eval1", "result.json"))

    # a second study into the folder is refused (one line, the --resume hint), nothing changes
    before = open(os.path.join(out, "study.json")).read()
    capsys.readouterr()
    assert study_mod.main(["--out", out, *FLAGS]) == 2          # refused before any work: in this process
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"error: {out} already holds a run; continue it with --resume {out}, or start over with --overwrite "
        "(removes it), or choose another --out"], err[-2000:]
    assert open(os.path.join(out, "study.json")).read() == before

    # --resume skips finished runs; a search without its result is resumed with --resume
    log = os.path.join(out, "runs", "lease", "seed0", "search.log")
    os.remove(os.path.join(out, "runs", "lease", "seed0", "search", "result.json"))
    os.remove(os.path.join(out, "runs", "baseline", "seed0", "eval1", "result.json"))
    run_module("applications.lease.study", ["--resume", out])
    commands = [line for line in open(log) if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" in commands[1]
    base_log = open(os.path.join(out, "runs", "baseline", "seed0", "eval1.log")).read()
    assert base_log.count("$ python -m applications.lease.train") == 2 and "--resume" in base_log
    assert open(os.path.join(out, "runs", "baseline", "seed0", "search.log")).read().count("$ ") == 1
    summary = json.load(open(os.path.join(out, "study.json")))
    assert summary["rows"][0]["seeds_done"] == 1
    assert summary["command"].startswith(f"python -m applications.lease.study --out {out} --seeds 1")  # the first


def test_study_rejects_unknown_method(tmp_path):
    proc = run_module("applications.lease.study", ["--out", str(tmp_path / "s"), "--methods", "lease,magic"],
                      expect=2)
    assert proc.stderr.startswith("error: methods") and "magic" in proc.stderr and "lease-pgd" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_study_takes_a_paper_preset_unchanged(tmp_path):
    """A CIFAR row with a data root and --device: the plan resolves (the train preset from the dataset);
    --report-only writes the (empty) table without running anything."""
    out = str(tmp_path / "c10")
    run_module("applications.lease.study", ["--out", out, "--config",
                                            os.path.join(ROOT, "applications/lease/configs/study_cifar10.yaml"),
                                            "--data-root", str(tmp_path / "data"), "--device", "cpu", "--report-only"],
               cwd=str(tmp_path))          # the preset's paths resolve from any folder
    summary = json.load(open(os.path.join(out, "study.json")))
    assert summary["config"].endswith("cifar10-darts-2nd-resnet18.yaml")
    assert summary["train_config"].endswith("train_cifar10.yaml")
    assert summary["seeds"] == [2, 3, 4, 5, 6] and summary["eval_seeds"] == 1
    assert [r["seeds_done"] for r in summary["rows"]] == [0] * 3
    assert not os.path.exists(os.path.join(out, "runs"))


def test_study_table_pairs_each_variant_with_lease_and_the_references():
    """The paired rows: every method against baseline and random; the two LeaSE variants also against lease
    (exact vs finite difference, PGD vs ascent), on the seeds both finished, with the paired-t numbers."""
    from applications.lease import study_table
    from applications.lease.study import METHODS, Study

    study = Study(out="unused", config="c", train_config="t", methods=list(METHODS), seeds=[2, 3, 4],
                  eval_seeds=[0, 1])
    acc = {"lease": [90, 91, 92], "baseline": [89, 89, 89], "lease-exact": [91, 93, 95], "lease-pgd": [90, 91],
           "random": [95, 94, 93]}
    cells = {m: {s: {"accs": [a - 0.5, a + 0.5], "genotype": None, "search": {}, "eval_seconds": 1.0,
                     "alphas": None}
                 for s, a in zip(study.seeds, accs)} for m, accs in acc.items()}
    paired = {(p["method"], p["reference"]): p for p in study_table.summarize(study, cells)["paired"]}
    assert set(paired) == ({(m, r) for m in acc for r in ("baseline", "random") if m != r}
                           | {("lease-exact", "lease"), ("lease-pgd", "lease")})
    exact = paired[("lease-exact", "lease")]
    assert exact["n"] == 3 and exact["mean_diff"] == pytest.approx(2.0)     # diffs 1, 2, 3
    assert exact["ci95"][0] == pytest.approx(2.0 - 4.303 / 3 ** 0.5, abs=1e-3)   # t(0.975, 2) · sd / sqrt(n)
    assert paired[("lease-pgd", "lease")]["n"] == 2 and paired[("lease-pgd", "lease")]["mean_diff"] == 0.0


def test_study_table_tests_the_target_op_share_against_chance():
    """Known-answer task: the per-seed share of edges using the task's ops, t-tested against chance."""
    import random

    from scipy import stats

    from applications.lease import arch_stats, study_table
    from applications.lease.spaces.genotype import PRIMITIVES
    from applications.lease.study import Study

    study = Study(out="unused", config="c", train_config="t", methods=["lease"], seeds=[0, 1, 2], eval_seeds=[0],
                  target_ops=["sep_conv_5x5"], nodes=4)
    ops = {k: [list(PRIMITIVES)] * 14 for k in ("normal", "reduce")}

    def cell(seed, hits):      # a random cell with its first ``hits`` normal edges set to the target op
        g = arch_stats.random_genotype(ops, 4, random.Random(seed))
        normal = [("sep_conv_5x5", j) if i < hits else ("max_pool_3x3", j) for i, (_, j) in enumerate(g.normal)]
        reduce = [("max_pool_3x3", j) for _, j in g.reduce]
        return g._replace(normal=normal, reduce=reduce)
    hits = [8, 6, 7]
    cells = {"lease": {s: {"accs": [90.0], "genotype": cell(s, h), "search": {}, "eval_seconds": 1.0, "alphas": None}
                       for s, h in zip(study.seeds, hits)}}
    row = study_table.summarize(study, cells)["rows"][0]
    shares = [h / 16 for h in hits]
    assert row["target_op_share"] == pytest.approx(sum(shares) / 3)
    assert row["target_op_share_p"] == pytest.approx(stats.ttest_1samp(shares, 1 / 7).pvalue)
    assert "p (share vs chance)" in study_table.markdown(study_table.summarize(study, cells))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_study_alone_stops_its_running_child_with_a_checkpoint(tmp_path, sig):
    """``kill -INT``/``kill -TERM`` of the study process (not its process group, as a scheduler or a user in
    another terminal sends it): the running search gets one interrupt, checkpoints, exits; the study exits 130.
    The study is started as ``cmd &`` from a script starts it, with SIGINT ignored: it handles both itself."""
    import signal
    import time

    from applications.common.run_folder import lock_folder
    from tests.subproc import popen_module

    out = tmp_path / "study"
    search = out / "runs" / "lease" / "seed0" / "search"
    flags = [a if a != "max_steps_per_epoch=2" else "max_steps_per_epoch=400" for a in FLAGS]
    proc = popen_module("applications.lease.study", ["--out", str(out), *flags], sigint_ignored=True)
    try:
        deadline = time.time() + 300
        metrics = search / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size > 0):    # the search has logged a step
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert (search / "checkpoint.pt").exists()
    assert "--resume" in (out / "runs" / "lease" / "seed0" / "search.log").read_text()
    lock_folder(str(search)).close()     # nothing holds the search's folder: the child has exited
    assert not (out / "runs" / "baseline").exists()       # and no later run was started


def test_parallel_children_share_the_cores_and_quick_runs_two_at_once(monkeypatch, tmp_path):
    from applications.lease import study as study_mod

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert study_mod.child_env(1, cores=8) is None                       # one child: its own default
    assert study_mod.child_env(2, cores=8)["OMP_NUM_THREADS"] == "4"
    assert study_mod.child_env(4, cores=2)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert study_mod.child_env(2, cores=8) is None                       # the user's setting stands
    import os

    from applications.common.config import load_config
    from applications.common.run_folder import build_parser

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for flags, jobs in ((["--quick"], 2), (["--quick", "--jobs", "1"], 1)):   # an explicit --jobs wins
        args = build_parser(study_mod.PROGRAM).parse_args(flags)
        cfg = load_config(study_mod.StudyConfig, study_mod.PROGRAM.default_config, study_mod._flag_overrides(args))
        assert cfg.quick and cfg.jobs == jobs
