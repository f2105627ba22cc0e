"""The notebooks: .py/.ipynb pairs in sync and clean, and every notebook running under papermill."""

from __future__ import annotations

import json

import jupytext
import nbformat
import pytest
from conftest import ROOT

from audiokd_lib.experiment.pipeline import notebook_names, run_notebooks

NOTEBOOKS = ROOT / "notebooks"


def cell_sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("name", sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")))
def test_pair_in_sync_and_without_outputs(name):
    ipynb = NOTEBOOKS / f"{name}.ipynb"
    assert ipynb.exists(), f"{ipynb} missing: run `make notebooks` (jupytext) to pair {name}.py"
    from_py = jupytext.read(NOTEBOOKS / f"{name}.py")
    paired = nbformat.read(ipynb, as_version=4)
    assert cell_sources(paired) == cell_sources(from_py), f"{name}: .ipynb differs from .py; run `make notebooks`"
    raw = json.loads(ipynb.read_text())
    assert not any(cell.get("outputs") for cell in raw["cells"]), f"{ipynb} carries outputs"
    assert any("parameters" in cell.metadata.get("tags", []) for cell in paired.cells), "no `parameters` cell"


def test_every_notebook_runs_with_the_smoke_profile(smoke_profile):
    """One papermill run of the whole chain, as CI's smoke profile does it."""
    runs = run_notebooks(smoke_profile, log=lambda *_: None)
    assert [r.name for r in runs] == notebook_names()
    outputs = smoke_profile.parent / "outputs"
    assert (outputs / "data" / "clips.csv").exists()
    assert (outputs / "features" / "norm_stats.json").exists()
    assert len(list((outputs / "figures").glob("*.png"))) >= 4
