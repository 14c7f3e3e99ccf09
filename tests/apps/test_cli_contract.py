"""Every command-line program keeps the same run-folder contract (applications/common/run_folder.py).

Each program runs in a child process (tests/subproc.py) on a few steps (what is refused before any
work runs in this process):

- a second run into a finished folder is refused with a one-line hint and leaves
  every file of the first run byte-identical; ``--overwrite`` starts over cleanly
  (the old run's files go, a user's own file stays);
- ``--print-config`` prints every key and writes nothing;
- a folder given as ``--config`` and an ``--out`` that cannot be created end in one
  line and exit code 2;
- ``--help`` lists the config keys, and its examples are valid for that program.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

import pytest
import yaml

import mlo
from applications.common.config import config_keys, load_config
from applications.common.run_folder import LoggingConfig, Program, build_parser, cli_main, open_run
from tests.subproc import run_module

from tests.lease.tiny import search_args

from .helpers import tiny

CPU = ["--device", "cpu", "--no-progress"]

#: A run of a few steps of each program.
QUICK = {
    "applications.lease.search": search_args(epochs=1, max_steps_per_epoch=2),
    "applications.lease.train": ["--genotype", "DARTS_V2", "--set", "model.C=4", "--set", "model.layers=3",
                                 "--set", "model.auxiliary=false", "--set", "data.subset_fraction=0.05",
                                 "--set", "train.batch_size=16", "--set", "train.eval_batch_size=64",
                                 "--set", "train.epochs=1", *CPU],
    "applications.hpo": ["--config", tiny("hpo"), "--set", "outer_steps=3", "--set", "weight_decay_grid=[0.01]",
                         "--set", "engines.compare=[cg]", *CPU],
    "applications.reweight": ["--config", tiny("reweight"), "--set", "steps=3", "--set", "seeds=[0]",
                              "--set", "methods=[uniform]", *CPU],
    "applications.ignore": ["--config", tiny("ignore"), "--set", "steps=2", "--set", "seeds=[0]",
                            "--set", "methods=[no_ignore]", "--set", "final.steps=2", *CPU],
    "applications.maml": ["--config", tiny("maml"), "--set", "outer_steps=2", "--set", "methods=[maml]", *CPU],
}
PROGRAMS = sorted(QUICK)
#: The study runs other programs; its own contract (second run refused, resume) is in tests/lease/test_study.py.
STUDY = ["--seeds", "1", "--eval-seeds", "1", "--methods", "lease,random", "--search-set", "epochs=1", *CPU]
ALL = PROGRAMS + ["applications.lease.study"]
ARGS = {**QUICK, "applications.lease.study": STUDY}


def _program(module: str):
    mod = importlib.import_module(module if module.startswith("applications.lease") else module + ".__main__")
    return mod.PROGRAM


def _files(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("module", PROGRAMS)
def test_second_run_is_refused_and_overwrite_starts_over(module, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_module(module, [*QUICK[module], "--out", out])
    first = _files(out)
    assert "config.yaml" in first and "result.json" in first

    code, _, err = _main(module, [*QUICK[module], "--out", out], capsys)     # refused before any work
    assert code == 2
    line = _one_error_line(err)
    assert "already holds a run" in line and f"--resume {out}" in line and "--overwrite" in line
    assert _files(out) == first                      # not one byte of the first run changed

    with open(os.path.join(out, "notes.txt"), "w") as fh:
        fh.write("mine")
    with open(os.path.join(out, "metrics.jsonl"), "a") as fh:   # a row no new run may keep
        fh.write(json.dumps({"step": 999, "arm": "stale", "epoch": 999}) + "\n")
    run_module(module, [*QUICK[module], "--out", out, "--overwrite"])
    after = _files(out)
    assert after["notes.txt"] == b"mine"             # only the run's own files are removed
    rows = [json.loads(line) for line in after["metrics.jsonl"].decode().splitlines()]
    assert rows and all(r.get("step") != 999 and r.get("epoch") != 999 for r in rows)
    assert len(rows) == len(first["metrics.jsonl"].decode().splitlines())
    assert set(after) - {"notes.txt"} == set(first)


def _main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """The program's ``main`` in this process: only for flags that stop before any model is built."""
    mod = importlib.import_module(module if module.startswith("applications.lease") else module + ".__main__")
    code = mod.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("module", ALL)
