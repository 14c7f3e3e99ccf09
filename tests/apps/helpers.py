"""Helpers shared by the end-to-end tests of the digits applications."""

from __future__ import annotations

import json
import os

import yaml

OUTPUTS = ("config.yaml", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "result.json")


def tiny(app: str) -> str:
    return repo_path("applications", app, "configs", "tiny.yaml")


def check_outputs(out_dir: str, plot: str) -> dict:
    """The run folder holds every promised file; returns result.json."""
    for name in (*OUTPUTS, plot):
        path = os.path.join(out_dir, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"missing or empty: {name}"
    with open(os.path.join(out_dir, "config.yaml"), encoding="utf-8") as fh:
        assert isinstance(yaml.safe_load(fh), dict)
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert rows and all("arm" in r and "step" in r for r in rows)
    with open(os.path.join(out_dir, "result.json"), encoding="utf-8") as fh:
        return json.load(fh)


def repo_path(*parts: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, *parts)


def doc_code_is_current(doc: str) -> None:
    """Each code block in ``docs/<doc>`` marked ``<!-- code: FILE -->`` must be a verbatim run of FILE's lines."""
    with open(repo_path("docs", doc), encoding="utf-8") as fh:
        text = fh.read()
    marker = "<!-- code: "
    blocks = 0
    for chunk in text.split(marker)[1:]:
        path, rest = chunk.split(" -->", 1)
        code = rest.split("```python\n", 1)[1].split("\n```", 1)[0]
        with open(repo_path(path), encoding="utf-8") as fh:
            source = fh.read()
        assert code in source, f"docs/{doc}: the code block from {path} no longer matches the file"
        blocks += 1
    assert blocks, f"docs/{doc} has no marked code block"
