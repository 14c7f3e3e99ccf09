"""applications.common: atomic checkpoints, CPU tuning and the shared CLI flags."""

import os
import platform
import sys

import pytest
import torch

from applications.common import ConfigError, pick_device, tune_cpu
from applications.common.run_folder import build_parser
from mlo.checkpoint import CheckpointError, load_checkpoint, previous_path, save_checkpoint


def test_checkpoint_roundtrip_keeps_previous(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert not os.path.exists(previous_path(path))
    save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["step"] == 2
    assert torch.load(previous_path(path), weights_only=True)["step"] == 1
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert leftovers == []


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2, "big": torch.arange(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="previous"):
        assert load_checkpoint(path)["step"] == 1


def test_unloadable_checkpoint_raises_clear_error(tmp_path):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no backup"):
        load_checkpoint(path)
    open(previous_path(path), "wb").write(b"also garbage")
    with pytest.raises(CheckpointError, match="nor its backup"):
        load_checkpoint(path)


def test_tune_cpu_is_idempotent_and_flushes_denormals():
    first = tune_cpu()
    assert tune_cpu() == first
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first["glibc"], "glibc not detected on a glibc system"
    if sys.platform.startswith("linux") and first["glibc"]:
        assert first["mmap_threshold"] and first["trim_threshold"]
    if first["flush_denormal"]:
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0


def test_common_args_and_device():
    from applications.hpo.__main__ import PROGRAM

    parser = build_parser(PROGRAM)
    args = parser.parse_args(["--set", "a.b=1", "--set", "c=2", "--out", "o", "--device", "cpu"])
    assert args.overrides == ["a.b=1", "c=2"] and args.out == "o" and args.config is None and args.resume is None
    assert parser.parse_args([]).overrides == []
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            pick_device("cuda")


def test_trim_logs_keeps_rows_up_to_the_checkpoint_and_csv_line_endings(tmp_path):
    import csv
    import json

    from applications.common.run_folder import trim_logs

    with open(tmp_path / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    with open(tmp_path / "metrics.csv", "w", newline="") as fh:     # as mlo.CSVWriter writes it
        w = csv.writer(fh)
        w.writerows([["step", "loss"], *[[s, 1.0 / s] for s in range(1, 6)]])
    trim_logs(str(tmp_path), lambda row: row["step"] <= 3)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    raw = open(tmp_path / "metrics.csv", newline="").read()
    assert raw.splitlines() == ["step,loss", "1,1.0", "2,0.5", "3,0.3333333333333333"]
    assert raw.count("\r\n") == 4 and raw.count("\n") == 4


def test_overwrite_removes_only_run_files(tmp_path):
    from applications.common.run_folder import holds_run, remove_run

    for name in ("config.yaml", "checkpoint.pt", ".checkpoint.pt.abc.tmp", "checkpoint.pt.prev.tmp", "result.json",
                 "plot.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "tensorboard").mkdir()
    assert holds_run(str(tmp_path))
    remove_run(str(tmp_path), outputs=("plot.png",))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    assert not holds_run(str(tmp_path))



def test_read_resume_is_every_programs_rule(tmp_path):
    """No checkpoint yet: None and the logs cleared; a damaged newest file: the backup, one warning line,
    the damaged file set aside; both formats (a program's own dict, a Runner checkpoint)."""
    import json

    from applications.common.run_folder import read_resume

    said = []
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert read_resume(str(tmp_path), runner=False, say=said.append) is None
    assert (tmp_path / "metrics.jsonl").read_text() == "" and "no checkpoint yet" in said[-1]

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    assert read_resume(str(tmp_path), runner=False, say=said.append) == {"epoch": 2}
    path.write_bytes(b"damaged")
    said.clear()
    assert read_resume(str(tmp_path), runner=False, say=said.append) == {"epoch": 1}
    assert len(said) == 1 and "cannot be read" in said[0] and "previous checkpoint" in said[0]
    assert (tmp_path / "checkpoint.pt.damaged").read_bytes() == b"damaged" and not path.exists()

    with pytest.raises(CheckpointError, match="not a checkpoint written by mlo.Runner"):
        read_resume(str(tmp_path), runner=True, say=said.append)     # a program's dict is not a Runner's
