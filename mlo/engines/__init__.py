"""Hypergradient engines: each is a typed config with one method, ``vjp``."""
from .base import Engine, Site, StepRecord
from .finite_difference import FiniteDifference
from .first_order import FirstOrder
from .implicit import CG, Neumann
from .unrolled import Unrolled

ENGINES = {"first_order": FirstOrder, "unrolled": Unrolled, "finite_difference": FiniteDifference,
           "neumann": Neumann, "cg": CG}


def make_engine(name: str, strict: bool = True, **fields) -> Engine:
    """Build an engine from its name (``"cg"``, ``"neumann"``, ...) and config fields.

    With ``strict=False`` fields the engine does not have are ignored (handy for a
    config section that holds settings for several engines).
    """
    import dataclasses

    from ..errors import ConfigError
    if name not in ENGINES:
        raise ConfigError(f"engine: unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if not strict:
        known = {f.name for f in dataclasses.fields(ENGINES[name])}
        fields = {k: v for k, v in fields.items() if k in known}
    try:
        return ENGINES[name](**fields)
    except TypeError as e:
        valid = [f.name for f in dataclasses.fields(ENGINES[name])]
        raise ConfigError(f"engine {name!r}: {e}; valid fields: {valid}") from None


__all__ = ["Engine", "Site", "StepRecord", "FirstOrder", "Unrolled", "FiniteDifference", "Neumann", "CG",
           "ENGINES", "make_engine"]
