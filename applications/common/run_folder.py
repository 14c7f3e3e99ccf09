"""The run folder every program shares: its flags, new / resume / overwrite, log trimming, errors.

Every command-line program (``lease.search``, ``lease.train``, ``hpo``, ``reweight``,
``ignore``) describes itself as a :class:`Program` and calls :func:`cli_main`. That
gives all of them the same command line::

    --config YAML  --set KEY=VALUE  --out DIR  --resume DIR  --overwrite  --seed N
    --device {auto,cpu,cuda}  --no-progress  --tensorboard  --print-config
    --nproc N    (data-parallel programs only: :mod:`.launch`)

and the same rules for the output folder:

- a new run never writes into a folder that holds another run: it stops with a
  one-line hint (``--resume DIR`` to continue it, ``--overwrite`` to start over);
- ``--overwrite`` first removes the old run's files (only the files runs write);
- ``--resume DIR`` reads ``DIR/config.yaml``; ``--set`` (and ``--seed``, ``--device``,
  ``--no-progress``, ``--tensorboard``) may change values on resume, and the changed
  config is saved back, so the folder always says what ran; ``--config`` and a
  different ``--out`` are refused;
- every bad path or setting is one line on stderr and exit code 2 (under ``torchrun``
  only rank 0 prints it; ``--nproc`` checks it before starting any worker);
- one process at a time: a run holds a lock on its folder (``.run.lock``, released
  when the process ends, also on a crash; a run that ends normally removes the file), so a
  second ``--resume`` or ``--overwrite`` of a run that is still going stops with a one-line
  error instead of writing into it;
- Ctrl-C, ``kill -INT`` and SIGTERM stop every program the same way, however it was
  started: :func:`cli_main` installs its own handlers (:func:`handle_interrupts`), because a
  process started in the background by a script inherits SIGINT *ignored* and Python then
  installs no Ctrl-C handler of its own.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import mlo
import mlo.checkpoint

from . import launch
from .config import ConfigError, config_keys, load_config, save_config
from .cpu import threads_from_free_cores

__all__ = ["LoggingConfig", "Program", "Run", "Interrupted", "RunFailed", "build_parser", "open_run", "cli_main",
           "trim_logs", "one_line", "rank", "pick_device", "handle_interrupts", "restore_handlers", "read_resume"]

CHECKPOINT = "checkpoint.pt"
#: Files (and folders) every run may write; ``--overwrite`` removes these plus the program's own outputs.
RUN_FILES = ("config.yaml", CHECKPOINT, CHECKPOINT + ".prev", CHECKPOINT + ".damaged", "metrics.jsonl",
             "metrics.csv", "result.json", "tensorboard")
LOCK = ".run.lock"
#: Any of these in a folder means it holds a run.
RUN_MARKERS = ("config.yaml", CHECKPOINT, CHECKPOINT + ".prev", "metrics.jsonl", "result.json")
#: The log files a run appends to (``trim_logs`` keeps their rows up to the checkpoint on resume).
LOGS = ("metrics.jsonl", "alphas.jsonl", "metrics.csv")


@dataclass
class LoggingConfig:
    """What a run reports besides ``metrics.jsonl``/``metrics.csv`` (every program has this section)."""

    progress: bool = True        # the progress bar on stderr (--no-progress)
    tensorboard: bool = False    # TensorBoard event files in <out>/tensorboard (--tensorboard; the `logging` extra)

    def validate(self) -> None:
        if self.tensorboard and not mlo.TensorBoardWriter.available():
            raise ConfigError("logging.tensorboard: TensorBoard is not installed; "
                              "install the logging extra: pip install -e '.[logging]'")


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) arrived and the checkpoint has been written; the run can be resumed."""


class RunFailed(Exception):
    """Part of the work failed for a reason the program has reported (exit code 1, one line)."""


