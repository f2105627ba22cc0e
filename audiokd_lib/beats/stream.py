"""The causal student on a live stream: audio in hops, beats out as they happen (notebook 09, `audiokd beats`).

:class:`BeatStream` keeps what one step needs between hops: the last `n_fft` samples (the window of
the next frame), the previous mel frame (for the rise), and the GRU's state. Each :meth:`push` of one
hop of audio computes one frame and one GRU step, exactly what the whole-file model computes for
that frame (the front end is causal), and reports a beat when the beat activation rises through the
threshold, at least `min_interval` after the previous one: a decision taken at once, without waiting
for the future, so a beat comes out one hop (20 ms) after it happened plus the computation.

The step itself (normalise, project, GRU cell, output) is exported to ONNX (opset 17) with the state
as an input and an output, so an embedded runtime can drive it the same way (:func:`export_step`).
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audiokd_lib.beats.model import BeatModel, Piece
from audiokd_lib.compress.export import OPSET, onnx_session
from audiokd_lib.core.files import atomic_path, cached, digest
from audiokd_lib.core.tracking import settings_key


def stream_step(model: BeatModel, window: torch.Tensor, previous: torch.Tensor, state: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One hop of a live stream: the last n_fft samples, the previous frame's log mel and the GRU's state in;
    this frame's (beat, downbeat) probabilities, its log mel and the new state out.

    Nothing here waits for the future: one spectrum of the window that ends now, its rise over the
    previous frame, one GRU step from the carried state. The same numbers as the whole-file model's
    for this frame, because the front end and the student are causal."""
    features, mel = model.frontend.step(window, previous)
    logits, state = model.net.step(features[None], state)
    return torch.sigmoid(logits[0, 0]), mel, state


class BeatStream:
    """Feed hops of mono audio with :meth:`push`; get each frame's probabilities and any beat now."""

    def __init__(self, model: BeatModel, threshold: float = 0.5, down_threshold: float = 0.5,
                 min_interval: float = 60 / 240):
        if not model.causal:
            raise ValueError("a stream needs a causal model (a student); the teacher reads the future")
        self.model, self.threshold, self.down_threshold = model, threshold, down_threshold
        fe = model.frontend
        self.min_gap = round(min_interval * fe.fps)
        self.buffer = torch.zeros(fe.n_fft)
        self.previous = torch.zeros(1, fe.fbank.shape[1])  # before the first frame: silence, as offline
        self.state: torch.Tensor | None = None
        self.frame, self.last_beat, self.last_act = 0, -10**9, 0.0

    @torch.inference_mode()
    def push(self, hop: torch.Tensor) -> tuple[np.ndarray, str | None]:
        """One hop (hop samples) in: (beat, downbeat) probabilities of its frame, and "beat", "downbeat" or None."""
        self.buffer = torch.cat([self.buffer[len(hop):], hop])
        probs, self.previous, self.state = stream_step(self.model, self.buffer, self.previous, self.state)
        probs = probs.numpy()
        event = None
        beat = probs[0] >= self.threshold > self.last_act  # the activation rises through the threshold
        if beat and self.frame - self.last_beat >= self.min_gap:
            event = "downbeat" if probs[1] >= self.down_threshold else "beat"
            self.last_beat = self.frame
        self.last_act = float(probs[0])
        self.frame += 1
        return probs, event


def stream_file(model: BeatModel, wave: torch.Tensor, **options) -> tuple[np.ndarray, list[tuple[float, str]],
                                                                           np.ndarray]:
    """Run a whole waveform through a :class:`BeatStream` hop by hop: (probabilities (frames, 2),
    [(time, "beat" or "downbeat")], seconds each hop took)."""
    stream = BeatStream(model, **options)
    hop = model.frontend.hop
    wave = F.pad(wave, (0, -len(wave) % hop))
    probs, events, took = [], [], []
    for start in range(0, len(wave), hop):
        began = time.perf_counter()
        p, event = stream.push(wave[start:start + hop])
        took.append(time.perf_counter() - began)
        probs.append(p)
        if event is not None:
            events.append((start / model.frontend.sample_rate, event))
    return np.array(probs), events, np.array(took)


class _Step(nn.Module):
    """One frame of the student: (features (1, inputs), state (1, 1, hidden)) -> (probabilities (1, 2), state)."""

    def __init__(self, model: BeatModel):
        super().__init__()
        self.net = model.net

    def forward(self, features: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, state = self.net.step(features[:, None], state)
        return torch.sigmoid(logits[:, 0]), state


def export_step(model: BeatModel, path: str | Path) -> Path:
    """The student's step as ONNX (opset 17), the state an input and an output; written atomically."""
    import onnx

    inputs, hidden = model.net.project.in_features, model.net.gru.hidden_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter, as compress/export.py explains
        warnings.simplefilter("ignore")
        torch.onnx.export(_Step(model).eval(), (torch.zeros(1, inputs), torch.zeros(1, 1, hidden)), buffer,
                          dynamo=False, opset_version=OPSET, input_names=["features", "state"],
                          output_names=["probabilities", "next_state"])
    proto = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return Path(path)


def check_step(model: BeatModel, path: str | Path, features: torch.Tensor, threads: int = 1) -> dict[str, float]:
    """Run a sequence of frames (frames, inputs) through PyTorch and ONNX Runtime step by step: the largest
    difference of the probabilities, their mean squared error, and each runtime's median ms a step."""
    session = onnx_session(path, threads)
    hidden = model.net.gru.hidden_size
    step = _Step(model).eval()
    torch_state, onnx_state = torch.zeros(1, 1, hidden), np.zeros((1, 1, hidden), np.float32)
    ours, theirs, t_torch, t_onnx = [], [], [], []
    with torch.inference_mode():
        for frame in features:
            began = time.perf_counter()
            p, torch_state = step(frame[None], torch_state)
            t_torch.append(time.perf_counter() - began)
            began = time.perf_counter()
            q, onnx_state = session.run(None, {"features": frame[None].numpy(), "state": onnx_state})
            t_onnx.append(time.perf_counter() - began)
            ours.append(p.numpy())
            theirs.append(q)
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    return {"max_abs_diff": float(np.abs(ours - theirs).max()), "mse": float(np.mean((ours - theirs) ** 2)),
            "pytorch_ms": 1000 * float(np.median(t_torch)), "onnxruntime_ms": 1000 * float(np.median(t_onnx))}


def export_checked_step(model: BeatModel, path: str | Path, piece: Piece) -> dict[str, float]:
    """The step exported to `path` (:func:`export_step`) and checked against PyTorch over `piece`
    (:func:`check_step`). The check is kept beside the export (`.check.pkl`) with the key of the model's weights
    and the piece: while both are the same and the export is there, nothing is exported or timed again."""
    path = Path(path)
    return cached(path.with_suffix(".check.pkl"), settings_key({"model": digest(model.net), "piece": piece.key}),
                  lambda: check_step(model, export_step(model, path), piece.features), needs=[path])
