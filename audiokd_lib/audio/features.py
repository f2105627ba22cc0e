"""The log-mel front end, reading clips in bulk, and the normalisation statistics.

- `LogMel`: (batch, samples) waves to (batch, 1, n_mels, frames) log-mels, Kaldi or HTK mel banks
- `iter_clips`, `iter_logmels`: many files read in turn; an unreadable one goes to `SkippedFiles`
  (listed, warned about, never fatal)
- `NormStats`, `compute_norm_stats`: per-mel-bin mean and std over the training split only, saved with
  the fingerprints of the data and the front end and refused when either has changed
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torchaudio
from tqdm.auto import tqdm

from audiokd_lib.audio.loading import AudioLoadError, load_clip
from audiokd_lib.core.files import write_json
from audiokd_lib.core.params import FeatureParams

LOG_OFFSET = 1e-5  # keeps log() finite in silent bins; -11.5 is the floor of the log-mel


class LogMel(torch.nn.Module):
    """Turn (batch, samples) or (batch, 1, samples) waveforms into (batch, 1, n_mels, frames) log-mels.

    Two mel filter banks are on offer. `kaldi` (with pre-emphasis) is the front end the EfficientAT
    AudioSet models were trained with, so the offline teacher and the students can read the very same
    features; `htk` is torchaudio's MelSpectrogram default.
    """

    def __init__(self, fp: FeatureParams):
        super().__init__()
        self.n_fft, self.win_length, self.hop_length = fp.n_fft, fp.win_length, fp.hop_length
        # A 2-tap filter y[n] = x[n] - a x[n-1] lifts the high frequencies (and drops one sample).
        self.register_buffer("preemphasis", torch.tensor([[[-fp.preemphasis, 1.0]]]) if fp.preemphasis else None)
        if fp.mel_scale == "kaldi":
            window = torch.hann_window(fp.win_length, periodic=False)
            banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
                fp.n_mels, fp.n_fft, float(fp.sample_rate), fp.f_min, fp.f_max,
                vtln_low=100.0, vtln_high=-500.0, vtln_warp_factor=1.0,
            )
            banks = torch.nn.functional.pad(banks, (0, 1))  # Kaldi leaves out the Nyquist bin
        else:
            window = torch.hann_window(fp.win_length)
            banks = torchaudio.functional.melscale_fbanks(
                fp.n_fft // 2 + 1, fp.f_min, fp.f_max, fp.n_mels, fp.sample_rate, mel_scale="htk",
            ).T
        self.register_buffer("window", window)
        self.register_buffer("banks", banks)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 3:
            wave = wave.squeeze(1)
        if self.preemphasis is not None:
            wave = torch.nn.functional.conv1d(wave.unsqueeze(1), self.preemphasis).squeeze(1)
        spec = torch.stft(wave, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window, center=True, return_complex=True)
        power = spec.real.square() + spec.imag.square()
        return torch.log(self.banks @ power + LOG_OFFSET).unsqueeze(1)


def frames_per_clip(fp: FeatureParams, seconds: float | None = None) -> int:
    """Number of spectrogram frames in a clip (centred STFT: one frame per hop, plus one)."""
    samples = round((fp.clip_seconds if seconds is None else seconds) * fp.sample_rate)
    return (samples - (1 if fp.preemphasis else 0)) // fp.hop_length + 1


@dataclass
class SkippedFiles:
    """Files a run could not read: listed and warned about, never fatal. The one way the library skips files."""

    errors: list[str] = field(default_factory=list)

    def add(self, err: AudioLoadError | str) -> None:
        self.errors.append(str(err))
        warnings.warn(f"skipped unreadable audio: {err}", stacklevel=3)

    def extend(self, errors: Iterable[str]) -> None:
        """Record (and warn about) errors found earlier, e.g. by the run that wrote a cache."""
        for err in errors:
            self.add(err)

    def __len__(self) -> int:
        return len(self.errors)


def iter_clips(paths: Iterable[str | Path], sample_rate: int, seconds: float, skipped: SkippedFiles | None = None,
               progress: bool = True, desc: str = "audio") -> Iterator[tuple[str | Path, torch.Tensor]]:
    """Yield (path, (1, samples) mono wave of `seconds`) for each readable file; unreadable ones go to `skipped`."""
    skipped = skipped if skipped is not None else SkippedFiles()
    for path in tqdm(list(paths), desc=desc, disable=not progress):
        try:
            wave = load_clip(path, sample_rate, seconds)
        except AudioLoadError as err:
            skipped.add(err)
            continue
        yield path, wave


def iter_logmels(paths, fp: FeatureParams, frontend: LogMel | None = None, skipped: SkippedFiles | None = None,
                 progress: bool = True, desc: str = "log-mel"):
    """Yield (path, log-mel) for each readable file; unreadable ones go to `skipped`."""
    frontend = frontend or LogMel(fp)
    for path, wave in iter_clips(paths, fp.sample_rate, fp.clip_seconds, skipped, progress, desc):
        with torch.no_grad():
            yield path, frontend(wave)[0]


@dataclass
class NormStats:
    """Per-mel-bin mean and std of the training log-mels, with what they were measured on."""

    mean: torch.Tensor
    std: torch.Tensor
    clips: int
    skipped: list[str]
    features_fingerprint: str
    data_fingerprint: str

    def normalise(self, logmel: torch.Tensor) -> torch.Tensor:
        """Scale (..., n_mels, frames) log-mels to zero mean and unit variance per mel bin."""
        return (logmel - self.mean[:, None]) / self.std[:, None]

    def save(self, path: str | Path) -> Path:
        """Write the statistics as JSON, atomically."""
        data = {**self.__dict__, "mean": self.mean.tolist(), "std": self.std.tolist()}
        return write_json(path, data)

    @classmethod
    def load(cls, path: str | Path, features_fingerprint: str, data_fingerprint: str) -> NormStats:
        """Read saved statistics, refusing ones measured with another front end or data."""
        data = json.loads(Path(path).read_text())
        for key, expected in (("features_fingerprint", features_fingerprint), ("data_fingerprint", data_fingerprint)):
            if data[key] != expected:
                raise ValueError(
                    f"{path}: measured with {key} {data[key]}, but the current one is {expected}; "
                    "recompute them (notebook 02) instead of mixing settings"
                )
        data["mean"], data["std"] = torch.tensor(data["mean"]), torch.tensor(data["std"])
        return cls(**data)


def compute_norm_stats(table: pd.DataFrame, fp: FeatureParams, features_fingerprint: str,
                       data_fingerprint: str, progress: bool = True) -> NormStats:
    """Measure per-mel-bin mean and std over the training split's clips (float64 running sums)."""
    train = table[table["split"] == "train"]
    total = torch.zeros(fp.n_mels, dtype=torch.float64)
    total_sq = torch.zeros(fp.n_mels, dtype=torch.float64)
    frames, clips, skipped = 0, 0, SkippedFiles()
    for _, logmel in iter_logmels(train["path"], fp, skipped=skipped, progress=progress, desc="norm stats"):
        x = logmel[0].double()
        total += x.sum(dim=1)
        total_sq += (x * x).sum(dim=1)
        frames += x.shape[1]
        clips += 1
    if clips == 0:
        raise ValueError(f"no readable training clips among {len(train)}: check the clip table's paths")
    mean = total / frames
    std = (total_sq / frames - mean * mean).clamp_min(1e-8).sqrt()
    return NormStats(mean.float(), std.float(), clips, skipped.errors, features_fingerprint, data_fingerprint)
