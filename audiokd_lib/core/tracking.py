"""The MLflow store of a profile: one run per trained model, queried for every later table.

Each profile has its own store, ``outputs/<profile>/mlflow.db`` (SQLite) with artifacts under
``outputs/<profile>/mlartifacts``, so a smoke run never mixes into another profile's table. Every run
carries a ``role`` tag (``teacher``, ``student-baseline``, ...; see :data:`ROLE_NOTEBOOKS`):
:func:`runs_frame` lists finished runs as a DataFrame and :func:`latest_run` finds a role's newest one.

A run is reused by its settings: its folder (`outputs/<profile>/models/<name>/`) keeps the key of the
settings it was started with (:func:`settings_key`); :func:`reuse_or_prepare` returns the MLflow row of a
finished run with the same key, or clears a folder whose settings changed; :func:`finish_run` marks it done.
Every trained model of every notebook goes through these, so a second `make run` trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from audiokd_lib.core.files import write_json
from audiokd_lib.core.params import Params

# Which notebook makes the runs of each role: named in the error when a later notebook finds none.
ROLE_NOTEBOOKS = {
    "teacher": "03_teacher",
    "student-baseline": "04_student",
    "student-kd": "05_kd",
    "student-pruned": "06_pruning",
    "student-rekd": "07_rekd",
    "student-finetuned": "07_rekd",
    "separator": "08_separation",
    "detector": "08_separation",
}


BASE_COLUMNS = ["run_id", "run_name", "start_time", "artifact_uri"]


# MLflow rejects parameter values longer than this (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH).
MAX_PARAM_CHARS = 6000


def tracking_uri(params: Params) -> str:
    """The profile's MLflow store: a SQLite file (MLflow 3.17 refuses a plain ./mlruns folder by default)."""
    return f"sqlite:///{(params.output_dir / 'mlflow.db').resolve().as_posix()}"


def experiment_name(params: Params) -> str:
    """One experiment per profile, so the store's UI groups runs the same way."""
    return f"audiokd-{params.profile}"


def _quiet() -> None:
    """Keep database set-up chatter (table creation, schema migrations) out of notebooks."""
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup(params: Params) -> str:
    """Point MLflow at the profile's store, create its experiment when missing, and return its id.

    The experiment is created with an explicit artifact location; otherwise MLflow would put artifacts
    in ./mlartifacts relative to whatever folder the notebook happens to run from.
    """
    _quiet()
    params.output_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(params))
    name = experiment_name(params)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=(params.output_dir / "mlartifacts").as_uri())
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings of limited length."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:MAX_PARAM_CHARS]
    return flat


