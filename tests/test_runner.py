"""The papermill runner: order, a clear stop at the first failure, and resuming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import nbformat
import pandas as pd
import pytest
from conftest import ROOT, write_profile

from audiokd_lib.cli import main
from audiokd_lib.core.params import load_params
from audiokd_lib.experiment import results
from audiokd_lib.experiment.pipeline import NotebookFailed, run_notebooks, select_notebooks


def make_notebook(folder, name, code):
    cells = [nbformat.v4.new_code_cell('params_file = "params/quick.yaml"', metadata={"tags": ["parameters"]}),
             nbformat.v4.new_code_cell(code)]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / f"{name}.ipynb")


@pytest.fixture
def chain(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    make_notebook(notebooks, "01_ok", "print('one', params_file)")
    make_notebook(notebooks, "02_fails", "x = 1\nraise ValueError('the clip table is empty')")
    make_notebook(notebooks, "03_after", "print('three')")
    profile = write_profile(tmp_path, f"profile: chain\noutputs: {tmp_path / 'out'}\n")
    return notebooks, profile, tmp_path / "out" / "notebooks"


def test_failure_stops_the_chain_naming_notebook_and_cell(chain):
    notebooks, profile, out = chain
    with pytest.raises(NotebookFailed) as info:
        run_notebooks(profile, notebooks_dir=notebooks, log=lambda *_: None)
    message = str(info.value)
    assert "notebook 02_fails failed in cell" in message
    assert "x = 1" in message and "ValueError: the clip table is empty" in message
    assert "--from 02_fails" in message
    assert (out / "01_ok.ipynb").exists() and (out / "02_fails.ipynb").exists()
    assert not (out / "03_after.ipynb").exists()
    # The executed copy received the profile's parameters.
    executed = nbformat.read(out / "01_ok.ipynb", as_version=4)
    assert str(profile) in executed.cells[2]["outputs"][0]["text"]


def test_resume_from_a_notebook(chain):
    notebooks, profile, out = chain
    make_notebook(notebooks, "02_fails", "print('fixed')")
    runs = run_notebooks(profile, start="02", notebooks_dir=notebooks, log=lambda *_: None)
    assert [r.name for r in runs] == ["02_fails", "03_after"]
    assert not (out / "01_ok.ipynb").exists()
    assert (out.parent / "run_times.csv").read_text().count("\n") == 3


def test_selection_rejects_unknown_names():
    available = ["01_data", "02_features"]
    assert select_notebooks(available, "all", "02_features") == ["02_features"]
    with pytest.raises(ValueError, match="unknown notebook"):
        select_notebooks(available, ["01_data", "09_nope"], None)
    with pytest.raises(ValueError, match="matches none"):
        select_notebooks(available, "all", "07")


def test_cli_reports_a_bad_params_file(tmp_path, capsys):
    bad = write_profile(tmp_path, "profile: x\ndata: {dataset: nope}\n")
    assert main(["run", "--params", str(bad)]) == 1
    assert "data.dataset" in capsys.readouterr().err


def test_make_lab_passes_allow_root_only_to_root():
    """Jupyter refuses to start as root without --allow-root (containers, cloud notebooks)."""
    import os
    import subprocess

    from conftest import ROOT

    dry = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    [lab] = [line for line in dry.splitlines() if "jupyter lab" in line]
    assert ("--allow-root" in lab) == (os.getuid() == 0) and "--ip 127.0.0.1" in lab


def test_report_writes_each_executed_notebook_as_a_page(tmp_path, capsys):
    import nbformat
    from conftest import ROOT, write_profile

    from audiokd_lib.cli import main
    from audiokd_lib.core.params import load_params
    from audiokd_lib.experiment.pipeline import write_report

    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'out'}\n")
    assert main(["report", "--profile", str(profile)]) == 1
    assert "no executed notebooks" in capsys.readouterr().err
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("player")
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "text/html": '<audio controls="controls"><source src="data:audio/wav;base64,UklGRg==" type="audio/wav"/></audio>',
        "text/plain": "<IPython.lib.display.Audio object>"})]
    notebook.cells = [nbformat.v4.new_markdown_cell("# A player"), cell]
    executed = load_params(profile).output_dir / "notebooks"
    executed.mkdir(parents=True)
    nbformat.write(notebook, executed / "08_separation.ipynb")
    [page] = write_report(load_params(profile))
    assert page == tmp_path / "out" / "report" / "08_separation.html"
    html = page.read_text()
    assert "<audio" in html and "data:audio/wav;base64" in html and "A player" in html


@pytest.mark.slow
def test_a_chain_killed_while_05_trains_finishes_with_the_same_table(tmp_path, smoke_chain):
    """`make run` killed with SIGKILL (its whole process group) once notebook 05 has written a last.pt, then
    started again, ends with the same scores as 05's runs trained without interruption (the smoke chain's,
    same settings, same machine)."""
    notebooks = "[01_data, 02_features, 03_teacher, 04_student, 05_kd]"
    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'out'}\n"
                                      f"notebooks: {notebooks}\n", "smoke")
    params = load_params(profile)
    command = [sys.executable, "-m", "audiokd_lib", "run", "--params", str(profile)]
    chain = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    models, started = params.output_dir / "models", time.monotonic()
    try:
        while not any(models.glob("student-kd-*/last.pt")):
            assert chain.poll() is None and time.monotonic() - started < 600, "05 never wrote a last.pt"
            time.sleep(0.1)
    finally:
        os.killpg(chain.pid, signal.SIGKILL)
        chain.wait()
    assert not (models / "student-kd-cached-seed0" / "done.json").exists(), "killed too late to test a resume"

    def written() -> dict:
        return {path: path.stat().st_mtime_ns for path in models.glob("student-kd-*/*")}

    # Nothing trains on once the chain is dead: its kernel (within a second) and the kernel's worker processes
    # die with it; the workers once went on, orphaned, writing into the folders the next run resumes from.
    time.sleep(2)
    before = written()
    time.sleep(10)
    assert written() == before

    def scores(params) -> pd.DataFrame:
        table = results.results_table(params, ["student-kd"]).set_index("model").sort_index()
        return table[[c for c in table if "acc" in c or "F1" in c]]

    subprocess.run([*command, "--from", "05"], cwd=ROOT, check=True, capture_output=True)  # started again
    pd.testing.assert_frame_equal(scores(params), scores(load_params(smoke_chain[0])), atol=1e-6)
