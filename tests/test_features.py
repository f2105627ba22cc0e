"""Log-mel front end and normalisation statistics."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from audiokd_lib.audio.features import LogMel, NormStats, SkippedFiles, compute_norm_stats, frames_per_clip, iter_clips
from audiokd_lib.audio.loading import load_clip, save_audio
from audiokd_lib.core.params import FeatureParams


def tone(freq: float, rate: int = 32000, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(rate * seconds)) / rate
    return (0.3 * torch.sin(2 * torch.pi * freq * t))[None]


def test_logmel_shape_and_peak_band():
    fp = FeatureParams(clip_seconds=1.0)
    mel = LogMel(fp)(tone(1000.0))
    assert mel.shape == (1, 1, fp.n_mels, frames_per_clip(fp))
    assert torch.isfinite(mel).all()
    low = LogMel(fp)(tone(200.0))
    # A higher tone lights a higher mel band.
    assert mel[0, 0].mean(dim=1).argmax() > low[0, 0].mean(dim=1).argmax()


def test_norm_stats_use_training_clips_only_and_skip_unreadable(tmp_path):
    fp = FeatureParams(clip_seconds=0.5)
    rows = []
    for i, (freq, split) in enumerate([(300, "train"), (600, "train"), (5000, "test")]):
        rows.append({"path": str(save_audio(tmp_path / f"{i}.wav", tone(freq, seconds=0.5), 32000)), "split": split})
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEjunk")
    rows.append({"path": str(broken), "split": "train"})
    table = pd.DataFrame(rows)
    with pytest.warns(UserWarning, match="broken.wav"):
        stats = compute_norm_stats(table, fp, "f", "d", progress=False)
    assert stats.clips == 2 and len(stats.skipped) == 1
    train_only = compute_norm_stats(table.iloc[:2], fp, "f", "d", progress=False)
    assert torch.allclose(stats.mean, train_only.mean)
    train_clips = torch.cat([load_clip(path, fp.sample_rate, fp.clip_seconds) for path in table["path"][:2]])
    normalised = stats.normalise(LogMel(fp)(train_clips))
    assert normalised.mean().abs() < 0.05


def test_unreadable_clips_are_skipped_listed_and_warned_about(tmp_path):
    good = save_audio(tmp_path / "good.wav", tone(440, seconds=0.3), 32000)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEjunk")
    skipped = SkippedFiles()
    with pytest.warns(UserWarning, match="skipped unreadable audio") as warned:
        read = list(iter_clips([broken, good, tmp_path / "missing.wav"], 16000, 0.5, skipped, progress=False))
    assert len(warned) == 2
    assert [path for path, _ in read] == [good] and read[0][1].shape == (1, 8000)  # resampled, padded
    assert len(skipped) == 2 and "broken.wav" in skipped.errors[0] and "missing.wav" in skipped.errors[1]

    replayed = SkippedFiles()
    with pytest.warns(UserWarning, match="skipped unreadable audio") as warned:
        replayed.extend(skipped.errors)  # what a cache hit does with the errors its first run met
    assert replayed.errors == skipped.errors and len(warned) == 2


def test_saved_stats_refuse_other_settings(tmp_path):
    stats = NormStats(torch.zeros(4), torch.ones(4), 3, [], "front", "data")
    path = stats.save(tmp_path / "stats.json")
    assert NormStats.load(path, "front", "data").clips == 3
    with pytest.raises(ValueError, match="features_fingerprint"):
        NormStats.load(path, "other", "data")
