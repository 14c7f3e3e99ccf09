"""Run a whole program in a child process, so that a native crash fails one test, not the suite.

Tests that drive CLIs or benchmarks end to end use :func:`run_module`; a child that
dies from a signal (a heap corruption abort is SIGABRT) or exits with an unexpected
code fails the test with the tail of its stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict:
    """The test process's environment for a child: one thread, unbuffered, not under torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def describe(returncode: int) -> str:
    """``exit 2`` or ``killed by SIGABRT`` for a child's return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def run_module(module: str, args: list[str], *, expect: int | None = 0, env: dict | None = None,
               timeout: float = 900, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """``python -m module *args`` in a child; asserts its exit code is ``expect`` (None: any non-signal).

    Returns the completed process (``stdout``/``stderr`` as text) for further checks.
    """
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)
    crashed = proc.returncode < 0
    if crashed or (expect is not None and proc.returncode != expect):
        raise AssertionError(f"python -m {module} {' '.join(args)}: {describe(proc.returncode)}"
                             f" (expected exit {expect})\n--- stderr (tail) ---\n{proc.stderr[-4000:]}"
                             f"\n--- stdout (tail) ---\n{proc.stdout[-1500:]}")
    return proc


def popen_module(module: str, args: list[str], *, sigint_ignored: bool = True, env: dict | None = None,
                 cwd: str = ROOT) -> subprocess.Popen:
    """Start ``python -m module *args`` (pipes for stdout/stderr, text) without waiting for it.

    ``sigint_ignored``: start it as ``cmd &`` in a non-interactive shell does, with SIGINT ignored
    (``trap '' INT`` in a shell that then ``exec``s it): a program that promises to stop on Ctrl-C
    or ``kill -INT`` must install its handler itself. The test then does not depend on how the
    test run itself was started."""
    cmd = [sys.executable, "-m", module, *args]
    if sigint_ignored:
        cmd = ["/bin/sh", "-c", "trap '' INT; exec \"$0\" \"$@\"", *cmd]
    return subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
