"""Every module of mlo stays small enough to read at once: none over 300 lines, and the
Stepper (mlo/step.py), where the four moves of a step meet, at most 200."""
import os

from tests.subproc import ROOT

LIMIT, STEP_LIMIT = 300, 200


def _lines(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for _ in fh)


def test_no_mlo_module_is_over_its_line_limit():
    sizes = {}
    for folder, dirs, files in os.walk(os.path.join(ROOT, "mlo")):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                sizes[os.path.relpath(path, ROOT).replace(os.sep, "/")] = _lines(path)
    assert "mlo/step.py" in sizes and len(sizes) > 20
    limits = {name: STEP_LIMIT if name == "mlo/step.py" else LIMIT for name in sizes}
    over = {name: n for name, n in sizes.items() if n > limits[name]}
    assert not over, f"over the line limit ({LIMIT}; mlo/step.py {STEP_LIMIT}): {over}"