@contextmanager
def start_run(
    params: Params,
    role: str,
    name: str,
    tags: dict[str, str] | None = None,
    params_file: str | Path | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open a run of `role` in the profile's store, with the whole profile recorded as its params.

    Use as ``with tracking.start_run(params, "student-baseline", "mobilenet_v3_small") as run:``. The
    run ends FINISHED when the block completes and FAILED when it raises, so failed attempts never reach
    the results table. `params_file` (the profile's YAML) is stored as an artifact under ``params/``.
    """
    if params_file is not None and not Path(params_file).is_file():
        raise FileNotFoundError(f"params_file {params_file} does not exist")
    setup(params)
    with mlflow.start_run(run_name=name, tags={"role": role, "profile": params.profile, **(tags or {})}) as run:
        mlflow.log_params(_flatten(params.model_dump()))
        if params_file is not None:
            mlflow.log_artifact(str(params_file), artifact_path="params")
        yield run


def log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """Record one epoch's numbers (losses, validation scores) as points of learning curves."""
    mlflow.log_metrics(metrics, step=epoch)


def log_final(metrics: dict[str, float], prefix: str = "") -> None:
    """Record final scores, each key prefixed (e.g. "test_", "heldout_") to say on which split."""
    mlflow.log_metrics({f"{prefix}{key}": value for key, value in metrics.items()})


def metric_name(key: str) -> str:
    """A score's name as MLflow keeps it ("@" is not allowed: recall@5 is recall_at_5)."""
    return key.replace("@", "_at_")


def log_trained(params: Params, role: str, name: str, task: str, weights: str | Path, history: pd.DataFrame,
                final: dict[str, float], params_file: str | Path | None = None,
                tags: dict[str, str] | None = None, artifacts: list[str | Path] = ()) -> str:
    """One run for a model trained outside the classification runs (notebook 08's separator, notebook 09's
    beat trackers, notebook 10's embedding models): its learning curve (`history`, one row per `epoch`), its
    final scores, its weights file and other `artifacts` (a figure); return the run's id. "@" in a name
    (recall@5) becomes "_at_", which MLflow accepts; NaN scores (not measured) are left out. `tags` are added
    to the run's (e.g. its settings key)."""
    def clean(metrics: dict) -> dict[str, float]:
        return {metric_name(k): float(v) for k, v in metrics.items() if k != "epoch" and v == v}  # not NaN

    with start_run(params, role, name, {"model": name, "task": task, **(tags or {})}, params_file) as run:
        for row in history.to_dict("records"):
            log_epoch(clean(row), int(row["epoch"]))
        log_final(clean(final))
        log_artifacts([weights, *artifacts])
        return run.info.run_id


def add_metrics(params: Params, run_id: str, metrics: dict[str, float]) -> None:
    """Record final scores on a run that already finished (a split measured after it was trained)."""
    setup(params)
    MlflowClient(tracking_uri(params)).log_batch(
        run_id, metrics=[Metric(key, float(value), int(time.time() * 1000), 0) for key, value in metrics.items()])


def log_artifacts(paths: list[str | Path], folder: str | None = None) -> None:
    """Store files (or whole folders) with the active run, under `folder` in its artifacts when given."""
    for path in map(Path, paths):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{folder}/{path.name}" if folder else path.name)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=folder)
        else:
            raise FileNotFoundError(f"cannot log artifact {path}: no such file or folder")


def _rename(column: str) -> str | None:
    """Short column names for the runs table; None drops MLflow's own bookkeeping tags."""
    if column == "tags.mlflow.runName":
        return "run_name"
    if column.startswith("tags.mlflow."):
        return None
    if column.startswith("metrics."):
        return column.removeprefix("metrics.")
    if column.startswith("tags."):
        return column.removeprefix("tags.")
    if column.startswith("params."):
        return "param." + column.removeprefix("params.")
    return column


def runs_frame(params: Params, role: str | None = None, finished_only: bool = True) -> pd.DataFrame:
    """All runs of the profile (or of one role) as a table, newest first.

    Columns: run_id, run_name, start_time, artifact_uri, status, ...; then tags (role, profile, ...) and
    metrics under their own names, and params as "param.<dotted key>". A profile with no store or no
    runs yet gives an empty table with the base columns.
    """
    empty = pd.DataFrame(columns=BASE_COLUMNS)
    if not (params.output_dir / "mlflow.db").is_file():
        return empty
    _quiet()
    mlflow.set_tracking_uri(tracking_uri(params))
    experiment = mlflow.get_experiment_by_name(experiment_name(params))
    if experiment is None:
        return empty
    filters = []
    if role is not None:
        if "'" in role:
            raise ValueError(f"role {role!r} must not contain a quote")
        filters.append(f"tags.role = '{role}'")
    if finished_only:
        filters.append("attributes.status = 'FINISHED'")
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=" and ".join(filters),
        order_by=["attributes.start_time DESC"],
    )
    if runs.empty:
        return empty
    renamed = {column: _rename(column) for column in runs.columns}
    runs = runs[[column for column, new in renamed.items() if new is not None]].rename(columns=renamed)
    duplicated = runs.columns[runs.columns.duplicated()].tolist()
    if duplicated:
        raise ValueError(f"a tag and a metric share the name(s) {duplicated}: rename one of them")
    return runs[BASE_COLUMNS + [column for column in runs.columns if column not in BASE_COLUMNS]].reset_index(
        drop=True
    )


def latest_run(params: Params, role: str) -> pd.Series:
    """The newest finished run of `role`; LookupError saying what exists and what to run when there is none."""
    runs = runs_frame(params, role=role)
    if not runs.empty:
        return runs.iloc[0]
    everything = runs_frame(params)
    roles = sorted(everything["role"].dropna().unique()) if "role" in everything else []
    notebook = ROLE_NOTEBOOKS.get(role)
    hint = f"run notebook {notebook} with this profile first" if notebook else "no notebook makes this role"
    raise LookupError(
        f"no finished run with role '{role}' in {tracking_uri(params)} (experiment {experiment_name(params)}); "
        f"roles present: {roles or 'none'}; {hint}"
    )


def artifact_path(run: pd.Series, relative: str) -> Path:
    """Local path of one artifact of a run (a row of :func:`runs_frame`), e.g. "model/student.pt"."""
    uri = urlparse(run["artifact_uri"])
    if uri.scheme != "file":
        raise ValueError(f"artifacts of run {run['run_id']} are at {run['artifact_uri']}, not on this machine")
    root = Path(url2pathname(uri.path))  # undoes the %-escapes of as_uri()
    path = root / relative
    if not path.exists():
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        raise FileNotFoundError(f"run {run['run_id']} has no artifact '{relative}'; it has: {present or 'none'}")
    return path


def settings_key(settings: dict) -> str:
    """A short hash of a run's settings (plain values): equal keys, the same run."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reuse_or_prepare(params: Params, role: str, name: str, key: str, run_dir: Path,
                     done_marker: Path | None = None) -> pd.Series | None:
    """The MLflow row of the finished run `name` if it had settings `key`, else None after clearing a run
    folder whose settings changed (an interrupted run with the same key keeps its `last.pt` and resumes).

    `done_marker`: a file the finished run must still have (its weights) to be reused.
    """
    done_file = run_dir / "done.json"
    if done_file.is_file() and (done_marker is None or done_marker.is_file()):
        done = json.loads(done_file.read_text())
        runs = runs_frame(params, role)
        found = runs[runs["run_id"] == done.get("run_id")] if done.get("key") == key else runs.iloc[:0]
        if len(found):
            print(f"{name}: already trained with these settings (MLflow run {done['run_id'][:8]}); reusing it")
            return found.set_index("run_id", drop=False).iloc[0]
    if (run_dir / "key.txt").is_file() and (run_dir / "key.txt").read_text() != key:
        print(f"{name}: settings changed since the last run; starting it again")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "key.txt").write_text(key)
    return None


def finish_run(params: Params, role: str, run_dir: Path, run_id: str) -> pd.Series:
    """Mark the run folder done (for reuse), drop its last.pt (the best weights are saved), and return the
    run's MLflow row."""
    write_json(run_dir / "done.json", {"key": (run_dir / "key.txt").read_text(), "run_id": run_id})
    (run_dir / "last.pt").unlink(missing_ok=True)
    return runs_frame(params, role).set_index("run_id", drop=False).loc[run_id].rename(run_id)
