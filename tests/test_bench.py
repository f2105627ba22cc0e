"""`audiokd bench`: several checkpoints measured side by side, each in a fresh process."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from audiokd_lib.audio.features import NormStats, frames_per_clip
from audiokd_lib.cli import main
from audiokd_lib.compress.bench import measure_model
from audiokd_lib.experiment.params import FeatureParams, load_params
from audiokd_lib.models import checkpoints, classifier, students


def student(smoke_profile, width_mult: float) -> classifier.Classifier:
    smoke = load_params(smoke_profile)
    params = smoke.model_copy(update={"student": smoke.student.model_copy(update={"width_mult": width_mult})})
    stats = NormStats(torch.full((128,), -6.0), torch.full((128,), 3.0), 1, [], "f", "d")
    return students.build_student(params, ["a", "b", "c"], stats, seed=0).eval()


@pytest.fixture
def saved_students(smoke_profile, tmp_path):
    return [checkpoints.save_checkpoint(student(smoke_profile, width), tmp_path / f"{name}.pt")
            for name, width in (("wide", 1.0), ("narrow", 0.5))]


def test_one_model_is_measured_on_its_own_features(saved_students):
    model = checkpoints.load_checkpoint(saved_students[0])
    result = measure_model(saved_students[0], "wide", batch=4, repeats=2, warmup=1)
    assert result.model == "wide" and result.kind == "mobilenet_v3_small x1.0"
    frames = frames_per_clip(FeatureParams(**model.spec["features"]))  # one clip of the smoke profile's 1 s
    assert result.input_shape == f"1x128x{frames}"
    assert result.params == sum(p.numel() for p in model.parameters()) and result.macs > 1e6
    assert result.ms_b1 > 0 and result.ms_batch > 0
    assert result.clips_per_s == pytest.approx(1000 / result.ms_batch)
    assert math.isnan(result.peak_mb) or result.peak_mb >= 0
    assert (result.batch, result.threads) == (4, 1)


def test_cli_compares_models_in_one_table(saved_students, tmp_path, capsys):
    wide, narrow = saved_students
    csv = tmp_path / "out" / "bench.csv"
    assert main(["bench", "--models", str(wide), str(narrow), "--repeats", "3", "--batch", "4",
                 "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "synthetic noise" in out and "faster_b1" in out and "faster_b4" in out
    assert "wide.pt" in out and "narrow.pt" in out
    table = pd.read_csv(csv)
    assert list(table["model"]) == [str(wide), str(narrow)]
    assert table["fewer_params"].iloc[0] == 1 and table["fewer_params"].iloc[1] > 1.5  # half the width
    assert table["fewer_macs"].iloc[1] > 1.5 and (table["input"] == table["input"].iloc[0]).all()


def test_cli_names_what_is_wrong(saved_students, tmp_path, capsys):
    assert main(["bench", "--models", str(saved_students[0]), "--batch", "0"]) == 1
    assert "batch" in capsys.readouterr().err
    assert main(["bench", "--models", "student-kd"]) == 1  # a role needs a profile
    assert "--profile" in capsys.readouterr().err
