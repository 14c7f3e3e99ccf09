"""Metric rows: per-problem loss / grad_norm / hypergrad_norm, to JSONL and CSV."""
import csv
import json
import math

import torch

import mlo

LAM0 = math.log(0.5)


def build():
    w = torch.tensor([1.0, -1.0, 0.5], requires_grad=True)
    th = torch.tensor(LAM0, requires_grad=True)
    target = torch.tensor([0.3, 0.2, -0.4])

    def inner_obj(ctx, batch):
        w = ctx["inner"]
        ctx.log("wnorm", w.norm())
        return ((w - target) ** 2).sum() + torch.exp(ctx["outer"]) * (w ** 2).sum()

    def outer_obj(ctx, batch):
        return ((ctx["inner"] - 1.0) ** 2).sum()

    inner = mlo.Problem("inner", w, inner_obj, lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"])
    outer = mlo.Problem("outer", th, outer_obj, lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])
    return mlo.Graph([inner, outer]), w, th, target


def expected_first_row():
    graph, w, th, target = build()
    w0 = w.detach()
    lam = math.exp(LAM0)
    g = 2 * (w0 - target) + 2 * lam * w0
    w1 = w0 - 0.1 * g
    hg = mlo.hypergradient(graph, "outer")
    return {
        "inner/loss": float(((w0 - target) ** 2).sum() + lam * (w0 ** 2).sum()),
        "inner/grad_norm": float(g.norm()),
        "inner/wnorm": float(w0.norm()),
        "outer/loss": float(((w1 - 1.0) ** 2).sum()),
        "outer/grad_norm": 0.0,  # F does not depend on θ directly
        "outer/hypergrad_norm": float(hg["hyper"].abs()),
    }


KEYS = {"step", "inner/loss", "inner/grad_norm", "inner/wnorm", "outer/loss", "outer/grad_norm",
        "outer/hypergrad_norm"}


def _close(a, b):
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))  # rows are float32


def test_jsonl_and_csv_rows(tmp_path):
    exp = expected_first_row()
    assert exp["outer/hypergrad_norm"] > 0
    graph, _, _, _ = build()
    jpath, cpath = tmp_path / "logs" / "m.jsonl", tmp_path / "logs" / "m.csv"
    jw, cw = mlo.JSONLWriter(jpath), mlo.CSVWriter(cpath)
    runner = mlo.Runner(graph, callbacks=[jw, cw], log_every=2, progress=False)
    last = runner.run(5)
    runner.close()
    rows = [json.loads(line) for line in jpath.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5]  # every 2 steps and the last one
    for r in rows:
        assert set(r) == KEYS
        assert all(math.isfinite(v) for v in r.values())
    assert {k: v for k, v in rows[-1].items() if k != "step"} == last
    with open(cpath, newline="") as f:
        crows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in crows] == [2, 4, 5]
    assert set(crows[0]) == KEYS
    for jr, cr in zip(rows, crows):
        for k in KEYS - {"step"}:
            assert _close(float(cr[k]), jr[k])


def test_first_row_values(tmp_path):
    exp = expected_first_row()
    graph, _, _, _ = build()
    seen = []
    mlo.Runner(graph, callbacks=[lambda step, row: seen.append((step, row))], progress=False).run(1)
    step, row = seen[0]
    assert step == 1 and set(row) == KEYS - {"step"}
    for k, v in exp.items():
        assert _close(row[k], v), (k, row[k], v)


def test_writers_append_on_resume(tmp_path):
    jpath, cpath = tmp_path / "m.jsonl", tmp_path / "m.csv"
    for start, stop in ((0, 2), (2, 4)):  # two runs, as after a restart
        graph, _, _, _ = build()
        jw, cw = mlo.JSONLWriter(jpath), mlo.CSVWriter(cpath)
        runner = mlo.Runner(graph, callbacks=[jw, cw], progress=False)
        runner.stepper.step_count = start
        runner.run(until=stop)
        runner.close()
    assert [json.loads(x)["step"] for x in jpath.read_text().splitlines()] == [1, 2, 3, 4]
    lines = cpath.read_text().splitlines()
    assert lines[0].startswith("step,") and sum(line.startswith("step,") for line in lines) == 1
    assert len(lines) == 5


def test_non_finite_values_are_valid_json(tmp_path):
    path = tmp_path / "m.jsonl"
    w = mlo.JSONLWriter(path)
    w(1, {"a/loss": float("nan"), "a/grad_norm": float("inf"), "a/x": 1.5})
    w.close()
    row = json.loads(path.read_text())
    assert row == {"step": 1, "a/loss": "nan", "a/grad_norm": "inf", "a/x": 1.5}


def test_csv_writer_widens_when_new_keys_appear(tmp_path):
    import csv as _csv
    import mlo as _mlo
    path = tmp_path / "m.csv"
    w = _mlo.CSVWriter(path)
    w(1, {"a/loss": 1.0})
    w(2, {"a/loss": 2.0, "b/loss": 3.0})
    w.close()
    rows = list(_csv.DictReader(open(path)))
    assert list(rows[0]) == ["step", "a/loss", "b/loss"]
    assert rows[0]["b/loss"] == "" and rows[1]["b/loss"] == "3.0" and rows[1]["a/loss"] == "2.0"


def test_allow_unread_and_config_errors_share_a_base():
    import torch as _torch
    import mlo as _mlo
    from applications.common import ConfigError as AppConfigError
    assert issubclass(AppConfigError, _mlo.ConfigError)
    a = _torch.zeros(1, requires_grad=True)
    b = _torch.zeros(1, requires_grad=True)
    pa = _mlo.Problem("a", a, lambda c, x: (c["a"] ** 2).sum(), lambda p: _torch.optim.SGD(p, lr=0.1))
    pb = _mlo.Problem("b", b, lambda c, x: ((c["b"] - c["a"]) ** 2).sum(), lambda p: _torch.optim.SGD(p, lr=0.1),
                      reads=["a"])
    with __import__("pytest").raises(_mlo.GraphError, match="allow_unread"):
        _mlo.Graph([pa, pb])
    _mlo.Graph([pa, pb], allow_unread=["b"])
    assert isinstance(_mlo.engine_from_config({"name": "cg", "iterations": 3}), _mlo.CG)
