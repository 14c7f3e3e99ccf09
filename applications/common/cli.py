"""Command-line flags every application program shares, and device selection."""

from __future__ import annotations

import argparse

import torch

__all__ = ["add_common_args", "pick_device"]


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config``, ``--set KEY=VALUE`` (repeatable), ``--out``, ``--resume`` and ``--device``.

    ``--set`` values land in ``args.overrides`` (a list, possibly empty), ready for
    :func:`applications.common.config.load_config`.
    """
    parser.add_argument("--config", metavar="YAML", default=None, help="YAML file with settings (defaults are used for keys it leaves out)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one setting, e.g. --set train.lr=0.01 (repeatable; applied after --config)",
    )
    parser.add_argument("--out", metavar="DIR", default=None, help="output folder (created if missing)")
    parser.add_argument("--resume", metavar="DIR", default=None, help="continue the run saved in DIR")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (auto: cuda if available)")
    return parser


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)