@dataclass
class Program:
    """What :func:`cli_main` needs to know about one command-line program."""

    module: str                                  # "applications.hpo": ``python -m <module>``
    config_cls: type                             # the config dataclass (has ``seed`` or ``seeds`` and ``logging``)
    description: str
    default_config: str | None                   # preset used without --config (None: the dataclass defaults)
    default_out: Callable[[Any], str]            # output folder without --out, from the config
    examples: list[str] = field(default_factory=list)   # argument lists shown in --help (tested to be valid)
    outputs: tuple[str, ...] = ()                # the program's own files, removed by --overwrite
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    overrides_from_args: Callable[[argparse.Namespace], list[str]] | None = None  # program flags -> --set items
    data_parallel: bool = False                  # runs under torchrun; offers --nproc N (applications.common.launch)


@dataclass
class Run:
    """A resolved run: its config, folder, device and whether it continues an earlier run."""

    program: Program
    cfg: Any
    out: str
    device: torch.device
    resume: bool = False
    overwrite: bool = False
    args: Any = None                      # the parsed flags (a program's own action flags, e.g. --report-only)
    argv: list[str] = field(default_factory=list)   # the command line as given
    _lock: Any = field(default=None, repr=False)     # the folder's lock while this run holds it (``start``)

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.out, CHECKPOINT)

    def start(self, lock: bool = True) -> None:
        """Create the folder (rank 0), take its lock, remove an old run's files on ``--overwrite``,
        save ``config.yaml``.

        Programs call this once their configuration has passed every check, so a
        rejected config leaves no folder behind. ``lock=False`` for work that only
        reads the run's results (a study's ``--report-only``).
        """
        if rank() != 0:
            return
        os.makedirs(self.out, exist_ok=True)
        if lock and self._lock is None:
            self._lock = lock_folder(self.out)      # before anything in the folder changes
        if self.overwrite:
            remove_run(self.out, self.program.outputs)
        save_config(self.cfg, os.path.join(self.out, "config.yaml"))

    def resume_checkpoint(self, runner: bool = True, logs: tuple[str, ...] = LOGS, main: bool = True):
        """On ``--resume``, what the run continues from (``None`` otherwise): see :func:`read_resume`.

        Rank 0 takes the folder's lock first, so a run that is still going is refused
        (:func:`lock_folder`) before any of its files changes."""
        if not self.resume:
            return None
        if main and rank() == 0 and self._lock is None:
            self._lock = lock_folder(self.out)
        return read_resume(self.out, runner=runner, logs=logs, main=main, say=self.say)

    def release(self) -> None:
        """Give up the folder's lock and remove the lock file (the run is over; :func:`cli_main` calls this)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            unlock_folder(lock)

    def writers(self, jsonl: bool = True, csv_file: bool = True) -> list:
        """The metric writers of this run (rank 0 only): ``metrics.jsonl``, ``metrics.csv``, TensorBoard."""
        if rank() != 0:
            return []
        out = []
        if jsonl:
            out.append(mlo.JSONLWriter(os.path.join(self.out, "metrics.jsonl")))
        if csv_file:
            out.append(mlo.CSVWriter(os.path.join(self.out, "metrics.csv")))
        if self.cfg.logging.tensorboard:
            out.append(mlo.TensorBoardWriter(os.path.join(self.out, "tensorboard")))
        return out

    @property
    def progress(self) -> bool:
        return bool(self.cfg.logging.progress)

    def resume_command(self, processes: int = 1) -> str:
        """The command line that continues this run (``torchrun`` when it ran on several processes)."""
        if processes > 1 and os.environ.get(launch.LAUNCHER_ENV):
            return f"python -m {self.program.module} --nproc {processes} --resume {self.out}"
        if processes > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
            nodes = max(processes // max(local, 1), 1)
            flags = f"--nnodes={nodes} --nproc_per_node={local}" + (" <the same rendezvous flags>" if nodes > 1 else "")
            return f"torchrun {flags} -m {self.program.module} --resume {self.out}"
        return f"python -m {self.program.module} --resume {self.out}"

    def say(self, text: str) -> None:
        """A status line on stderr (rank 0 only)."""
        if rank() == 0:
            print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line


def build_parser(program: Program) -> argparse.ArgumentParser:
    """The shared flags, the program's own, and an epilog listing every config key and the examples."""
    keys = "\n".join(f"  {k} = {json.dumps(v)}" for k, v in config_keys(program.config_cls))
    examples = "\n".join(f"  python -m {program.module} {' '.join(e)}".rstrip() for e in program.examples)
    epilog = (f"examples:\n{examples}\n\n" if examples else "") + \
        f"config keys (YAML, or --set KEY=VALUE; the defaults are shown):\n{keys}"
    parser = argparse.ArgumentParser(prog=f"python -m {program.module}", description=program.description,
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    if program.extra_args is not None:
        program.extra_args(parser)
    add = parser.add_argument
    add("--config", metavar="YAML", help="YAML file with settings (keys it leaves out keep their defaults)")
    add("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="change one setting, e.g. --set " + _example_key(program.config_cls) + " (repeatable; after --config)")
    add("--out", metavar="DIR", help="output folder of a new run (refused if it holds another run)")
    add("--resume", metavar="DIR", help="continue the run in DIR with its saved config (--set may change values)")
    add("--overwrite", action="store_true", help="start over in --out: remove the run that is there first")
    add("--seed", type=int, metavar="N", help="shorthand for --set seed=N")
    add("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to run (auto: cuda if available)")
    add("--no-progress", action="store_true", help="no progress bar (--set logging.progress=false)")
    add("--tensorboard", action="store_true", help="also write TensorBoard logs (--set logging.tensorboard=true)")
    add("--print-config", action="store_true", help="print the resolved configuration (every key) and exit")
    if program.data_parallel:
        add("--nproc", type=int, metavar="N", help="data parallel in N processes on this machine (torchrun's "
                                                   "launcher, one-line errors; docs/distributed.md)")
    return parser


def _example_key(cls: type) -> str:
    for key, value in config_keys(cls):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{key}={value}"
    return "KEY=VALUE"


def _overrides(program: Program, args: argparse.Namespace) -> list[str]:
    """The shorthand flags as ``--set`` items, then the ``--set`` items themselves (which win)."""
    items = list(program.overrides_from_args(args)) if program.overrides_from_args else []
    fields = {f.name for f in dataclasses.fields(program.config_cls)}
    if args.seed is not None:
        items.append(f"seeds=[{args.seed}]" if "seeds" in fields and "seed" not in fields else f"seed={args.seed}")
    if args.device is not None and "device" in fields:
        items.append(f"device={args.device}")
    if args.no_progress:
        items.append("logging.progress=false")
    if args.tensorboard:
        items.append("logging.tensorboard=true")
    return items + list(args.overrides)


def open_run(program: Program, args: argparse.Namespace) -> Run:
    """Resolve config, folder and device from the parsed flags; raise :class:`ConfigError` (one line) on any problem."""
    items = _overrides(program, args)
    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its saved config.yaml; drop --config "
                              "(--set may change a value)")
        if args.overwrite:
            raise ConfigError("--resume continues a run; --overwrite starts one over: choose one")
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ConfigError("--resume writes to the run's own folder; drop --out")
        saved = os.path.join(args.resume, "config.yaml")
        if not os.path.isfile(saved):
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it an output folder of "
                              f"python -m {program.module}?")
        cfg = load_config(program.config_cls, saved, items)
        out = args.resume
    else:
        cfg = load_config(program.config_cls, args.config or program.default_config, items)
        out = args.out or program.default_out(cfg)
    check_writable(out)
    if not args.resume and holds_run(out) and not args.overwrite and not args.print_config:
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out}, "
                          "or start over with --overwrite (removes it), or choose another --out")
    flag = args.device or "auto"
    device = pick_device(flag if flag != "auto" else getattr(cfg, "device", "auto"))
    return Run(program, cfg, out, device, resume=bool(args.resume), overwrite=bool(args.overwrite), args=args)


