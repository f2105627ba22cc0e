"""The code a notebook teaches is the code the library runs.

A notebook shows the function it teaches in a code cell, marked on the line above its `def` (or
`class`) by a comment naming the library's copy:

    # lesson code: audiokd_lib.compress.distill.distillation_loss
    def distillation_loss(...):

This test finds every marker and checks that the two definitions are the same code (the same syntax
tree: comments and blank lines may differ, nothing else), so a reader who changes one is told to
change the other.
"""

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
MARKER = re.compile(r"^# lesson code: (audiokd_lib(?:\.\w+)+)\.(\w+)\s*$")


def lesson_definitions() -> list[tuple[str, str, str, ast.AST]]:
    """(notebook, module, name, definition) for every marked definition in the notebooks' .py sources."""
    found = []
    for path in sorted(NOTEBOOKS.glob("[0-9]*.py")):
        source = path.read_text()
        lines = source.splitlines()
        defs = {node.lineno: node for node in ast.parse(source).body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        for number, line in enumerate(lines, start=1):
            match = MARKER.match(line)
            if match:
                node = defs.get(number + 1)
                assert node is not None, f"{path.name}:{number}: a lesson-code marker must sit right above a def or class"
                assert node.name == match.group(2), f"{path.name}:{number}: marker names {match.group(2)}, def is {node.name}"
                found.append((path.name, match.group(1), match.group(2), node))
    return found


LESSONS = lesson_definitions()


def test_every_teaching_notebook_shows_its_code():
    shown = {notebook for notebook, *_ in LESSONS}
    assert {"04_student.py", "05_kd.py", "06_pruning.py", "08_separation.py", "09_beats.py", "10_search.py"} <= shown


@pytest.mark.parametrize("notebook, module, name, node", LESSONS, ids=[f"{n}:{name}" for n, _, name, _ in LESSONS])
def test_notebook_code_equals_the_library(notebook, module, name, node):
    library = ast.parse(textwrap.dedent(inspect.getsource(getattr(importlib.import_module(module), name)))).body[0]
    assert ast.dump(node) == ast.dump(library), (
        f"{notebook}: {name} differs from {module}.{name}; change both (the notebook shows the library's code)")
