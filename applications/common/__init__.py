"""Small helpers shared by every application's command-line program.

- :mod:`.config`: typed dataclass configs from YAML plus ``key.sub=value`` overrides.
- checkpoints: ``mlo.checkpoint``'s atomic files, re-exported here.
- :mod:`.cpu`: one call that puts CPU users on PyTorch's fast path.
- :mod:`.run_folder`: every program's command line and output folder (flags, resume, overwrite).
"""

from mlo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .config import ConfigError, config_to_dict, load_config, save_config
from .cpu import tune_cpu
from .run_folder import pick_device

__all__ = [
    "CheckpointError",
    "ConfigError",
    "config_to_dict",
    "load_checkpoint",
    "load_config",
    "pick_device",
    "save_checkpoint",
    "save_config",
    "tune_cpu",
]