def lock_folder(folder: str):
    """Hold ``folder``'s run lock for the life of the returned file object (an OS lock: it goes
    when the process ends, however it ends; :func:`unlock_folder` also removes the file). Another
    process holding it is a :class:`ConfigError` naming its pid. Where the OS has no ``fcntl``
    (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    path = os.path.join(folder, LOCK)
    while True:
        fh = open(path, "a+", encoding="ascii")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ConfigError(f"{folder} is in use by another process (pid {holder}); wait for it to finish or "
                              "stop it (it checkpoints on Ctrl-C), then --resume") from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fh.fileno())):
            break
        fh.close()       # the holder removed the file as we opened it: lock the file that is there now
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def unlock_folder(fh) -> None:
    """Remove the lock file, then release the lock (a process that opened the old file then sees it
    is gone and locks a new one: :func:`lock_folder`)."""
    try:
        os.unlink(fh.name)
    except FileNotFoundError:
        pass
    fh.close()


def holds_run(folder: str) -> bool:
    return os.path.isdir(folder) and any(os.path.exists(os.path.join(folder, m)) for m in RUN_MARKERS)


def check_writable(folder: str) -> None:
    """One-line error when ``folder`` cannot be created or written (checked before any work)."""
    path = os.path.abspath(folder)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--out {folder}: cannot create a folder there, {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {folder}: {probe} is not writable")


def remove_run(folder: str, outputs: tuple[str, ...] = ()) -> None:
    """Remove the files a run writes (and checkpoint temp files) from ``folder``; other files stay."""
    if not os.path.isdir(folder):
        return
    for path in mlo.checkpoint.temporary_files(os.path.join(folder, CHECKPOINT)):
        os.unlink(path)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name not in RUN_FILES and name not in outputs:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


# --------------------------------------------------------------------------- resume

def read_resume(folder: str, runner: bool = True, logs: tuple[str, ...] = LOGS, main: bool = True,
                say: Callable[[str], None] | None = None):
    """The checkpoint a resumed run in ``folder`` continues from — every program's one rule.

    ``folder/checkpoint.pt``, or its backup ``.prev`` when the newest file is damaged (a
    warning line says why; with ``main`` the damaged file is set aside so the next save
    does not rotate it into the backup). ``None`` when the run stopped before its first
    checkpoint: it then starts over with its saved config, and ``main`` clears its
    ``logs``. ``runner=True`` reads an ``mlo.Runner`` checkpoint (:class:`mlo.RunCheckpoint`),
    ``False`` a program's own dict. An unreadable checkpoint and backup raise
    ``mlo.CheckpointError`` (one line, exit code 2 in :func:`cli_main`).
    """
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    path = os.path.join(folder, CHECKPOINT)
    if not mlo.has_checkpoint(path):
        say(f"{folder}: no checkpoint yet; starting the run from the beginning with its saved config")
        if main:
            trim_logs(folder, lambda row: False, logs)
        return None
    if runner:
        ckpt = mlo.read_checkpoint(path, set_aside_damaged=main)
        used, reason = ckpt.path, ckpt.fallback_reason
    else:
        ckpt, used, reason = mlo.checkpoint.load_with_fallback(path)
        if reason is not None and main and os.path.exists(path):
            os.replace(path, path + ".damaged")
    if reason is not None:
        say(f"warning: {path} cannot be read ({reason[:200]}); using the previous checkpoint {used}")
    return ckpt


# --------------------------------------------------------------------------- logs on resume


def trim_logs(folder: str, keep: Callable[[dict], bool], names: tuple[str, ...] = LOGS) -> None:
    """Keep only the log rows for which ``keep(row)`` holds (rows written after the checkpoint are redone).

    JSONL rows are dicts; CSV rows become dicts of their header (numbers parsed).
    CSV files are rewritten with the ``csv`` module's own line endings, as the
    writers append them.
    """
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as fh:
                rows = [line for line in fh if line.strip() and keep(json.loads(line))]
            with open(path, "w", encoding="utf-8") as fh:
                fh.writelines(line if line.endswith("\n") else line + "\n" for line in rows)
        else:
            with open(path, newline="", encoding="utf-8") as fh:
                table = list(csv.reader(fh))
            if not table:
                continue
            header, body = table[0], table[1:]
            kept = [r for r in body if keep({k: _number(v) for k, v in zip(header, r)})]
            with open(path, "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([header, *kept])


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


# --------------------------------------------------------------------------- signals


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def handle_interrupts() -> dict:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in this (main) thread, whatever the process
    inherited; returns the previous handlers for :func:`restore_handlers`.

    A process started with ``cmd &`` from a non-interactive shell inherits SIGINT = ignored, and
    Python installs its Ctrl-C handler only where SIGINT was not ignored at start: without this,
    ``kill -INT`` would do nothing to such a process. (``mlo.Runner`` installs its own handlers
    while it steps, so a signal there finishes the step and checkpoints; a child process inherits
    the default action, not these handlers.) Outside the main thread nothing is changed."""
    previous = {}
    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, _raise_interrupt)):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:      # not the main thread
            return previous
    return previous


