"""Beat and downbeat activations from audio: a causal front end, a non-causal teacher, a causal student.

- **Front end** (:class:`CausalFrontEnd`): the log-magnitude mel spectrogram and its positive
  difference (spectral flux), the classic input of beat trackers. Frame t is the window of `n_fft`
  samples that *ends* at sample (t + 1) * hop: it never looks ahead, so the same frames come out
  whether a file is read whole or streamed hop by hop (:mod:`~audiokd_lib.beats.stream`).
- **Networks** (:class:`BeatNet`): a linear projection, a GRU, two outputs per frame (beat, downbeat).
  The teacher's GRU is bidirectional and deep: it hears the future, as offline trackers do (allin1,
  madmom's BLSTMs). The student's is one small unidirectional layer: it only has the past, so it can
  run on a stream, one frame at a time, with its hidden state carried over.
- **Training** (:func:`train_beats`): random excerpts of the pieces, binary cross-entropy against
  the beat and downbeat frames (widened: the frames beside a beat count half), the best epoch kept by the
  validation beat and downbeat F-measures. Distillation (:func:`distill_loss`) adds the teacher's activations
  as a second target (the teacher read the whole piece, so its activations carry what the future told it).
  The epochs, patience and resumable state are :class:`~audiokd_lib.core.loop.EpochLoop`'s;
  :func:`fit_beats` reuses a finished run with the same settings (:mod:`~audiokd_lib.models.reuse`).
- **Scores** (:func:`score_trackers`): every model on the test splits, decoded by peak picking and by the DBN
  (:mod:`~audiokd_lib.beats.decode`), scored by mir_eval; kept by the key of the weights, pieces and settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from tqdm.auto import tqdm

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.beats import decode
from audiokd_lib.beats.decode import evaluate, pick_peaks
from audiokd_lib.beats.pieces import read_beats
from audiokd_lib.core.files import cached, digest, run_folder
from audiokd_lib.core.loop import EpochLoop
from audiokd_lib.core.params import BeatsParams, Params
from audiokd_lib.core.tracking import settings_key
from audiokd_lib.models.checkpoints import read_kind, write_checkpoint
from audiokd_lib.models.reuse import Fit, train_or_reuse

TESTED = ("test", "heldout", "real")  # the splits models are scored on; none trains or selects a model


class CausalFrontEnd(nn.Module):
    """(batch, samples) waveforms -> (batch, frames, 2 * n_mels): log mel magnitudes and their rise."""

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int):
        super().__init__()
        self.sample_rate, self.n_fft, self.hop = sample_rate, n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fbank = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 30.0, sample_rate / 2, n_mels, sample_rate)
        self.register_buffer("fbank", fbank, persistent=False)

    @property
    def fps(self) -> float:
        return self.sample_rate / self.hop

    def _log_mel(self, spectrum: torch.Tensor) -> torch.Tensor:
        """(..., bins) complex spectra -> (..., n_mels) log mel magnitudes."""
        return torch.log1p(spectrum.abs() @ self.fbank)

    def frames(self, wave: torch.Tensor) -> torch.Tensor:
        """Log mel magnitudes (batch, frames, n_mels): one frame a hop, each from the n_fft samples before it."""
        padded = F.pad(wave, (self.n_fft - self.hop, 0))
        spec = torch.stft(padded, self.n_fft, self.hop, window=self.window, center=False, return_complex=True)
        return self._log_mel(spec.transpose(1, 2))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        mel = self.frames(wave)
        rise = torch.relu(mel - F.pad(mel, (0, 0, 1, 0))[:, :-1])  # before the first frame: silence
        return torch.cat([mel, rise], dim=-1)

    def step(self, window: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame of a stream: the last n_fft samples and the previous frame's log mel (zeros before the
        first) -> (features (1, 2 * n_mels), this frame's log mel), as :meth:`forward` computes that frame."""
        mel = self._log_mel(torch.fft.rfft(window * self.window))[None]
        return torch.cat([mel, torch.relu(mel - previous)], dim=-1), mel


