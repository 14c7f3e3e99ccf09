"""Metric sinks (JSONL, CSV, TensorBoard) and a progress bar.

A sink is any callable ``sink(step, row)`` with ``row`` a flat ``dict[str, float]``;
``close()`` is called at the end if present.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time

import torch


def flatten(metrics: dict[str, dict]) -> dict[str, float]:
    """``{problem: {key: tensor}}`` -> ``{"problem/key": float}`` with one host sync."""
    keys, vals = [], []
    for prob, m in metrics.items():
        for k, v in m.items():
            if k.startswith("_"):
                continue
            keys.append(f"{prob}/{k}")
            vals.append(v.detach().float().reshape(()).cpu() if isinstance(v, torch.Tensor)
                        else torch.tensor(float(v)))
    if not vals:
        return {}
    return dict(zip(keys, torch.stack(vals).tolist()))


class JSONLWriter:
    """One JSON object per logged step; appends, so resumed runs continue the file."""

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, step: int, row: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CSVWriter:
    """CSV of logged rows; when a row brings new keys the file is rewritten with the union of columns."""

    def __init__(self, path: str | os.PathLike):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        exists = os.path.exists(path) and os.path.getsize(path) > 0
        self.fields = None
        if exists:
            with open(path, newline="", encoding="utf-8") as f:
                self.fields = next(csv.reader(f), None)
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.writer = (csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore", restval="")
                       if self.fields else None)

    def __call__(self, step: int, row: dict) -> None:
        row = {"step": step, **row}
        if self.writer is None:
            self.fields = list(row)
            self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore", restval="")
            self.writer.writeheader()
        elif any(k not in self.fields for k in row):
            self._widen([k for k in row if k not in self.fields])
        self.writer.writerow(row)
        self.file.flush()

    def _widen(self, new_keys: list[str]) -> None:
        path = self.file.name
        self.file.close()
        with open(path, newline="", encoding="utf-8") as f:
            old_rows = list(csv.DictReader(f))
        self.fields = self.fields + new_keys
        self.file = open(path, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields, extrasaction="ignore", restval="")
        self.writer.writeheader()
        self.writer.writerows(old_rows)

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """Scalars to TensorBoard; ``TensorBoardWriter.available()`` says if it can run."""

    @staticmethod
    def available() -> bool:
        try:
            import tensorboard  # noqa: F401
            return True
        except ImportError:
            return False

    def __init__(self, logdir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=os.fspath(logdir))

    def __call__(self, step: int, row: dict) -> None:
        for k, v in row.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class ProgressBar:
    """A one-line progress bar with rate, ETA and chosen metrics (to stderr)."""

    def __init__(self, total: int, start: int = 0, keys: list[str] | None = None, stream=None, width: int = 24):
        self.total, self.start, self.keys, self.width = total, start, keys, width
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_print = 0.0

    def __call__(self, step: int, row: dict) -> None:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        frac = step / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        keys = self.keys if self.keys is not None else [k for k in row if k.endswith("/loss")]
        shown = " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)
        line = f"[{bar}] {step}/{self.total} {rate:.2f} it/s ETA {_fmt(eta)} {shown}"
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + line[:200])
            if step >= self.total:
                self.stream.write("\n")
        elif step >= self.total or now - self.last_print > 10 or done == 1:
            self.stream.write(line + "\n")
            self.last_print = now
        self.stream.flush()


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
