"""The tiny LeaSE search every end-to-end test runs (seconds on one CPU thread).

:func:`search_args` gives the ``--set`` flags for ``python -m applications.lease.search``:
two epochs of five steps, the architecture learning from the first step, a 2-node
supernet with C=2 and the narrowest audience, a quarter of the digits. Tests add
``--out`` and what they vary. Every end-to-end search in the tests starts from these
settings (the study's searches, crash safety, data parallel), so "tiny" means one thing.
"""

SETTINGS = {"epochs": 2, "arch_start_epoch": 0, "max_steps_per_epoch": 5, "space.C": 2, "space.nodes": 2,
            "audience.width": 0.0625, "data.subset_fraction": 0.25, "log_every": 1, "checkpoint_every": 2,
            "data.batch_size": 16}


def search_args(flag: str = "--set", cpu: bool = True, **changes) -> list[str]:
    """``--set key=value`` for every tiny setting (``changes`` override or add, dots as ``__``), then
    ``--device cpu --no-progress`` (``cpu=False``: without them). ``flag="--search-set"``: the same
    settings for the searches of a study."""
    settings = {**SETTINGS, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [a for k, v in settings.items() for a in (flag, f"{k}={v}")] + \
        (["--device", "cpu", "--no-progress"] if cpu else [])
