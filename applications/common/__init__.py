"""Small helpers shared by every application's command-line program.

- :mod:`.config`: typed dataclass configs from YAML plus ``key.sub=value`` overrides.
- checkpoints: ``mlo.checkpoint``'s atomic files, re-exported here.
- :mod:`.cpu`: one call that puts CPU users on PyTorch's fast path.
- :mod:`.cli`: the flags every program shares (``--config``, ``--set``, ``--out``, ...).
"""

from mlo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .cli import add_common_args, pick_device
from .config import ConfigError, config_to_dict, load_config, save_config
from .cpu import tune_cpu

__all__ = [
    "CheckpointError",
    "ConfigError",
    "add_common_args",
    "config_to_dict",
    "load_checkpoint",
    "load_config",
    "pick_device",
    "save_checkpoint",
    "save_config",
    "tune_cpu",
]
