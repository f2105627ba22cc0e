"""Run the course's notebooks in order with papermill, from one parameter file.

Each notebook has a cell tagged `parameters` holding `params_file`; papermill injects the chosen
profile's file after it. Executed copies (with their outputs) go to outputs/<profile>/notebooks/;
the reviewed sources in notebooks/ are never touched. The chain stops at the first failing
notebook, names the notebook and the cell, and says how to resume from there.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import papermill

from audiokd_lib.core.files import atomic_path, project_root, write_csv
from audiokd_lib.core.params import Params, load_params

KERNEL = "python3"


class NotebookFailed(RuntimeError):
    """A notebook that raised, with the notebook, the cell and the way to resume named."""


@dataclass
class NotebookRun:
    name: str
    seconds: float
    output: Path


def notebook_names(folder: Path | None = None) -> list[str]:
    """The numbered notebooks (01_data, 02_features, ...) in course order."""
    folder = folder or project_root() / "notebooks"
    return sorted(p.stem for p in folder.glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(available: list[str], wanted: list[str] | str, start: str | None) -> list[str]:
    """Pick the notebooks to run: the profile's list (or all), from `start` on."""
    names = available if wanted == "all" else list(wanted)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown} in the profile's `notebooks`; available: {available}")
    if start is not None:
        matches = [n for n in names if n == start or n.startswith(f"{start}_") or n.split("_", 1)[0] == start]
        if not matches:
            raise ValueError(f"--from {start!r} matches none of {names}")
        names = names[names.index(matches[0]):]
    return names


def _failure_message(name: str, params_file: Path, output: Path, err: Exception) -> str:
    where = "a cell"
    if isinstance(err, papermill.PapermillExecutionError):
        first_line = next((line for line in err.source.splitlines() if line.strip()), "")
        where = f"cell {err.exec_count} (`{first_line[:80]}`)"
        detail = f"{err.ename}: {err.evalue}"
    else:
        detail = f"{type(err).__name__}: {err}"
    return (
        f"notebook {name} failed in {where}: {detail}\n"
        f"  executed copy with the traceback: {output}\n"
        f"  resume after fixing: python -m audiokd_lib run --params {params_file} --from {name}"
    )


def run_notebooks(params_file: str | Path, start: str | None = None, notebooks_dir: Path | None = None,
                  log=print) -> list[NotebookRun]:
    """Execute the profile's notebooks in order; raise NotebookFailed at the first error."""
    params = load_params(params_file)
    params_file = Path(params_file).resolve() if Path(params_file).exists() else project_root() / params_file
    notebooks_dir = notebooks_dir or project_root() / "notebooks"
    names = select_notebooks(notebook_names(notebooks_dir), params.notebooks, start)
    out_dir = params.output_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Kernels inherit this: one OpenMP thread pool that waits passively (see docs/measurements.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runs: list[NotebookRun] = []
    log(f"profile {params.profile}: {len(names)} notebook(s) -> {out_dir}")
    for name in names:
        output = out_dir / f"{name}.ipynb"
        started = time.perf_counter()
        log(f"  {name} ...")
        try:
            papermill.execute_notebook(
                str(notebooks_dir / f"{name}.ipynb"),
                str(output),
                parameters={"params_file": str(params_file)},
                kernel_name=KERNEL,
                cwd=str(notebooks_dir),
                progress_bar=False,
                # The kernel's own log: at WARNING it says "Kernel is running over TCP without encryption"
                # for every notebook, about a local kernel on 127.0.0.1 that nobody else can reach.
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
        except Exception as err:  # papermill raises its own error for cell failures, others for kernels
            raise NotebookFailed(_failure_message(name, params_file, output, err)) from err
        runs.append(NotebookRun(name, time.perf_counter() - started, output))
        log(f"  {name} done in {runs[-1].seconds:.0f} s")
        _save_times(params.output_dir / "run_times.csv", runs)
    log(f"total {sum(r.seconds for r in runs):.0f} s")
    return runs


def _save_times(path: Path, runs: list[NotebookRun]) -> None:
    # Merge with earlier runs so a resumed chain still has every notebook's latest time.
    frame = pd.DataFrame([{"notebook": r.name, "seconds": round(r.seconds, 1)} for r in runs])
    if path.exists():
        old = pd.read_csv(path)
        frame = pd.concat([old[~old["notebook"].isin(frame["notebook"])], frame]).sort_values("notebook")
    write_csv(path, frame)


REPORT_TEMPLATES = Path(__file__).resolve().parents[1] / "report_template"
# MathJax 2.7 as Jupyter's own package serves it offline (jupyter-server-mathjax), with the configuration
# the notebook pages use by default.
MATHJAX_URL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"


def write_report(params: Params) -> list[Path]:
    """Every executed notebook of a profile as an HTML page under outputs/<profile>/report/, readable offline.

    nbconvert's JupyterLab page with the outputs as they ran: tables, figures (embedded), the audio
    players (HTML <audio> elements with their sound inside). Nothing is fetched from the internet: the
    `offline` template drops the CDN scripts (require.js, the widget renderer), and MathJax is copied
    beside the pages, so the folder can be opened or served anywhere. Widgets stay blank; notebook 08
    draws its players as plain HTML too.
    """
    import jupyter_server_mathjax
    from nbconvert import HTMLExporter

    executed = sorted((params.output_dir / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise FileNotFoundError(f"{params.output_dir / 'notebooks'}: no executed notebooks; run the profile first "
                                f"(make run PROFILE={params.profile})")
    folder = params.output_dir / "report"
    mathjax = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(mathjax, folder / "mathjax", dirs_exist_ok=True)
    exporter = HTMLExporter(template_name="offline", extra_template_basedirs=[str(REPORT_TEMPLATES)],
                            mathjax_url=MATHJAX_URL)
    pages = []
    for notebook in executed:
        body, _ = exporter.from_filename(str(notebook))
        with atomic_path(folder / f"{notebook.stem}.html") as tmp:
            tmp.write_text(body, encoding="utf-8")
        pages.append(folder / f"{notebook.stem}.html")
    return pages
