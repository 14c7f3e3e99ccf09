"""``--nproc N``: start N data-parallel processes of a program on this machine, as torchrun does,
but with the project's error contract.

``torchrun`` ends a failed run with its own traceback and failure table, whatever the
workers printed; a user who mistyped a setting sees one line and then thirty lines
of launcher internals. ``launch`` runs the same elastic launcher in-process
(``torch.distributed.run``, standalone rendezvous) and turns a worker failure into
one line with the exit code of the first failed worker. The program checks its
configuration and folder in the launching process first, so a bad setting starts
no workers at all. For several machines, SLURM or custom rendezvous flags, use
``torchrun`` itself (docs/distributed.md).
"""
from __future__ import annotations

import logging
import os
import sys

#: Set for the workers of ``--nproc``: their resume hint then repeats ``--nproc`` instead of naming torchrun.
LAUNCHER_ENV = "APPLICATIONS_NPROC"


def under_launcher() -> bool:
    """True in a worker that torchrun or ``--nproc`` started."""
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the workers get the rest unchanged)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(module: str, argv: list[str], nproc: int) -> int:
    """Run ``python -m module argv`` in ``nproc`` processes; 0 when all succeed, else the first failure's code.

    Interrupts (Ctrl-C, SIGTERM) reach the workers, which checkpoint and print how
    to continue; the launcher then exits 130 without a traceback of its own.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):         # its warnings repeat what the workers said
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", module, *argv])
    os.environ[LAUNCHER_ENV] = str(nproc)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code in (2, 3, 130):     # the workers' own exit codes: rank 0 has said what happened
            return code
        what = f"exit code {code}" if code >= 0 else f"signal {-code}"
        print(f"error: {len(e.failures)} of {nproc} processes failed; the first was rank {rank} ({what}); "
              "its output is above", file=sys.stderr)
        return 1
    except (SignalException, KeyboardInterrupt):
        return 130
    return 0
