"""Tests for audiokd_lib.tracking: runs go into the profile's own store and come back as a table.

Creating an MLflow SQLite store takes several seconds, so one store is shared by the whole module.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, write_profile
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from audiokd_lib.core import tracking
from audiokd_lib.core.params import Params, load_params


def profile_in(folder: Path, name: str = "smoke") -> tuple[Params, Path]:
    """The smoke profile with its outputs under `folder`, and its YAML file."""
    text = f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {folder / 'outputs'}\n"
    path = write_profile(folder, text, name)
    return load_params(path), path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store: students s1 (curves, scores, artifacts) and s2, teacher t1, and a failed student run."""
    folder = tmp_path_factory.mktemp("tracking")
    params, params_file = profile_in(folder)
    weights = folder / "weights.txt"
    weights.write_text("not really weights")
    with tracking.start_run(params, "student-baseline", "s1", tags={"teacher": "none"}, params_file=params_file):
        for epoch, loss in enumerate([1.0, 0.5]):
            tracking.log_epoch({"train_loss": loss, "val_accuracy": 0.4 + epoch / 10}, epoch)
        tracking.log_final({"accuracy": 0.75, "macro_f1": 0.7}, prefix="test_")
        tracking.log_artifacts([weights], folder="model")
    with tracking.start_run(params, "teacher", "t1"):
        tracking.log_final({"accuracy": 0.9}, prefix="test_")
    with tracking.start_run(params, "student-baseline", "s2"):
        tracking.log_final({"accuracy": 0.8}, prefix="test_")
    with pytest.raises(RuntimeError, match="boom"), tracking.start_run(params, "student-baseline", "broken"):
        raise RuntimeError("boom")
    return params


def test_store_and_experiment_belong_to_the_profile(store):
    assert tracking.tracking_uri(store) == f"sqlite:///{(store.output_dir / 'mlflow.db').resolve().as_posix()}"
    assert tracking.experiment_name(store) == "audiokd-smoke"
    assert (store.output_dir / "mlflow.db").is_file()
    experiment = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(store)).get_experiment_by_name("audiokd-smoke")
    assert experiment.artifact_location == (store.output_dir / "mlartifacts").as_uri()


def test_runs_frame_filters_by_role_newest_first(store):
    students = tracking.runs_frame(store, role="student-baseline")
    assert students["run_name"].tolist() == ["s2", "s1"]  # "broken" failed, so it is left out
    assert list(students.columns[:4]) == tracking.BASE_COLUMNS
    assert students["start_time"].is_monotonic_decreasing
    s1 = students.set_index("run_name").loc["s1"]
    assert s1["test_accuracy"] == 0.75 and s1["val_accuracy"] == pytest.approx(0.5)  # last epoch's value
    assert s1["role"] == "student-baseline" and s1["profile"] == "smoke" and s1["teacher"] == "none"
    assert s1["param.seed"] == str(store.seed)
    assert s1["param.features.n_mels"] == str(store.features.n_mels)
    assert not any(column.startswith(("metrics.", "tags.", "params.", "mlflow.")) for column in students.columns)
    assert tracking.runs_frame(store, role="teacher")["run_name"].tolist() == ["t1"]


def test_failed_run_is_recorded_but_excluded_by_default(store):
    everything = tracking.runs_frame(store, finished_only=False)
    broken = everything.set_index("run_name").loc["broken"]
    assert broken["status"] == "FAILED"
    assert "broken" not in tracking.runs_frame(store)["run_name"].tolist()


def test_epoch_metrics_are_kept_as_curves(store):
    s1 = tracking.runs_frame(store, role="student-baseline").set_index("run_name").loc["s1"]
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(store))
    assert [(m.step, m.value) for m in client.get_metric_history(s1["run_id"], "train_loss")] == [(0, 1.0), (1, 0.5)]


def test_latest_run_and_its_artifacts(store):
    assert tracking.latest_run(store, "student-baseline")["run_name"] == "s2"
    s1 = tracking.runs_frame(store, role="student-baseline").set_index("run_name").loc["s1"]
    assert tracking.artifact_path(s1, "model/weights.txt").read_text() == "not really weights"
    assert tracking.artifact_path(s1, "params/smoke.yaml").is_file()
    with pytest.raises(FileNotFoundError, match=r"model/weights\.txt"):
        tracking.artifact_path(s1, "model/missing.pt")


def test_latest_run_of_a_missing_role_names_what_exists(store):
    with pytest.raises(LookupError, match=r"'student-kd'.*mlflow\.db.*\['student-baseline', 'teacher'\].*05_kd"):
        tracking.latest_run(store, "student-kd")


def test_no_store_or_no_experiment_gives_an_empty_frame(store, tmp_path):
    params, _ = profile_in(tmp_path)
    frame = tracking.runs_frame(params)
    assert frame.empty and list(frame.columns) == tracking.BASE_COLUMNS
    assert not (params.output_dir / "mlflow.db").exists()  # asking does not create a store
    # Same store, another profile name: the experiment does not exist yet.
    other, _ = profile_in(store.output_dir.parent, "other")
    assert other.output_dir == store.output_dir.parent / "outputs"
    assert tracking.runs_frame(other).empty
    with pytest.raises(LookupError, match="roles present: none"):
        tracking.latest_run(other, "student-baseline")


def test_param_values_are_cut_to_mlflows_limit():
    assert tracking.MAX_PARAM_CHARS == MAX_PARAM_VAL_LENGTH
    assert tracking._flatten({"a": {"b": "x" * 7000, "c": [1, 2]}}) == {"a.b": "x" * 6000, "a.c": "[1, 2]"}


def test_the_mlflow_ui_serves_a_profiles_store_on_localhost(tmp_path):
    """`audiokd mlflow` (what `make mlflow` runs): the UI's REST API answers on 127.0.0.1 with the profile's runs."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import ROOT, write_profile

    from audiokd_lib.core import tracking
    from audiokd_lib.core.params import load_params

    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'out'}\n", "ui")
    missing = subprocess.run([sys.executable, "-m", "audiokd_lib", "mlflow", "--profile", str(profile)], check=False,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "no MLflow store yet" in missing.stderr
    with tracking.start_run(load_params(profile), "student-kd", "a-run"):
        tracking.log_final({"test_accuracy": 0.5})
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # Its own process group: `audiokd mlflow` starts `mlflow ui`, which starts the web server; all of them go at the end.
    server = subprocess.Popen([sys.executable, "-m", "audiokd_lib", "mlflow", "--profile", str(profile),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
        for _ in range(120):
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    found = json.load(answer)
                break
            except OSError:
                assert server.poll() is None, "the UI exited"
                time.sleep(0.5)
        else:
            raise AssertionError("the MLflow UI did not answer within a minute")
        assert "audiokd-ui" in [e["name"] for e in found["experiments"]]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
