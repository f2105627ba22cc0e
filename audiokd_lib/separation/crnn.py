"""A mask CRNN separator trained here on the rendered pieces (notebook 08).

For machines where the Demucs weights cannot be downloaded: the network predicts, for every
time-frequency bin of the mixture's STFT, which share belongs to each of the four MUSDB groups (a
softmax mask), so the stems always add up to the mixture. It trains on random crops of the rendered
pieces' group stems, remixed at random gains (:class:`RemixSampler`), with an L1 loss on masked
magnitudes (:func:`magnitude_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from torch import nn
from tqdm.auto import tqdm

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.core import distributed
from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.loop import EpochLoop
from audiokd_lib.core.params import CRNNParams
from audiokd_lib.models.checkpoints import read_checkpoint

FOUR_STEMS = ("drums", "bass", "other", "vocals")  # htdemucs and the CRNN, in Demucs' order
CRNN_SEGMENT_SECONDS = 10.0  # the CRNN's segment when none is asked for: the length of a rendered piece


CHECKPOINT_NAME = "model.pt"  # the CRNN's file in its run folder and in its MLflow run's artifacts


def _conv_block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True))


class MaskCRNN(nn.Module):
    """A mask-based separator on the STFT: conv encoder, bidirectional GRU, U-Net decoder, softmax masks.

    Input: log1p of the mixture's STFT magnitude (the Nyquist bin dropped, so the frequency axis halves
    cleanly), scaled by the mixture's own level so the masks do not depend on how loud the file is.
    The encoder halves the frequency axis at each block (time keeps full resolution), a BiGRU reads the
    whole segment frame by frame at the bottom, and the decoder climbs back with skip connections.
    A softmax over sources gives masks that sum to one in every bin; each stem is its mask times the
    mixture's complex STFT, inverted. `forward` takes (batch, 1, samples) and returns (batch, sources,
    1, samples), the layout Demucs' `apply_model` expects (which is why `samplerate`, `sources`,
    `audio_channels` and `segment` are named as in Demucs).
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.sources: list[str] = list(spec["sources"])
        self.samplerate: int = spec["sample_rate"]
        self.audio_channels = 1
        self.segment = CRNN_SEGMENT_SECONDS
        self.n_fft, self.hop = spec["n_fft"], spec["hop"]
        channels, hidden = spec["channels"], spec["hidden"]
        bins = self.n_fft // 2  # params.CRNNParams checks that it halves once per encoder block
        widths = [1, *channels]
        self.encoder = nn.ModuleList(_conv_block(widths[i], widths[i + 1]) for i in range(len(channels)))
        self.pool = nn.MaxPool2d((2, 1))
        bottom = channels[-1] * (bins // 2 ** len(channels))
        self.squeeze = nn.Linear(bottom, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.expand = nn.Linear(2 * hidden, bottom)
        ups = [*channels[::-1][1:], channels[0]]  # each decoder block narrows to the width one level up
        self.decoder = nn.ModuleList(_conv_block(2 * c, up) for c, up in zip(channels[::-1], ups))
        self.head = nn.Conv2d(channels[0], len(self.sources), 1)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def stft(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> complex (batch, n_fft // 2 + 1, frames); zero-padded, so any length works."""
        return torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, pad_mode="constant",
                          return_complex=True)

    def masks(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Complex STFT (batch, bins, frames) -> masks (batch, sources, bins, frames) that sum to one."""
        magnitude = spectrum.abs()[:, :-1]
        x = torch.log1p(magnitude / level(spectrum))[:, None]
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        batch, width, bins, frames = x.shape
        flat = x.permute(0, 3, 1, 2).reshape(batch, frames, width * bins)
        recurrent, _ = self.gru(torch.relu(self.squeeze(flat)))
        x = x + self.expand(recurrent).reshape(batch, frames, width, bins).permute(0, 2, 3, 1)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(torch.cat([nn.functional.interpolate(x, size=skip.shape[-2:]), skip], dim=1))
        masks = torch.softmax(self.head(x).float(), dim=1)
        return torch.cat([masks, masks[:, :, -1:]], dim=2)  # the Nyquist bin takes its neighbour's mask

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return masked_stems(self, mix)


def masked_stems(model: MaskCRNN, mix: torch.Tensor) -> torch.Tensor:
    """Mixtures (batch, 1, samples) -> stems (batch, sources, 1, samples): each mask times the mixture's STFT."""
    batch, _, samples = mix.shape
    spectrum = model.stft(mix[:, 0])
    stems = model.masks(spectrum) * spectrum[:, None]  # complex: every stem keeps the mixture's phase
    waves = torch.istft(stems.flatten(0, 1), model.n_fft, model.hop, window=model.window, length=samples)
    return waves.reshape(batch, len(model.sources), 1, samples)


def level(spectrum: torch.Tensor) -> torch.Tensor:
    """Each example's RMS STFT magnitude, shaped to divide (batch, ..., bins, frames) spectra; never zero."""
    rms = spectrum.abs().pow(2).mean(dim=(-2, -1)).sqrt().clamp_min(1e-8)
    return rms.reshape(-1, *([1] * (spectrum.dim() - 1)))


def build_crnn(cp: CRNNParams, sample_rate: int, sources: Iterable[str] = FOUR_STEMS, seed: int | None = None
               ) -> MaskCRNN:
    """A new CRNN with the profile's settings; `seed` fixes its initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    spec = {"kind": "crnn", "sources": list(sources), "sample_rate": sample_rate, "n_fft": cp.n_fft, "hop": cp.hop,
            "channels": list(cp.channels), "hidden": cp.hidden}
    return MaskCRNN(spec)


def save_crnn(model: MaskCRNN, path: str | Path, **extra: Any) -> Path:
    """Write spec + weights (+ `extra`: history, scores; plain numbers and strings) atomically."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"spec": model.spec, "state_dict": state, **extra}, tmp)
    return Path(path)


def load_crnn(path: str | Path) -> MaskCRNN:
    """Rebuild a CRNN saved by :func:`save_crnn`, in eval mode, on the CPU (the safe, weights-only loader)."""
    saved = read_checkpoint(path, "separator checkpoint")
    spec = saved["spec"]
    if spec.get("kind") != "crnn":
        raise ValueError(f"{path}: a {spec.get('kind')!r} checkpoint, not a CRNN separator; "
                         "classifiers go to --model, separators to --separator")
    model = MaskCRNN(spec)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def group_files(mixture: str | Path, sources: Iterable[str]) -> list[Path]:
    """The group stems beside a rendered piece's mixture.wav, one per source, checked to exist."""
    folder = Path(mixture).parent / "groups"
    files = [folder / f"{source}.flac" for source in sources]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {missing}; re-render the pieces (notebook 01_data)")
    return files


class RemixSampler:
    """Training examples made on the fly: random crops of the group stems, remixed at random gains.

    Half the examples keep one piece's groups together at one offset (real, coherent music); the other
    half take every group from a different piece and offset, so the network cannot lean on which
    instruments usually play together. Each group gets a gain of +-6 dB. Crops are read from disk, so
    the training set never has to fit in memory.
    """

    REMIX_SHARE = 0.5
    GAIN_DB = 6.0

    def __init__(self, mixtures: Iterable[str | Path], sources: Iterable[str], sample_rate: int, seed: int = 0):
        self.sources = list(sources)
        self.pieces = [group_files(m, self.sources) for m in mixtures]
        if not self.pieces:
            raise ValueError("no training pieces: the pieces table has no rows in the train split")
        for files in self.pieces:
            info = sf.info(files[0])
            if info.samplerate != sample_rate:
                raise ValueError(f"{files[0]} is at {info.samplerate} Hz, the separator at {sample_rate} Hz")
        self.frames = [sf.info(files[0]).frames for files in self.pieces]
        self.rng = np.random.default_rng(seed)

    def _crop(self, piece: int, source: int, start: int, frames: int) -> np.ndarray:
        audio = sf.read(self.pieces[piece][source], frames=frames, start=start, dtype="float32", fill_value=0.0,
                        always_2d=True)[0]
        return audio.mean(axis=1)

    def _start(self, piece: int, frames: int) -> int:
        return int(self.rng.integers(0, max(1, self.frames[piece] - frames + 1)))

    def batch(self, size: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixtures (size, frames), sources (size, n_sources, frames)); the mixture is the sum of the sources."""
        sources = np.zeros((size, len(self.sources), frames), dtype=np.float32)
        for b in range(size):
            remix = self.rng.random() < self.REMIX_SHARE
            piece = int(self.rng.integers(len(self.pieces)))
            start = self._start(piece, frames)
            for s in range(len(self.sources)):
                if remix:
                    piece = int(self.rng.integers(len(self.pieces)))
                    start = self._start(piece, frames)
                gain = 10 ** (self.rng.uniform(-self.GAIN_DB, self.GAIN_DB) / 20)
                sources[b, s] = gain * self._crop(piece, s, start, frames)
        sources_t = torch.from_numpy(sources)
        return sources_t.sum(dim=1), sources_t


def load_piece(mixture: str | Path, sources: Iterable[str], sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole rendered piece as (mixture (samples,), groups (sources, samples)), mono at `sample_rate`."""
    groups = [load_audio(f, sample_rate)[0] for f in group_files(mixture, sources)]
    return load_audio(mixture, sample_rate)[0], torch.stack(groups)


def magnitude_loss(model: MaskCRNN, mixture: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """L1 distance between masked mixture magnitudes and the sources' magnitudes, at the mixture's level.

    Dividing by the mixture's level makes every example count the same, however loud it is.
    """
    spectrum = model.stft(mixture)
    targets = model.stft(sources.flatten(0, 1)).abs().reshape(*sources.shape[:2], *spectrum.shape[1:])
    estimates = model.masks(spectrum) * spectrum.abs()[:, None]
    return ((estimates - targets).abs() / level(spectrum)[:, None]).mean()


def validation_loss(model: MaskCRNN, pieces: list[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu") -> float:
    """Mean :func:`magnitude_loss` over whole pieces (their real mixtures, no remixing), in eval mode."""
    model.eval()
    with torch.inference_mode():
        losses = [magnitude_loss(model, m[None].to(device), s[None].to(device)).item() for m, s in pieces]
    return float(np.mean(losses))


@dataclass
class TrainResult:
    history: pd.DataFrame  # one row per epoch: epoch, steps, train_loss, val_loss, seconds
    best_epoch: int
    best_val_loss: float
    stopped: str  # "epochs", "patience" or "time budget"
    checkpoint: Path


def train_crnn(model: MaskCRNN, train: pd.DataFrame, val: pd.DataFrame, cp: CRNNParams, run_dir: str | Path,
               seed: int = 0, on_epoch: Callable[[dict], None] | None = None, progress: bool = True) -> TrainResult:
    """Train the CRNN in place on remixed crops of the `train` pieces; keep its best validation epoch.

    An epoch is `cp.steps_per_epoch` steps, by default as many as it takes to see about as much audio
    as the training pieces hold.
    Training stops after `cp.epochs` epochs, after `cp.patience` epochs without a lower validation loss,
    or once `cp.time_budget_s` seconds are spent (checked after every step). After every epoch the whole
    state goes to `run_dir/last.pt`, so an interrupted run resumes where it stopped (time already spent
    counts against the budget); the best weights are written to `run_dir/model.pt` and restored into
    `model`. `on_epoch` receives each epoch's row, e.g. to log it to MLflow. AdamW at a constant rate,
    gradients clipped, mixed precision on CUDA only. The epochs, early stopping and `last.pt` are
    :class:`~audiokd_lib.core.loop.EpochLoop`'s, as for the classifiers.
    """
    rank, processes = distributed.rank_and_size()
    progress = progress and rank == 0
    device = distributed.device()
    cuda = device.type == "cuda"
    sampler = RemixSampler(train["path"], model.sources, model.samplerate, seed)
    val_pieces = [load_piece(m, model.sources, model.samplerate) for m in val["path"]]
    if not val_pieces:
        raise ValueError("no validation pieces: the pieces table has no rows in the val split")
    frames = round(cp.crop_seconds * model.samplerate)
    steps = cp.steps_per_epoch or max(1, round(sum(sampler.frames) / (cp.batch_size * frames)))
    torch.manual_seed(seed + rank)
    model.to(device)
    # magnitude_loss(model, ...), through DDP when several processes train (each on its slice of the batch)
    loss_of = distributed.parallel(model, magnitude_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cp.lr, weight_decay=cp.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loop = EpochLoop(model, run_dir, cp.epochs, cp.patience, higher_is_better=False, time_budget_s=cp.time_budget_s,
                     on_epoch=on_epoch, settings=model.spec,
                     stateful={"optimizer": optimizer, "sampler_rng": sampler.rng})

    for epoch in loop:
        model.train()
        total, done = 0.0, 0
        for _ in tqdm(range(steps), desc=f"epoch {epoch + 1}/{cp.epochs}", disable=not progress, leave=False):
            mixture, sources = sampler.batch(cp.batch_size, frames)  # every process draws the same batch
            weight = 1.0
            if processes > 1:  # ... and keeps its slice, weighted so the averaged gradient is the batch's
                mixture, sources = distributed.shard(mixture), distributed.shard(sources)
                weight = distributed.shard_weight(cp.batch_size)
            with torch.autocast(device.type, enabled=cuda):
                loss = weight * loss_of(mixture.to(device), sources.to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(optimizer)
            scaler.update()
            total, done = total + loss.item() / processes, done + 1  # summed over processes: the batch's mean
            if loop.time_is_up():
                break
        [total] = distributed.total(total)
        distributed.average_buffers(model)  # BatchNorm statistics: every process validates the same model
        val_loss = validation_loss(model, val_pieces, device)
        row = loop.end_epoch({"steps": done, "train_loss": total / done, "val_loss": val_loss}, val_loss)
        if progress:
            print(f"epoch {epoch + 1}: {done} steps, train loss {row['train_loss']:.4f}, val loss {val_loss:.4f} "
                  f"({row['seconds']:.0f} s, {loop.elapsed:.0f} s in all)")
    loop.restore_best()
    model.cpu().eval()
    checkpoint = Path(run_dir) / CHECKPOINT_NAME
    if rank == 0:
        save_crnn(model, checkpoint, history=loop.history, best_epoch=loop.best["epoch"])
    return TrainResult(pd.DataFrame(loop.history), loop.best["epoch"], loop.best["score"], loop.stopped, checkpoint)
