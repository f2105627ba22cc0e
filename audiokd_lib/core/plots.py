"""Figures and players for the notebooks: every figure is shown and saved under outputs/."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Audio

from audiokd_lib.core.params import Params


def save_fig(fig: plt.Figure, params: Params, name: str) -> Path:
    """Save a figure as outputs/<profile>/figures/<name>.png and return the path."""
    path = params.output_dir / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def show_logmel(ax: plt.Axes, logmel: torch.Tensor, hop_seconds: float, title: str = "") -> None:
    """Draw a (n_mels, frames) or (1, n_mels, frames) log-mel with time in seconds."""
    data = logmel.squeeze().detach().cpu().numpy()
    extent = (0.0, data.shape[-1] * hop_seconds, 0, data.shape[0])
    ax.imshow(data, origin="lower", aspect="auto", extent=extent, cmap="magma")
    ax.set(title=title, xlabel="seconds", ylabel="mel bin")


def player(wave: torch.Tensor | np.ndarray, sample_rate: int) -> Audio:
    """An audio player for a (channels, samples) waveform, at its true level (no normalisation)."""
    data = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    return Audio(np.clip(data, -1, 1), rate=sample_rate, normalize=False)
