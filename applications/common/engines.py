"""Engine settings in application configs: one mapping ``{"name": ..., <field>: value}`` parsed by mlo.

Every application config holds an engine as :data:`EngineSpec` (a name, or a mapping
with ``name`` and any field of that engine) and hands it to mlo's one parser, so every
engine option is reachable from YAML and ``--set engines.<edge>.<field>=value``, the
defaults are mlo's own, and an unknown name or field is a one-line error naming the key.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Union

import mlo

__all__ = ["EngineSpec", "engine_field", "resolve_engine", "build_engine"]

#: A config field type: ``"cg"`` or ``{"name": "cg", "iterations": 20}``.
EngineSpec = Union[dict[str, Any], str]


def engine_field(name: str, **fields: Any):
    """A dataclass field holding the engine ``name`` (fields left out keep mlo's defaults)."""
    return field(default_factory=lambda: {"name": name, **fields})


def resolve_engine(spec: EngineSpec, where: str) -> dict:
    """``spec`` with every field of its engine filled in (what ``--print-config`` and config.yaml show)."""
    return mlo.engine_to_config(mlo.engine_from_config(spec, where=where))


def build_engine(spec: EngineSpec, where: str = "engine") -> mlo.Engine:
    return mlo.engine_from_config(spec, where=where)
