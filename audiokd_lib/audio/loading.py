"""Reading audio files into tensors: one function, whatever is installed.

torchaudio 2.11 decodes through torchcodec, which needs the system's FFmpeg libraries. Where those
are missing (a pip-only install), soundfile's bundled libsndfile reads wav, flac, ogg and mp3 just as
well for our purposes. :func:`load_audio` picks the backend once and hides the difference; every
failure becomes an :class:`AudioLoadError` that names the file, so a long run can count and skip a
bad file instead of dying on it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from audiokd_lib.core.files import atomic_path

BACKENDS = ("torchaudio", "soundfile")


class AudioLoadError(RuntimeError):
    """An audio file that cannot be read, with the file named."""


@functools.cache
def _torchcodec_works() -> bool:
    try:
        from torchcodec.decoders import AudioDecoder  # noqa: F401  (loads the FFmpeg libraries)
    except Exception:  # torchcodec raises RuntimeError/OSError when FFmpeg's libraries are missing
        return False
    return True


def audio_backend(requested: str = "auto") -> str:
    """Name the decoder `load_audio` uses: torchaudio (FFmpeg) when it works, else soundfile."""
    requested = os.environ.get("AUDIOKD_AUDIO_BACKEND", requested)
    if requested == "auto":
        return "torchaudio" if _torchcodec_works() else "soundfile"
    if requested not in BACKENDS:
        raise ValueError(f"unknown audio backend {requested!r}; choose one of {BACKENDS} or 'auto'")
    if requested == "torchaudio" and not _torchcodec_works():
        raise AudioLoadError(
            "the torchaudio backend needs FFmpeg's libraries for torchcodec: "
            "apt-get install ffmpeg (or use backend='soundfile')"
        )
    return requested


def _decode(path: Path, backend: str) -> tuple[torch.Tensor, int]:
    if backend == "torchaudio":
        return torchaudio.load(str(path))
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), rate


def load_audio(
    path: str | Path, sample_rate: int | None = None, mono: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """Read a file as float32 (channels, samples), optionally downmixed to mono and resampled."""
    path = Path(path)
    if not path.is_file():
        raise AudioLoadError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioLoadError(f"{path}: the file is empty (0 bytes); re-create or remove it")
    try:
        wave, rate = _decode(path, audio_backend(backend))
    except AudioLoadError:
        raise
    except Exception as err:  # each decoder has its own exception types; all mean "unreadable"
        raise AudioLoadError(f"{path}: cannot be decoded as audio ({type(err).__name__}: {err})") from err
    if wave.numel() == 0:
        raise AudioLoadError(f"{path}: decodes to no samples; re-create or remove it")
    wave = wave.to(torch.float32)
    if mono:
        wave = to_mono(wave)
    if sample_rate is not None and rate != sample_rate:
        wave = resample(wave, rate, sample_rate)
    return wave


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """Average the channels of a (channels, samples) tensor into one."""
    return wave.mean(dim=0, keepdim=True) if wave.shape[0] > 1 else wave


@functools.cache
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # The transform precomputes its sinc kernel: caching it makes resampling thousands of clips cheap.
    return torchaudio.transforms.Resample(orig, new)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample (channels, samples) from one rate to another with a band-limited sinc filter."""
    if orig_rate == new_rate:
        return wave
    return _resampler(int(orig_rate), int(new_rate))(wave)


def fix_length(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """Cut or zero-pad the last axis to exactly `samples`."""
    if wave.shape[-1] >= samples:
        return wave[..., :samples]
    return torch.nn.functional.pad(wave, (0, samples - wave.shape[-1]))


def load_clip(path: str | Path, sample_rate: int, seconds: float, backend: str = "auto") -> torch.Tensor:
    """Read a file as a mono (1, samples) clip of a fixed duration at `sample_rate`."""
    return fix_length(load_audio(path, sample_rate, mono=True, backend=backend), round(seconds * sample_rate))


def save_audio(path: str | Path, wave: torch.Tensor | np.ndarray, sample_rate: int, subtype: str | None = None) -> Path:
    """Write (channels, samples) audio atomically; the format follows the file's extension."""
    data = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    data = data.T if data.ndim == 2 else data
    with atomic_path(path) as tmp:
        sf.write(str(tmp), data, sample_rate, subtype=subtype, format=Path(path).suffix[1:].upper())
    return Path(path)
