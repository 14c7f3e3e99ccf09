"""applications.common: atomic checkpoints, CPU tuning and the shared CLI flags."""

import argparse
import os
import sys

import pytest
import torch

from applications.common import add_common_args, pick_device, tune_cpu
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
    if sys.platform.startswith("linux") and first["glibc"]:
        assert first["mmap_threshold"] and first["trim_threshold"]
    if first["flush_denormal"]:
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0


def test_common_args_and_device():
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(["--set", "a.b=1", "--set", "c=2", "--out", "o", "--device", "cpu"])
    assert args.overrides == ["a.b=1", "c=2"] and args.out == "o" and args.config is None and args.resume is None
    assert parser.parse_args([]).overrides == []
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            pick_device("cuda")
