"""applications.lease.train: schedules, the CLI end to end, resume after completion and after Ctrl-C."""

import json
import os
import subprocess
import sys

import pytest
import torch

from applications.common import load_config
from mlo.checkpoint import load_checkpoint
from applications.lease import train as train_mod
from applications.common.run_folder import Interrupted
from applications.lease.train import TrainConfig, TrainOptimConfig, lr_at, main
from tests.subproc import run_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.C=4", "model.layers=3", "data.subset_fraction=0.05", "train.batch_size=16", "train.eval_batch_size=64"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread (and do not stall when the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lr_schedules():
    cos = TrainOptimConfig(epochs=10, lr=0.1)
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 5) == pytest.approx(0.05)
    warm = TrainOptimConfig(epochs=10, lr=0.5, schedule="linear", warmup_epochs=2)
    assert lr_at(warm, 0) == pytest.approx(0.25) and lr_at(warm, 2) == pytest.approx(0.5) and lr_at(warm, 6) == pytest.approx(0.25)
    step = TrainOptimConfig(epochs=10, lr=0.1, schedule="step", step_gamma=0.5)
    assert lr_at(step, 2) == pytest.approx(0.025)


def test_presets_load_with_paper_settings():
    cfg_dir = os.path.join(REPO, "applications", "lease", "configs")
    c10 = load_config(TrainConfig, os.path.join(cfg_dir, "train_cifar10.yaml"), ["data.root=some/folder"])
    assert (c10.model.layers, c10.model.C, c10.train.batch_size, c10.train.epochs, c10.data.cutout) == (20, 36, 96, 600, 16)
    c100 = load_config(TrainConfig, os.path.join(cfg_dir, "train_cifar100.yaml"), ["data.root=some/folder"])
    assert c100.data.name == "cifar100" and c100.model.layers == 20
    inet = load_config(TrainConfig, os.path.join(cfg_dir, "train_imagenet.yaml"), ["data.root=some/folder"])
    assert (inet.model.layers, inet.model.C, inet.train.batch_size, inet.model.stem) == (14, 48, 1024, "imagenet")
    digits = load_config(TrainConfig, os.path.join(cfg_dir, "train_digits.yaml"), [])
    assert digits.data.name == "digits"


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--set", "train.lrr=1", "--out", str(out)]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err
    assert main(["--genotype", "NO_SUCH_NET", "--out", str(out)]) == 2
    assert "unknown genotype" in capsys.readouterr().err
    assert not out.exists()


def _run_cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "applications.lease.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_cli_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [a for kv in TINY + ["train.epochs=1"] for a in ("--set", kv)]
    cfg = os.path.join(REPO, "applications", "lease", "configs", "train_digits.yaml")
    proc = _run_cli("--genotype", "DARTS_V2", "--config", cfg, *sets, "--out", str(out), "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout and "test error" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert 0.0 <= result["test_error"] <= 100.0 and result["params"] > 0 and result["epochs"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "config.yaml").exists() and (out / "genotype.json").exists()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1

    # resume with one more epoch (--set may change a value on resume; config.yaml records it)
    resumed = run_module("applications.lease.train", ["--resume", str(out), "--set", "train.epochs=2", "--device", "cpu"])
    assert "resuming from epoch 2" in resumed.stdout
    assert "epochs: 2" in (out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert json.loads((out / "result.json").read_text())["epochs"] == 2


def test_ctrl_c_checkpoints_mid_epoch_and_resumes(tmp_path, monkeypatch):
    cfg = load_config(TrainConfig, None, TINY + ["train.epochs=1", "data.subset_fraction=0.1", "model.auxiliary=false"])
    out = str(tmp_path / "run")
    real_loader = train_mod._train_loader

    def interrupting_loader(dataset, cfg_, epoch, skip):
        for k, batch in enumerate(real_loader(dataset, cfg_, epoch, skip)):
            if k == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train_mod, "_train_loader", interrupting_loader)
    with pytest.raises(Interrupted):
        train_mod.train(cfg, out, torch.device("cpu"))
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (state["epoch"], state["batch"]) == (0, 2) and state["partial"]["n"] == 32

    seen = []

    def recording_loader(dataset, cfg_, epoch, skip):
        seen.append(skip)
        return real_loader(dataset, cfg_, epoch, skip)

    monkeypatch.setattr(train_mod, "_train_loader", recording_loader)
    result = train_mod.train(cfg, out, torch.device("cpu"), resume=True)
    assert seen == [2]  # the two finished batches are not repeated
    assert result["epochs"] == 1
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["epoch"] == 1


def test_recalibrate_bn_sets_the_average_batch_statistics_and_changes_nothing_else():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 2))
    model.drop_path_prob = 0.3
    x = torch.randn(32, 1, 8, 8) * 2 + 1
    loader = DataLoader(TensorDataset(x, torch.zeros(32), torch.zeros(32)), batch_size=8)
    params = {k: v.clone() for k, v in model.named_parameters()}
    model.eval()
    assert train_mod.recalibrate_bn(model, loader, torch.device("cpu")) == 1
    bn = model[1]
    with torch.no_grad():
        h = model[0](x)                                   # the conv's outputs, batch by batch
    means = torch.stack([h[i:i + 8].mean((0, 2, 3)) for i in range(0, 32, 8)])
    variances = torch.stack([h[i:i + 8].transpose(0, 1).reshape(3, -1).var(1) for i in range(0, 32, 8)])
    torch.testing.assert_close(bn.running_mean, means.mean(0))     # plain average of the batch statistics
    torch.testing.assert_close(bn.running_var, variances.mean(0))  # (unbiased, as BatchNorm keeps them)
    assert bn.momentum == 0.1 and not model.training and model.drop_path_prob == 0.3   # all put back
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())


def test_bn_recalibrate_fresh_equals_a_finished_run_re_evaluated(tmp_path):
    """train.bn_recalibrate re-estimates BatchNorm statistics after the last epoch; resuming a finished run
    with the option set re-evaluates it the same way (no retraining), to the same test error."""
    sets = [a for kv in TINY + ["train.epochs=1", "data.augment=false"] for a in ("--set", kv)]
    cfg = os.path.join(REPO, "applications", "lease", "configs", "train_digits.yaml")
    common = ["--genotype", "DARTS_V2", "--config", cfg, *sets, "--device", "cpu", "--no-progress"]
    run_module("applications.lease.train", [*common, "--out", str(tmp_path / "plain")])
    run_module("applications.lease.train", [*common, "--set", "train.bn_recalibrate=true", "--out", str(tmp_path / "bn")])
    plain = json.loads((tmp_path / "plain" / "result.json").read_text())
    fresh = json.loads((tmp_path / "bn" / "result.json").read_text())
    assert fresh["bn_recalibrated"] and not plain["bn_recalibrated"]
    running = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    settled = load_checkpoint(tmp_path / "bn" / "checkpoint.pt")["model"]
    weights = [k for k in running if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(running[k], settled[k]) for k in weights)       # the same training
    assert any(not torch.equal(running[k], settled[k]) for k in running if k.endswith("running_mean"))
    run_module("applications.lease.train", ["--resume", str(tmp_path / "plain"), "--set", "train.bn_recalibrate=true",
                                            "--device", "cpu"])
    again = json.loads((tmp_path / "plain" / "result.json").read_text())
    assert again["bn_recalibrated"] and again["test_error"] == pytest.approx(fresh["test_error"], abs=1e-9)
    assert again["test_loss"] == pytest.approx(fresh["test_loss"], rel=1e-5)
