"""The package's layers import downward only: a module may import its own layer and those below it.

core (settings, metrics, losses, files, the epoch loop, MLflow)      <- everything stands on it
audio, data, models                                                 <- what every task is made of
compress, separation, beats, search, classify, training             <- the course's tasks
experiment, cli                                                     <- orchestration: runs, report, notebooks
"""

import ast
from pathlib import Path

LAYERS = [{"core"}, {"audio", "data", "models"},
          {"compress", "separation", "beats", "search", "classify", "training"},
          {"experiment", "cli", "__main__"}]
PACKAGE = Path(__file__).resolve().parent.parent / "audiokd_lib"


def layer_of(module: str) -> int:
    """The layer of `audiokd_lib.<part>...` (the package itself, `audiokd_lib`, is the bottom)."""
    part = module.split(".")[1] if "." in module else "core"
    return next(i for i, names in enumerate(LAYERS) if part in names)


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """Every import, at any depth of a module (function-level ones too), of a higher layer than its own."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("audiokd_lib"):
                targets = ([node.module] if node.module != "audiokd_lib"
                           else [f"audiokd_lib.{alias.name}" for alias in node.names])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("audiokd_lib")]
            else:
                continue
            found += [f"{module} imports {t} (line {node.lineno})" for t in targets if layer_of(t) > layer_of(module)]
    return found


def test_every_module_has_a_layer():
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert parts - {"__init__"} <= set().union(*LAYERS), "add the new part of audiokd_lib to a layer in LAYERS"


def test_layers_import_downward_only():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    for part in ("core", "experiment"):
        (tmp_path / "audiokd_lib" / part).mkdir(parents=True)
    (tmp_path / "audiokd_lib" / "experiment" / "runs.py").write_text("from audiokd_lib.core import params\n")
    (tmp_path / "audiokd_lib" / "core" / "metrics.py").write_text(
        "def f():\n    from audiokd_lib.experiment import runs\n")
    assert upward_imports(tmp_path / "audiokd_lib") == [
        "audiokd_lib.core.metrics imports audiokd_lib.experiment (line 2)"]

