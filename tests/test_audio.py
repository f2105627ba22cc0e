"""The loader: every format, any rate and channel count in, mono at the target rate out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiokd_lib.audio.loading import AudioLoadError, audio_backend, load_audio, load_clip, save_audio

BACKENDS = ["soundfile"] + (["torchaudio"] if audio_backend() == "torchaudio" else [])


def stereo_tone(seconds: float = 1.0, rate: int = 48000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    left = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    return torch.stack([left, 0.5 * left])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extension", ["wav", "flac", "ogg", "mp3"])
def test_stereo_48k_comes_back_mono_at_target_rate(tmp_path, backend, extension):
    path = save_audio(tmp_path / f"tone.{extension}", stereo_tone(), 48000)
    wave = load_audio(path, sample_rate=32000, mono=True, backend=backend)
    assert wave.dtype == torch.float32 and wave.shape[0] == 1
    # Lossy codecs may trim a few ms of encoder padding; lossless ones keep every sample.
    tolerance = 0 if extension in ("wav", "flac") else 400
    assert abs(wave.shape[1] - 32000) <= tolerance
    # The mono mix of channels at amplitude 0.5 and 0.25 peaks at 0.375.
    assert wave.abs().max() == pytest.approx(0.375, abs=0.03)
    spectrum = torch.fft.rfft(wave[0, 4000:28000]).abs()
    assert spectrum.argmax().item() / 24000 * 32000 == pytest.approx(440, abs=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_files_raise_an_error_naming_the_file(tmp_path, backend):
    missing, empty, corrupt = tmp_path / "missing.wav", tmp_path / "empty.flac", tmp_path / "corrupt.mp3"
    empty.write_bytes(b"")
    corrupt.write_bytes(b"ID3" + bytes(range(256)) * 4)
    for path, reason in [(missing, "no such audio file"), (empty, "empty"), (corrupt, "")]:
        with pytest.raises(AudioLoadError, match=str(path.name)) as info:
            load_audio(path, backend=backend)
        assert reason in str(info.value)


def test_load_clip_pads_and_cuts(tmp_path):
    path = save_audio(tmp_path / "short.wav", stereo_tone(0.5, 16000), 16000)
    assert load_clip(path, 32000, 1.0).shape == (1, 32000)
    assert load_clip(path, 32000, 0.25).shape == (1, 8000)


def test_forced_backend_from_environment(monkeypatch):
    monkeypatch.setenv("AUDIOKD_AUDIO_BACKEND", "soundfile")
    assert audio_backend() == "soundfile"
    monkeypatch.setenv("AUDIOKD_AUDIO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown audio backend"):
        audio_backend()


def test_save_audio_is_atomic(tmp_path):
    path = save_audio(tmp_path / "x.wav", np.zeros((1, 100), dtype="float32"), 8000)
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"] and path.stat().st_size > 0
