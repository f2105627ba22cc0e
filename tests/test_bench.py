"""`audiokd bench`: several checkpoints measured side by side, each in a fresh process."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from audiokd_lib.audio.features import frames_per_clip
from audiokd_lib.cli import main
from audiokd_lib.compress.bench import measure_model, peak_rise_mb
from audiokd_lib.core.params import FeatureParams
from audiokd_lib.models import checkpoints, classifier


def counted_macs(model: classifier.Classifier, features: torch.Tensor) -> int:
    """MACs of one clip through the network, counted from layer shapes by thop 0.1.1's rules.

    Convolutions (bias not counted) and linear layers as multiply-accumulates, BatchNorm as 4 operations
    per element (normalise, then scale and shift), adaptive average pooling as its window's additions
    plus one division per output; activations count nothing.
    """
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.BatchNorm2d):
            total += 4 * output.numel()
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            total += (math.prod(inputs[0].shape[2:]) // math.prod(output.shape[2:]) + 1) * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.net.modules()]
    with torch.no_grad():
        model.head(features)
    for hook in hooks:
        hook.remove()
    return total


@pytest.fixture
def saved_students(tiny_student, tmp_path):
    return [checkpoints.save_checkpoint(tiny_student(width_mult=width), tmp_path / f"{name}.pt")
            for name, width in (("wide", 1.0), ("narrow", 0.5))]


def test_one_model_is_measured_on_its_own_features(saved_students, monkeypatch):
    model = checkpoints.load_checkpoint(saved_students[0])
    peaks = []  # the memory rise is peak_rise_mb's (tested on a known allocation below), at the bench's batch

    def peak(forward, clip, batch):
        peaks.append((clip.shape, batch))
        return 12.5

    monkeypatch.setattr("audiokd_lib.compress.bench.peak_rise_mb", peak)
    result = measure_model(saved_students[0], "wide", batch=4, repeats=2, warmup=1)
    assert result.model == "wide" and result.kind == "mobilenet_v3_small x1.0"
    frames = frames_per_clip(FeatureParams(**model.spec["features"]))  # one clip of the smoke profile's 1 s
    assert result.input_shape == f"1x128x{frames}"
    assert result.params == sum(p.numel() for p in model.parameters())
    features = model.features(torch.zeros(1, round(model.spec["clip_seconds"] * model.sample_rate)))
    assert result.macs == counted_macs(model, features)  # one clip, network only, not the front end
    for latency in (result.ms_b1, result.ms_batch):
        assert 0 < latency < 1000 and math.isfinite(latency)  # a 1 s clip through a small MobileNet
    assert result.clips_per_s == pytest.approx(1000 / result.ms_batch)
    assert result.peak_mb == 12.5 and peaks == [(features.shape, 4)]  # one clip's features, batch 4
    assert (result.batch, result.threads) == (4, 1)


def test_peak_memory_is_the_rise_a_forward_pass_causes():
    def allocate(x: torch.Tensor) -> torch.Tensor:  # 40 MB of float32 per clip, touched
        return torch.ones(x.shape[0], 10_000_000).sum(dim=1)

    clip = torch.zeros(1, 8)
    if math.isnan(peak_rise_mb(allocate, clip, 1)):
        pytest.skip("no /proc/self/clear_refs: peak memory is not measurable here")
    assert peak_rise_mb(allocate, clip, 1) == pytest.approx(40, rel=0.25)
    assert peak_rise_mb(allocate, clip, 4) == pytest.approx(160, rel=0.25)


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