def test_print_config_shows_every_key_and_writes_nothing(module, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _main(module, [*ARGS[module], "--out", str(out), "--print-config"], capsys)
    assert code == 0
    printed = yaml.safe_load(stdout)
    keys = set()

    def walk(tree, prefix=""):
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else k
            keys.add(key)
            if isinstance(v, dict) and v:
                walk(v, key)
    walk(printed)

    def other_engines_field(key):        # a field of the default engine where the preset chose another one
        parent = printed
        for part in key.split(".")[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        return isinstance(parent, dict) and parent.get("name") in mlo.ENGINES and \
            parent == mlo.engine_to_config(mlo.engine_from_config(parent))   # with every field of its own

    missing = [k for k, _ in config_keys(_program(module).config_cls) if k not in keys and not other_engines_field(k)]
    assert not missing, missing
    assert printed["logging"]["progress"] is False
    assert not out.exists()
    code, stdout, _ = _main(module, ["--print-config", "--seed", "7"], capsys)
    seeds = yaml.safe_load(stdout)
    assert code == 0 and seeds.get("seed", seeds.get("seeds")) in (7, [7])


@pytest.mark.parametrize("name", sorted(mlo.ENGINES))
def test_print_config_and_resume_give_back_every_engine_kind(name, tmp_path, capsys):
    """An engine is printed as its mapping, and a run folder's config.yaml of it resumes to the same engine."""
    module, engine = "applications.maml", mlo.ENGINES[name]()
    code, stdout, _ = _main(module, ["--print-config", "--set", f"engines.imaml={name}"], capsys)
    assert code == 0 and yaml.safe_load(stdout)["engines"]["imaml"] == mlo.engine_to_config(engine)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(stdout)
    program = _program(module)
    run = open_run(program, build_parser(program).parse_args(["--resume", str(run_dir)]))
    assert type(run.cfg.engines.imaml) is type(engine) and run.cfg.engines.imaml == engine


@pytest.mark.parametrize("module", ALL)
def test_bad_paths_are_one_line_errors(module, tmp_path, capsys):
    code, _, err = _main(module, ["--config", str(tmp_path), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "is a folder" in _one_error_line(err)
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    code, _, err = _main(module, [*ARGS[module], "--out", str(blocker / "out")], capsys)
    assert code == 2 and "--out" in _one_error_line(err)
    assert not (tmp_path / "a").exists()


def test_tensorboard_switch_needs_the_logging_extra(tmp_path, capsys):
    """``--tensorboard`` either works or says, in one line, which extra to install."""
    import mlo

    args = [*QUICK["applications.hpo"], "--out", str(tmp_path / "run"), "--tensorboard"]
    if mlo.TensorBoardWriter.available():
        run_module("applications.hpo", args)
        assert os.listdir(tmp_path / "run" / "tensorboard")
    else:
        code, _, err = _main("applications.hpo", args, capsys)
        assert code == 2 and "pip install -e '.[logging]'" in _one_error_line(err)


@pytest.mark.parametrize("module", ALL)
def test_help_lists_config_keys_and_valid_examples(module):
    program = _program(module)
    text = build_parser(program).format_help()
    for key, _ in config_keys(program.config_cls):
        assert f"  {key} = " in text, key
    assert program.examples
    for example in program.examples:
        args = build_parser(program).parse_args(example)
        if args.resume:
            continue            # names a folder a previous example made
        items = list(program.overrides_from_args(args)) if program.overrides_from_args else []
        load_config(program.config_cls, args.config or program.default_config, items + args.overrides)


@pytest.mark.slow
def test_under_torchrun_only_rank_0_prints_a_bad_setting(tmp_path):
    """Two workers reject the same setting; the user sees its line once (torchrun then reports the failure)."""
    import subprocess
    import sys

    from tests.subproc import ROOT, child_env

    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "applications.hpo", "--set", "outer_steps=lots", "--out", str(tmp_path / "x")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert lines == ["error: outer_steps: expected int, got 'lots'"], proc.stderr[-3000:]
    assert not (tmp_path / "x").exists()


def test_nproc_checks_settings_before_starting_any_worker(tmp_path):
    """``--nproc 2`` with a bad setting: the launching process says it in one line; no worker starts."""
    out = tmp_path / "x"
    r = run_module("applications.lease.search", ["--nproc", "2", "--set", "epochs=lots", "--out", str(out)],
                   expect=2, timeout=300)
    assert r.stderr.strip().splitlines() == ["error: epochs: expected int, got 'lots'"], r.stderr[-3000:]
    assert not out.exists()
    r = run_module("applications.lease.search", ["--nproc", "0"], expect=2, timeout=300)
    assert r.stderr.strip() == "error: --nproc 0: need at least 1 process"


@pytest.mark.parametrize("code, expected", [(2, 2), (5, 1)])
def test_nproc_launcher_turns_a_worker_failure_into_one_line(code, expected):
    """A program's own exit code (2) passes through after rank 0's line; a crash (5) is summarised in one
    line; either way there is no launcher traceback or failure table."""
    import subprocess
    import sys

    from tests.subproc import ROOT, child_env
    script = ("import sys; from applications.common.launch import launch; "
              f"sys.exit(launch('tests.apps.launch_worker', ['{code}'], 2))")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == expected, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    summary = ["error: 2 of 2 processes failed; the first was rank 0 (exit code 5); its output is above",
               "error: 2 of 2 processes failed; the first was rank 1 (exit code 5); its output is above"]
    if code == 2:
        assert lines == ["error: worker says no (2)"], lines
    else:
        assert lines[0] == "error: worker says no (5)" and lines[1] in summary and len(lines) == 2, lines


def test_resume_hint_names_the_launcher_that_started_the_run(monkeypatch):
    from applications.common import launch
    from applications.common.run_folder import Run
    from applications.lease.search import PROGRAM
    run = Run(PROGRAM, None, "runs/x", None)
    monkeypatch.delenv(launch.LAUNCHER_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert run.resume_command(2) == "torchrun --nnodes=1 --nproc_per_node=2 -m applications.lease.search --resume runs/x"
    monkeypatch.setenv(launch.LAUNCHER_ENV, "2")
    assert run.resume_command(2) == "python -m applications.lease.search --nproc 2 --resume runs/x"
    assert run.resume_command(1) == "python -m applications.lease.search --resume runs/x"



@dataclasses.dataclass
class _TinyConfig:
    """The config of a program that does nothing but write its result (run-folder rules only)."""

    seed: int = 0
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def test_a_run_still_going_is_not_resumed_or_overwritten_by_a_second_process(tmp_path, capsys):
    """While another process holds the run folder (here: a child standing in for a run that is still going),
    --resume and --overwrite stop with one line and exit 2, and not one byte of the folder changes. The
    rule is the run folder's, so a program whose body only writes its result shows it for all."""
    import subprocess
    import sys

    from tests.subproc import ROOT

    def body(run):
        run.start()
        with open(os.path.join(run.out, "result.json"), "w") as fh:
            fh.write("{}")
        return {}
    program = Program(module="tiny", config_cls=_TinyConfig, description="d", default_config=None,
                      default_out=lambda cfg: str(tmp_path / "default"))
    out = str(tmp_path / "run")
    assert cli_main(program, body, ["--out", out]) == 0
    before = _files(out)
    assert ".run.lock" not in before               # a run that ended leaves no lock file behind
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]);"
                               "from applications.common.run_folder import lock_folder; h = lock_folder(sys.argv[1]);"
                               "print('locked', flush=True); time.sleep(60)", out, ROOT],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        for flags in (["--resume", out], ["--out", out, "--overwrite"]):
            assert cli_main(program, body, flags) == 2
            line = _one_error_line(capsys.readouterr().err)
            assert f"{out} is in use by another process (pid {holder.pid})" in line, line
            assert {k: v for k, v in _files(out).items() if k != ".run.lock"} == \
                {k: v for k, v in before.items() if k != ".run.lock"}
    finally:
        holder.kill()
        holder.wait()
    assert cli_main(program, body, ["--resume", out]) == 0        # free again once the holder is gone
    assert not os.path.exists(os.path.join(out, ".run.lock"))     # the killed holder's file went with this run


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_stops_a_program_started_with_sigint_ignored(tmp_path, sig):
    """A program started as ``cmd &`` from a script inherits SIGINT ignored; ``kill -INT`` (and SIGTERM) must
    still end it as Ctrl-C does: exit 130, the resume hint, and the folder's lock file gone."""
    import signal

    from tests.subproc import popen_module

    out = str(tmp_path / "run")
    proc = popen_module("tests.apps.interruptible", ["--out", out], sigint_ignored=True)
    try:
        assert proc.stderr.readline().strip() == "ready"
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert f"--resume {out}" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, ".run.lock"))