def restore_handlers(previous: dict) -> None:
    """Put back the handlers :func:`handle_interrupts` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------- main


def rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if text else type(e).__name__


def cli_main(program: Program, body: Callable[[Run], dict], argv: list[str] | None = None) -> int:
    """Parse, resolve and run ``body(run)``; print its result. Exit codes are the same for every program:

    0 done; 1 part of the work failed (:class:`RunFailed`, one line);
    2 bad configuration, path or checkpoint (one line on stderr, nothing trained);
    3 stopped on a non-finite value (the last complete checkpoint is kept); 130 interrupted (resumable).
    Ctrl-C and SIGTERM are handled however the process was started (:func:`handle_interrupts`);
    the handlers that were there before are back when it returns.
    """
    previous = handle_interrupts()
    try:
        return _cli_main(program, body, argv)
    finally:
        restore_handlers(previous)


def _cli_main(program: Program, body: Callable[[Run], dict], argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(program).parse_args(argv)

    def error(e: BaseException) -> int:
        if rank() == 0:
            print(f"error: {one_line(e)}", file=sys.stderr)
        return 2

    nproc = getattr(args, "nproc", None)
    try:
        if nproc is not None and nproc < 1:
            raise ConfigError(f"--nproc {nproc}: need at least 1 process")
        if nproc is not None and launch.under_launcher():
            raise ConfigError("--nproc starts the processes itself; under torchrun drop it")
        run = open_run(program, args)           # in the launching process too: a bad setting starts no workers
        run.argv = argv
    except (ConfigError, mlo.MLOError, ValueError, RuntimeError, OSError) as e:
        return error(e)
    if nproc is not None and nproc > 1 and not args.print_config:
        return launch.launch(program.module, launch.strip_nproc(argv), nproc)
    if args.print_config:
        if rank() == 0:
            import yaml

            from .config import config_to_dict
            print(yaml.safe_dump(config_to_dict(run.cfg), sort_keys=False, default_flow_style=False), end="")
        return 0
    t0 = time.time()
    threads = torch.get_num_threads()
    if run.device.type == "cpu" and not launch.under_launcher():
        threads_from_free_cores()         # OMP_NUM_THREADS, when set, wins (README, "Every program's command line")
    try:
        try:
            result = body(run)
        finally:
            run.release()
            torch.set_num_threads(threads)
    except Interrupted as e:
        run.say(f"\n{e}; checkpoint saved. Continue with:\n  {run.resume_command(getattr(e, 'processes', 1))}")
        return 130
    except KeyboardInterrupt:        # outside a runner's steps (it handles Ctrl-C itself): no checkpoint was cut short
        if os.path.isdir(run.out):
            run.say(f"\ninterrupted. Continue with:\n  {run.resume_command()}")
        return 130
    except mlo.NonFiniteError:
        return 3
    except RunFailed as e:
        if rank() == 0:
            print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except (ConfigError, mlo.MLOError, OSError) as e:
        return error(e)
    if rank() == 0:
        print(json.dumps(result.get("summary", result), indent=1))
        print(f"[{program.module}] done in {time.time() - t0:.0f}s -> {run.out}", file=sys.stderr)
    return 0
