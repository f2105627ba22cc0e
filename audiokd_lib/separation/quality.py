"""How good a separation is: SDR against the rendered pieces' exact stems, between a floor and a ceiling.

Scores (:func:`evaluate`) are SDRs against the exact group stems the rendered pieces ship, with two
references measured the same way: the mixture itself as every estimate (the floor) and the ideal ratio
mask (the best any mask on this STFT can do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from audiokd_lib.audio.loading import resample
from audiokd_lib.data.taxonomy import GROUPS
from audiokd_lib.separation.crnn import load_piece
from audiokd_lib.separation.separator import Separation, separate

SDR_CLAMP_DB = 100.0  # an estimate equal to its reference (a stem that is the whole mixture) scores this, not inf


def ideal_ratio_mask(mixture: torch.Tensor, sources: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Estimates (sources, samples) from the ideal ratio masks |S_i| / sum_j |S_j| applied to the mixture.

    It needs the true sources, so it is no separator: it is the ceiling of any magnitude mask on this STFT.
    """
    window = torch.hann_window(n_fft)

    def spectrum(x: torch.Tensor) -> torch.Tensor:
        return torch.stft(x, n_fft, hop, window=window, pad_mode="constant", return_complex=True)

    magnitudes = spectrum(sources).abs()
    masks = magnitudes / magnitudes.sum(dim=0).clamp_min(1e-8)
    return torch.istft(masks * spectrum(mixture), n_fft, hop, window=window, length=mixture.shape[-1])


def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """SDR in dB of one estimate against its reference (BSS Eval v4, 512-tap distortion filter).

    fast_bss_eval's numpy backend in float64 (its torch backend crashed on these machines). One
    reference at a time: given several, fast_bss_eval would pick the best permutation, which flatters.
    """
    import fast_bss_eval

    value = fast_bss_eval.sdr(np.asarray(reference, np.float64)[None], np.asarray(estimate, np.float64)[None],
                              clamp_db=SDR_CLAMP_DB)
    return float(np.asarray(value).reshape(-1)[0])


def to_groups(separation: Separation, sample_rate: int, samples: int) -> torch.Tensor:
    """The four MUSDB groups (render.GROUPS order), mono at `sample_rate`, `samples` long.

    A 6-stem model's guitar and piano stems belong to MUSDB's 'other', so they are added to it.
    """
    out = torch.zeros(len(GROUPS), samples)
    for name, stem in separation.stems.items():
        wave = resample(stem.mean(dim=0, keepdim=True), separation.sample_rate, sample_rate)[0, :samples]
        out[GROUPS.index(name if name in GROUPS else "other"), :wave.shape[-1]] += wave
    return out


@dataclass
class SeparationScores:
    """SDR of every (method, piece, group) with a present reference, and each method's separation time."""

    per_track: pd.DataFrame  # method, sample_key, stem, sdr
    seconds: dict[str, float]  # method -> seconds spent separating (separators only)
    audio_seconds: float
    threads: int
    device: str

    def table(self) -> pd.DataFrame:
        """One row per method: mean SDR per stem over the tracks where the stem plays, their average, the RTF.

        Aggregation: the SDR of each whole track (not of 1 s frames, as museval's median does), averaged
        over tracks; `average` is the mean of the per-stem means, each stem counting the same.
        """
        wide = self.per_track.pivot_table(index="method", columns="stem", values="sdr", aggfunc="mean", sort=False)
        wide = wide[[g for g in GROUPS if g in wide.columns]]
        wide["average"] = wide.mean(axis=1)
        wide["gain_over_mixture"] = wide["average"] - wide.loc["mixture", "average"]
        wide["rtf"] = [self.seconds[m] / self.audio_seconds if m in self.seconds else np.nan for m in wide.index]
        return wide

    def metrics(self, split: str) -> dict[str, float]:
        """The table as MLflow metrics of one split: `<split>_sdr_<stem>_<method>` (e.g. test_sdr_average_CRNN,
        test_sdr_gain_over_mixture_ideal_ratio_mask) and `<split>_rtf_<method>`; no NaN (a separator's RTF only)."""
        return {f"{split}_{'rtf' if column == 'rtf' else f'sdr_{column}'}_{method.replace(' ', '_')}": float(value)
                for method, row in self.table().iterrows() for column, value in row.items() if pd.notna(value)}


def evaluate(table: pd.DataFrame, separators: dict[str, nn.Module], n_fft: int, hop: int, sample_rate: int,
             segment_seconds: float | None = None, overlap: float = 0.25, device: str | None = None,
             progress: bool = True) -> SeparationScores:
    """Score the mixture (floor), the ideal ratio mask (ceiling) and each separator on the pieces of `table`.

    References are the pieces' exact group stems, read at `sample_rate`; each separator gets the mixture
    and its stems come back at `sample_rate`, mono. A group that is silent in a piece (no bass, say) has
    no SDR there and is left out of that stem's mean. The real-time factor (RTF) is seconds spent
    separating / seconds of audio, on `device` (None: the CPU) with torch's current thread count.
    """
    rows, seconds, audio_seconds = [], dict.fromkeys(separators, 0.0), 0.0
    for key, mixture_path in tqdm(list(zip(table["sample_key"], table["path"])), "pieces", disable=not progress):
        mixture, references = load_piece(mixture_path, GROUPS, sample_rate)
        audio_seconds += mixture.shape[-1] / sample_rate
        estimates = {"mixture": mixture.expand(len(GROUPS), -1),
                     "ideal ratio mask": ideal_ratio_mask(mixture, references, n_fft, hop)}
        for name, model in separators.items():
            started = time.perf_counter()
            separation = separate(model, mixture[None], sample_rate, segment_seconds, overlap, device=device)
            seconds[name] += time.perf_counter() - started
            estimates[name] = to_groups(separation, sample_rate, mixture.shape[-1])
        for index, group in enumerate(GROUPS):
            reference = references[index].numpy()
            if np.max(np.abs(reference)) == 0:
                continue
            for method, estimate in estimates.items():
                rows.append({"method": method, "sample_key": key, "stem": group,
                             "sdr": sdr(reference, estimate[index].numpy())})
    return SeparationScores(pd.DataFrame(rows, columns=["method", "sample_key", "stem", "sdr"]), seconds,
                            audio_seconds, torch.get_num_threads(), device or "cpu")
