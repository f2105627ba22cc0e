"""Three views of a recording, cached per piece, and the fixed-length segments a catalogue is made of.

- **timbre**: the log-mel spectrogram (what plays);
- **harmony**: a chromagram (24 bins: quarter tones), optionally of the harmonic part after
  harmonic-percussive separation (what is played, whoever plays it);
- **rhythm**: the onset-strength envelope and its local autocorrelation (a tempogram: how fast, and
  how the beat is divided), optionally of the percussive part.

All three come from one STFT with the same hop, so a segment is the same frames of each. Features are
computed once per recording and cached as .npz files under a folder named after the settings that
made them: a run with other settings writes beside them, an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.core.files import atomic_path, write_json
from audiokd_lib.core.params import SearchParams

MODALITIES = ("timbre", "harmony", "rhythm")
FEATURE_KEYS = ("n_fft", "hop_length", "n_mels", "n_chroma", "tempo_lags", "hpss")


def channels(sp: SearchParams) -> dict[str, int]:
    """Input channels of each modality."""
    return {"timbre": sp.n_mels, "harmony": sp.n_chroma, "rhythm": 1 + sp.tempo_lags}


def settings(sp: SearchParams, sample_rate: int) -> dict:
    """What the features depend on: the cache folder's name and the index's identity record it."""
    return {"sample_rate": sample_rate, **{k: getattr(sp, k) for k in FEATURE_KEYS}}


def piece_features(wave: np.ndarray, sample_rate: int, sp: SearchParams) -> dict[str, np.ndarray]:
    """{modality: (channels, frames) float32} of a mono waveform."""
    spectrum = np.abs(librosa.stft(wave, n_fft=sp.n_fft, hop_length=sp.hop_length))
    harmonic, percussive = librosa.decompose.hpss(spectrum) if sp.hpss else (spectrum, spectrum)
    mel = librosa.feature.melspectrogram(S=spectrum ** 2, sr=sample_rate, n_mels=sp.n_mels)
    chroma = librosa.feature.chroma_stft(S=harmonic ** 2, sr=sample_rate, n_chroma=sp.n_chroma)
    percussive_mel = (librosa.feature.melspectrogram(S=percussive ** 2, sr=sample_rate, n_mels=sp.n_mels)
                      if sp.hpss else mel)
    onsets = librosa.onset.onset_strength(S=librosa.power_to_db(percussive_mel), sr=sample_rate)
    tempogram = librosa.feature.tempogram(onset_envelope=onsets, sr=sample_rate, hop_length=sp.hop_length,
                                          win_length=sp.tempo_lags)
    rhythm = np.vstack([onsets[None] / max(float(onsets.max()), 1e-6), tempogram])
    return {"timbre": librosa.power_to_db(mel, top_db=80.0).astype(np.float32) / 10,  # in bels: a few units
            "harmony": chroma.astype(np.float32), "rhythm": rhythm.astype(np.float32)}


def cache_folder(root: str | Path, sp: SearchParams, sample_rate: int) -> Path:
    """`root`/<hash of the feature settings>: features made with other settings never mix."""
    record = settings(sp, sample_rate)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(root) / digest
    if not (folder / "settings.json").is_file():
        write_json(folder / "settings.json", record)
    return folder


def cached_features(table: pd.DataFrame, root: str | Path, sp: SearchParams, sample_rate: int,
                    progress: bool = True) -> list[dict[str, np.ndarray]]:
    """Features of every recording of `table` (path, soundfont, sample_key), computed once into the cache."""
    folder = cache_folder(root, sp, sample_rate)
    out = []
    for row in tqdm(list(table.itertuples()), desc="search features", disable=not progress):
        path = folder / row.soundfont / f"{row.sample_key}.npz"
        if path.is_file():
            with np.load(path) as saved:
                out.append({m: saved[m] for m in MODALITIES})
            continue
        feats = piece_features(load_audio(row.path, sample_rate)[0].numpy(), sample_rate, sp)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **feats)
        out.append(feats)
    return out


def segment_frames(sp: SearchParams, sample_rate: int) -> int:
    """Frames in one segment."""
    return round(sp.segment_seconds * sample_rate / sp.hop_length)


def segment_starts(frames: int, sp: SearchParams, sample_rate: int) -> list[int]:
    """First frame of each segment of a recording `frames` long: every `segment_hop` seconds while a whole
    segment fits; a recording shorter than one segment is one segment (padded with silence)."""
    length, hop = segment_frames(sp, sample_rate), max(1, round(sp.segment_hop * sample_rate / sp.hop_length))
    return list(range(0, frames - length + 1, hop)) or [0]


def crop(feats: dict[str, np.ndarray], start: int, length: int) -> dict[str, np.ndarray]:
    """`length` frames of every modality from `start`, zero-padded past the end."""
    out = {}
    for m, x in feats.items():
        part = x[:, start:start + length]
        out[m] = np.pad(part, ((0, 0), (0, length - part.shape[1]))) if part.shape[1] < length else part
    return out


@dataclass
class Segments:
    """A catalogue of segments: stacked features {modality: (n, channels, frames)} and one row each
    (`item`: the recording; `group`: what counts as the same music; `start`: seconds)."""

    features: dict[str, torch.Tensor]
    items: pd.DataFrame

    def __len__(self) -> int:
        return len(self.items)


def make_segments(table: pd.DataFrame, feats: list[dict[str, np.ndarray]], sp: SearchParams, sample_rate: int,
                  group: str = "group") -> Segments:
    """Every segment of every recording, at the fixed hop; columns of `table` are copied to each segment's row
    and `group` names the column that says which segments are the same music."""
    length, rows, stacked = segment_frames(sp, sample_rate), [], {m: [] for m in MODALITIES}
    for record, f in zip(table.to_dict("records"), feats):
        for start in segment_starts(f["timbre"].shape[1], sp, sample_rate):
            for m, x in crop(f, start, length).items():
                stacked[m].append(x)
            rows.append({**record, "group": record[group], "start": start * sp.hop_length / sample_rate})
    return Segments({m: torch.from_numpy(np.stack(x)) if x else torch.zeros(0) for m, x in stacked.items()},
                    pd.DataFrame(rows, columns=list(dict.fromkeys([*table.columns, "group", "start"]))))
