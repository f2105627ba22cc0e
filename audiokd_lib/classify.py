"""Classifying any audio file with a saved model: what `audiokd classify` does.

A model was trained on clips of a fixed length (`clip_seconds`). A longer file is cut into windows
of that length, overlapping by half; each window is classified and the answers are combined: the
mean of the per-window probabilities for single-label models (one instrument per file), the
maximum for multi-label ones (an instrument is present if it plays anywhere). Silent windows are
left out, and a file that is silent throughout says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.models.checkpoints import load_checkpoint
from audiokd_lib.models.classifier import Classifier

SILENCE_DBFS = -70.0  # a window whose peak is below this is treated as silence


@dataclass
class Prediction:
    file: str
    status: str                              # "ok" or "silent"
    seconds: float
    windows: int
    top: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"file": self.file, "status": self.status, "seconds": round(self.seconds, 3), "windows": self.windows,
                "top": [{"class": name, "probability": round(p, 4)} for name, p in self.top]}

    def describe(self) -> str:
        if self.status == "silent":
            return f"{self.file}: silent (peak below {SILENCE_DBFS:g} dBFS), no prediction"
        ranked = ", ".join(f"{name} {p:.2f}" for name, p in self.top)
        return f"{self.file}: {ranked}  ({self.seconds:.1f} s, {self.windows} window{'s' * (self.windows != 1)})"


def resolve_model(model: str, profile: str | None = None) -> Path:
    """A checkpoint path, or the checkpoint of a profile's newest finished run with that role."""
    path = Path(model)
    if path.is_file():
        return path
    if profile is None:
        raise FileNotFoundError(f"{model}: no such checkpoint file; give a path to a model.pt, or a role name "
                                "(teacher, student-baseline, student-kd) together with --profile")
    from audiokd_lib.core import tracking
    from audiokd_lib.core.params import profile_params

    params = profile_params(profile)
    return tracking.artifact_path(tracking.latest_run(params, model), "model.pt")


def windows(wave: torch.Tensor, size: int) -> torch.Tensor:
    """(1, samples) -> (n, size) windows with a hop of half a window; the last one zero-padded."""
    samples = wave.shape[-1]
    hop = max(1, size // 2)
    count = 1 + max(0, -(-(samples - size) // hop))
    padded = torch.nn.functional.pad(wave[0], (0, (count - 1) * hop + size - samples))
    return padded.unfold(0, size, hop)


def loud_windows(wave: torch.Tensor, size: int) -> torch.Tensor:
    """The (n, size) :func:`windows` of a (1, samples) wave that are not silent; n is 0 for a silent file."""
    chunks = windows(wave, size)
    return chunks[chunks.abs().amax(dim=1) > 10 ** (SILENCE_DBFS / 20)]


def combine(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """One file's class probabilities from its windows' logits: the mean softmax, or the max sigmoid."""
    if multilabel:
        return torch.sigmoid(logits).amax(dim=0)
    return torch.softmax(logits, dim=1).mean(dim=0)


def classify_file(model: Classifier, path: str | Path, top_k: int = 3) -> Prediction:
    """Top classes of one file; raises AudioLoadError (naming the file) when it cannot be read."""
    wave = load_audio(path, sample_rate=model.sample_rate, mono=True)
    seconds = wave.shape[-1] / model.sample_rate
    chunks = loud_windows(wave, round(model.spec["clip_seconds"] * model.sample_rate))
    if not len(chunks):
        return Prediction(str(path), "silent", seconds, 0)
    with torch.inference_mode():
        probs = combine(model(chunks), model.spec["multilabel"])
    top = probs.topk(min(top_k, len(model.classes)))
    ranked = [(model.classes[i], float(p)) for p, i in zip(top.values, top.indices)]
    return Prediction(str(path), "ok", seconds, len(chunks), ranked)


def load_model(model: str, profile: str | None = None) -> Classifier:
    """The model a `--model` argument names, ready for inference."""
    return load_checkpoint(resolve_model(model, profile))
