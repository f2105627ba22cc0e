"""Models as one object: waveform in, logits out (:class:`Classifier`).

Every model in the course (the teacher, the baseline student, the distilled students, later the
pruned ones) is a :class:`Classifier` made of three parts:

- a **front end** turning 32 kHz waveforms into features (a log-mel spectrogram for the MobileNets,
  AST's own Kaldi filter bank for AST), computed once per clip and cached for training;
- a fixed **normalisation** (per-mel-bin statistics of the training split for the students, the
  constants the pretrained teacher was trained with for the teacher);
- the **network** itself.

Training works on cached features (`model.head(features)`), and inference on audio (`model(wave)`).
The students are built in :mod:`~audiokd_lib.models.students`, the teachers in
:mod:`~audiokd_lib.models.teachers`, an ensemble of teachers (whose network averages its members'
logits) in :mod:`~audiokd_lib.models.ensemble`, and all of them are saved and rebuilt by
:mod:`~audiokd_lib.models.checkpoints`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Normalise(nn.Module):
    """(x - shift) / scale, with per-mel-bin (n_mels,) or scalar shift and scale kept as buffers."""

    def __init__(self, shift: torch.Tensor | float = 0.0, scale: torch.Tensor | float = 1.0):
        super().__init__()
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).reshape(-1, 1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class Classifier(nn.Module):
    """Front end + normalisation + network; `spec` says how to rebuild it from a checkpoint."""

    def __init__(self, spec: dict[str, Any], frontend: nn.Module, normalise: nn.Module, net: nn.Module):
        super().__init__()
        self.spec, self.frontend, self.normalise, self.net = spec, frontend, normalise, net

    @property
    def classes(self) -> list[str]:
        return self.spec["classes"]

    @property
    def sample_rate(self) -> int:
        return self.spec["sample_rate"]

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, samples) waveforms -> (batch, 1, bins, frames) features, before normalisation."""
        return self.frontend(wave)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features; what training and evaluation on cached features call."""
        return self.net(self.normalise(features))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(wave))
