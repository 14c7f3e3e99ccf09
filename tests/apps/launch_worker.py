"""A worker for the ``--nproc`` launcher tests (not collected): ``python -m tests.apps.launch_worker CODE``
says on rank 0 that it fails, then every process exits with CODE (a program's own exit codes are
2, 3 and 130; anything else is a crash the launcher summarises)."""
import os
import sys

if __name__ == "__main__":
    code = int(sys.argv[1])
    if os.environ.get("RANK") == "0":
        print(f"error: worker says no ({code})", file=sys.stderr, flush=True)
    sys.exit(code)
