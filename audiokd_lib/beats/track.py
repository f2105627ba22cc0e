"""Beats of any audio file, written as CSV and as clicks over the music (`audiokd beats`, notebook 09)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.beats import decode
from audiokd_lib.beats.model import BeatModel
from audiokd_lib.core.files import atomic_path


def track_file(model: BeatModel, path: str | Path, dbn: decode.BeatDBN, bar_lengths=(2, 3, 4)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mono waveform at the model's rate, beat times, downbeat times) of an audio file (any format
    `load_audio` reads; an unreadable one raises AudioLoadError naming it)."""
    wave = load_audio(path, model.frontend.sample_rate)[0]
    beats, downbeats = decode.track(model.activations(wave), dbn, bar_lengths)
    return wave.numpy(), beats, downbeats


def click_track(beats: np.ndarray, downbeats: np.ndarray, samples: int, sample_rate: int) -> np.ndarray:
    """A click (30 ms, 1 kHz) on every beat, a higher one (2 kHz) on every downbeat, `samples` long."""
    out = np.zeros(samples, dtype=np.float32)
    t = np.arange(int(0.03 * sample_rate)) / sample_rate
    decay = np.exp(-250 * t)
    for beat, down in zip(beats, np.isin(beats, downbeats)):  # downbeats are some of the beats, the same values
        start = int(round(beat * sample_rate))
        if 0 <= start < samples:
            tone = np.sin(2 * np.pi * (2000 if down else 1000) * t) * decay
            out[start:start + len(tone)] += 0.5 * tone[:samples - start].astype(np.float32)
    return out


def write_beats(out: Path, name: str, beats: np.ndarray, downbeats: np.ndarray, wave: np.ndarray | None = None,
                sample_rate: int | None = None) -> list[Path]:
    """`name.beats.csv` (time, downbeat 0/1) and, given the waveform, `name.clicks.wav` (music plus clicks)."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({"time": np.round(beats, 4), "downbeat": np.isin(beats, downbeats).astype(int)})
    written = [out / f"{name}.beats.csv"]
    with atomic_path(written[0]) as tmp:
        table.to_csv(tmp, index=False)
    if wave is not None:
        mixed = np.clip(0.8 * wave + click_track(beats, downbeats, len(wave), sample_rate), -1, 1)
        written.append(out / f"{name}.clicks.wav")
        with atomic_path(written[1]) as tmp:
            sf.write(tmp, mixed, sample_rate, subtype="PCM_16", format="WAV")
    return written