class BeatNet(nn.Module):
    """Features (batch, frames, inputs) -> logits (batch, frames, 2): beat, downbeat."""

    def __init__(self, inputs: int, hidden: int, layers: int, bidirectional: bool):
        super().__init__()
        # per-feature normalisation, measured on the training pieces (set_normalisation)
        self.register_buffer("shift", torch.zeros(inputs))
        self.register_buffer("scale", torch.ones(inputs))
        self.project = nn.Linear(inputs, hidden)
        self.gru = nn.GRU(hidden, hidden, layers, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(hidden * (2 if bidirectional else 1), 2)

    def forward(self, features: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return self.step(features, state)[0]

    def step(self, features: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the GRU's state after these frames: a causal model continues from `state`."""
        x = torch.relu(self.project((features - self.shift) / self.scale))
        y, state = self.gru(x, state)
        return self.out(y), state


@dataclass
class BeatModel:
    """A front end and a network, with what rebuilds them (`spec`)."""

    spec: dict[str, Any]
    frontend: CausalFrontEnd
    net: BeatNet

    @property
    def causal(self) -> bool:
        return not self.spec["bidirectional"]

    def activations(self, wave: torch.Tensor) -> np.ndarray:
        """(frames, 2) beat and downbeat probabilities of one mono waveform."""
        self.net.eval()
        with torch.inference_mode():
            return torch.sigmoid(self.net(self.frontend(wave[None]))[0]).numpy()


def build(bp: BeatsParams, role: str, seed: int | None = None) -> BeatModel:
    """The teacher (bidirectional, `teacher_hidden` x `teacher_layers`) or a student (causal, one layer);
    `seed` fixes its initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    teacher = role == "teacher"
    spec = {"kind": "beats", "role": role, "sample_rate": bp.pieces.sample_rate, "n_fft": bp.n_fft, "hop": bp.hop,
            "n_mels": bp.n_mels, "hidden": bp.teacher_hidden if teacher else bp.student_hidden,
            "layers": bp.teacher_layers if teacher else 1, "bidirectional": teacher}
    return from_spec(spec)


def from_spec(spec: dict[str, Any]) -> BeatModel:
    frontend = CausalFrontEnd(spec["sample_rate"], spec["n_fft"], spec["hop"], spec["n_mels"])
    net = BeatNet(2 * spec["n_mels"], spec["hidden"], spec["layers"], spec["bidirectional"])
    return BeatModel(spec, frontend, net)


def save(model: BeatModel, path: str | Path) -> Path:
    return write_checkpoint(path, model.spec, model.net.state_dict())


def load(path: str | Path) -> BeatModel:
    """A model saved by :func:`save` (the weights-only loader), in eval mode."""
    saved = read_kind(path, "beats", "beat tracker", "notebook 09")
    model = from_spec(saved["spec"])
    model.net.load_state_dict(saved["state_dict"])
    model.net.eval()
    return model


@dataclass
class Piece:
    """One piece ready for training: features, beat and downbeat target frames, annotations."""

    key: str
    features: torch.Tensor   # (frames, inputs)
    targets: torch.Tensor    # (frames, 2): 1 at the beat (downbeat) frame, 0.5 beside it
    beats: np.ndarray        # seconds
    downbeats: np.ndarray


def targets_for(beats: np.ndarray, downbeats: np.ndarray, frames: int, fps: float) -> torch.Tensor:
    """(frames, 2) targets: 1 at round(time * fps), 0.5 at the frames beside it (target widening)."""
    out = torch.zeros(frames, 2)
    for column, times in enumerate((beats, downbeats)):
        index = np.round(np.asarray(times) * fps).astype(int)
        index = index[(index >= 0) & (index < frames)]
        for offset in (-1, 1):
            near = np.clip(index + offset, 0, frames - 1)
            out[near, column] = torch.maximum(out[near, column], torch.tensor(0.5))
        out[index, column] = 1.0
    return out


def load_pieces(table: pd.DataFrame, frontend: CausalFrontEnd, progress: bool = True) -> list[Piece]:
    """Every piece of a table (path, beats_path): features through `frontend`, targets, annotations."""
    pieces = []
    with torch.inference_mode():
        for row in tqdm(list(table.itertuples()), desc="beat features", disable=not progress):
            wave = load_audio(row.path, frontend.sample_rate)[0]
            features = frontend(wave[None])[0]
            beats, downbeats = read_beats(row.beats_path)
            pieces.append(Piece(row.sample_key, features, targets_for(beats, downbeats, len(features), frontend.fps),
                                beats, downbeats))
    return pieces


def pieces_digest(pieces: list[Piece], *fields: str) -> str:
    """A fingerprint of pieces: the named fields (key, features, targets, beats, ...) of every piece, in order."""
    return digest([[getattr(piece, f) for f in fields] for piece in pieces])


def set_normalisation(model: BeatModel, pieces: list[Piece]) -> None:
    """Per-feature mean and spread of the training frames, kept in the network."""
    frames = torch.cat([p.features for p in pieces])
    model.net.shift.data = frames.mean(0)
    model.net.scale.data = frames.std(0).clamp_min(1e-3)


def predict(model: BeatModel, pieces: list[Piece]) -> list[np.ndarray]:
    """(frames, 2) probabilities of each piece, from its cached features."""
    model.net.eval()
    with torch.inference_mode():
        return [torch.sigmoid(model.net(p.features[None])[0]).numpy() for p in pieces]


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
                 alpha: float) -> torch.Tensor:
    """Binary cross-entropy against the labels and, for a distilled student, against the teacher's
    probabilities of the same frames: (1 - alpha) x BCE(labels) + alpha x BCE(teacher). Hinton's
    distillation with one sigmoid per output (beat, downbeat) and frame, at temperature 1."""
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    if teacher is None:
        return loss
    return (1 - alpha) * loss + alpha * F.binary_cross_entropy_with_logits(logits, teacher)


def _excerpts(train: list[Piece], soft: dict[str, torch.Tensor] | None, size: int, crop: int,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch of random excerpts: (features, labels, the teacher's probabilities or None), cut to the shortest."""
    xs, ys, ts = [], [], []
    for i in rng.integers(len(train), size=size):
        piece = train[i]
        start = int(rng.integers(0, max(1, len(piece.features) - crop)))
        xs.append(piece.features[start:start + crop])
        ys.append(piece.targets[start:start + crop])
        if soft is not None:
            ts.append(soft[piece.key][start:start + crop])
    length = min(len(x) for x in xs)
    stack = lambda parts: torch.stack([t[:length] for t in parts])  # noqa: E731
    return stack(xs), stack(ys), stack(ts) if soft is not None else None


def validation_f(model: BeatModel, val: list[Piece]) -> tuple[float, float]:
    """Beat and downbeat F-measures of `val` by peak picking at 0.5: what the best epoch is chosen by."""
    fps, acts = model.frontend.fps, predict(model, val)
    beat_f = evaluate([pick_peaks(a[:, 0], 0.5, fps) for a in acts], [p.beats for p in val])["F"]
    down_f = evaluate([pick_peaks(a[:, 1], 0.5, fps) for a in acts], [p.downbeats for p in val])["F"]
    return beat_f, down_f


def train_beats(model: BeatModel, train: list[Piece], val: list[Piece], bp: BeatsParams, seed: int,
                run_dir: str | Path | None = None, teacher_acts: dict[str, np.ndarray] | None = None,
                progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> Fit:
    """Train `model.net` in place on random excerpts; keep the epoch with the best mean of the validation beat
    and downbeat F-measures.

    With `teacher_acts` (the teacher's probabilities of each training piece, by key) the loss is
    :func:`distill_loss`. The epochs, patience and `run_dir/last.pt` (an interrupted run resumes where it
    stopped; without `run_dir`, a temporary folder) are :class:`~audiokd_lib.core.loop.EpochLoop`'s;
    `on_epoch` receives each epoch's row.
    """
    with run_folder(run_dir) as folder:
        return _train_beats(model, train, val, bp, seed, folder, teacher_acts, progress, on_epoch)


def _train_beats(model: BeatModel, train: list[Piece], val: list[Piece], bp: BeatsParams, seed: int, run_dir: Path,
                 teacher_acts: dict[str, np.ndarray] | None, progress: bool,
                 on_epoch: Callable[[dict], None] | None) -> Fit:
    tp, fps = bp.train, model.frontend.fps
    epochs = tp.epochs if model.causal else tp.teacher_epochs
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    crop = round(tp.crop_seconds * fps)
    soft = None if teacher_acts is None else {k: torch.from_numpy(v) for k, v in teacher_acts.items()}
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=tp.lr, weight_decay=0.01)
    steps = max(1, math.ceil(4 * len(train) / tp.batch_size))  # about four excerpts of every piece an epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, tp.lr, total_steps=epochs * steps)
    settings = {"spec": model.spec, "train": tp.model_dump(), "seed": seed,
                "kd_alpha": None if soft is None else bp.kd_alpha}
    loop = EpochLoop(model.net, run_dir, epochs, tp.patience, on_epoch=on_epoch, settings=settings,
                     stateful={"optimizer": optimizer, "scheduler": scheduler, "rng": rng})
    for epoch in loop:
        total = 0.0
        model.net.train()
        for _ in tqdm(range(steps), desc=f"epoch {epoch + 1}", disable=not progress, leave=False):
            x, y, t = _excerpts(train, soft, tp.batch_size, crop, rng)
            loss = distill_loss(model.net(x), y, t, bp.kd_alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.net.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            total += loss.item()
        beat_f, down_f = validation_f(model, val)
        loop.end_epoch({"train_loss": total / steps, "val_beat_f": beat_f, "val_downbeat_f": down_f},
                       score=(beat_f + down_f) / 2)  # both outputs count
    loop.restore_best()
    model.net.eval()
    best = loop.history[loop.best["epoch"] - 1]
    return Fit(pd.DataFrame(loop.history), loop.best["epoch"],
               {"val_beat_f": best["val_beat_f"], "val_downbeat_f": best["val_downbeat_f"]})


def fit_beats(params: Params, name: str, model: BeatModel, sets: dict[str, list[Piece]],
              teacher: BeatModel | None = None, params_file: str | Path | None = None, progress: bool = True) -> Fit:
    """Train (or resume, or reuse) one model of notebook 09 on `sets` ("train", "val"), as MLflow run `name`
    of role beats-teacher or beats-student, distilled from `teacher` when given.

    The features are normalised by the training pieces' statistics first. A finished run with the same
    settings (the model's spec and initial weights, the training settings, the seed, the pieces' features
    and targets, the teacher's weights) is reused: its weights are loaded into `model`, nothing is trained.
    """
    bp, seed = params.beats, params.seed
    train, val = sets["train"], sets["val"]
    settings = {"task": "beats", "spec": model.spec, "start": digest(model.net), "train": bp.train.model_dump(),
                "seed": seed, "data": pieces_digest(train + val, "key", "features", "targets"),
                "teacher": None if teacher is None else digest(teacher.net),
                "kd_alpha": None if teacher is None else bp.kd_alpha}

    def run(run_dir: Path) -> Fit:
        set_normalisation(model, train)
        acts = None if teacher is None else dict(zip([p.key for p in train], predict(teacher, train)))
        return train_beats(model, train, val, bp, seed, run_dir, acts, progress)

    def final(fit: Fit) -> dict[str, float]:
        return {**fit.best, "params": sum(p.numel() for p in model.net.parameters()),
                "macs_per_second": macs_per_second(model), "best_epoch": fit.best_epoch,
                "epochs_run": len(fit.history), "train_seconds": float(fit.history["seconds"].sum())}

    role = "beats-teacher" if teacher is None and not model.causal else "beats-student"
    return train_or_reuse(params, role, name, settings, model.net, model.spec, run, final, params_file)


def macs_per_second(model: BeatModel) -> int:
    """Multiply-accumulates of the network for one second of audio (fps frames): projection, GRU, output."""
    net, fps = model.net, model.frontend.fps
    hidden, directions = net.gru.hidden_size, 2 if net.gru.bidirectional else 1
    per_frame = net.project.in_features * hidden + net.out.in_features * 2
    width = hidden
    for _ in range(net.gru.num_layers):
        per_frame += directions * 3 * (width * hidden + hidden * hidden)  # three gates, input and recurrent
        width = hidden * directions
    return round(per_frame * fps)


def score_pieces(model: BeatModel, pieces: list[Piece], bp: BeatsParams, dbn: decode.BeatDBN) -> list[dict]:
    """mir_eval's scores of `model` on `pieces`, one row per decoder: peak picking at every threshold of
    `bp.thresholds`, then the DBN with the bar HMM."""
    acts, fps = predict(model, pieces), model.frontend.fps
    truth, truth_down = [p.beats for p in pieces], [p.downbeats for p in pieces]
    rows = []
    for threshold in bp.thresholds:
        found = evaluate([pick_peaks(a[:, 0], threshold, fps) for a in acts], truth,
                         [pick_peaks(a[:, 1], threshold, fps) for a in acts], truth_down)
        rows.append({"decoder": f"peaks {threshold:g}", **found})
    found = decode.evaluate_dbn(acts, truth, truth_down, dbn, bp.bar_lengths)
    rows.append({"decoder": "DBN", **found})
    return rows


def score_trackers(params: Params, models: dict[str, BeatModel], sets: dict[str, list[Piece]]) -> pd.DataFrame:
    """Every model on every split of `sets` among :data:`TESTED`: one row per model, split and decoder
    (:func:`score_pieces`) with beat F, CMLt, AMLt and downbeat F.

    Each model's rows are kept in `outputs/<profile>/beats/scores/<name>.pkl` with the key of its weights,
    the pieces and the beats settings, and read back while that key is the same.
    """
    bp, tested = params.beats, {split: sets[split] for split in TESTED if split in sets}
    pieces_key = {split: pieces_digest(data, "key", "features", "beats", "downbeats") for split, data in tested.items()}

    def score(model: BeatModel) -> list[dict]:
        dbn = decode.dbn_for(bp, model.frontend.fps)
        return [{"split": split, **row} for split, data in tested.items() for row in score_pieces(model, data, bp, dbn)]

    def key(model: BeatModel) -> str:
        return settings_key({"model": digest(model.net), "pieces": pieces_key, "beats": bp.model_dump()})

    rows = [{"model": name, **row} for name, model in models.items()
            for row in cached(params.output_dir / "beats" / "scores" / f"{name}.pkl", key(model), lambda: score(model))]
    return pd.DataFrame(rows)


def run_scores(results: pd.DataFrame) -> dict[str, dict[str, float]]:
    """:func:`score_trackers`' table as each model's MLflow scores, `<split>_<decoder>_<score>`: e.g.
    `heldout_dbn_F`, `test_peaks0.5_downbeat_F`."""
    scores: dict[str, dict[str, float]] = {}
    for r in results.to_dict("records"):
        decoder = r["decoder"].lower().replace(" ", "")  # DBN -> dbn, peaks 0.5 -> peaks0.5
        scores.setdefault(r["model"], {}).update({f"{r['split']}_{decoder}_{k.replace(' ', '_')}": r[k]
                                                  for k in ("F", "CMLt", "AMLt", "downbeat F") if pd.notna(r.get(k))})
    return scores
