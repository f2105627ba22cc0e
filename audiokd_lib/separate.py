"""Source separation, and handing over only the stems of the instruments a classifier hears (notebook 08).

A separator turns one mixture into stems. Two kinds are used, behind one call (:func:`separate`):

- **Demucs** (Défossez et al.; `demucs` on PyPI, MIT): HTDemucs, a waveform + spectrogram U-Net with a
  transformer, pretrained on MUSDB18-HQ plus 800 extra songs. `htdemucs` gives drums / bass / other /
  vocals, `htdemucs_6s` adds guitar and piano. Its weights come from the official download (demucs
  fetches them itself) or from a local folder (:func:`load_demucs`).
- **A mask CRNN** trained here on the rendered pieces (:class:`MaskCRNN`), for machines where the
  Demucs weights cannot be downloaded: it predicts, for every time-frequency bin of the mixture's STFT,
  which share belongs to each of the four MUSDB groups (a softmax mask), so the stems always add up to
  the mixture.

Long files are separated in overlapping segments (Demucs' own `apply_model`, for both kinds), so the
model never sees more than one segment at a time: the memory the network needs does not grow with the
file, only the output does (one copy of the audio per stem).

Scores (:func:`evaluate`) are SDRs against the exact group stems the rendered pieces ship, with two
references measured the same way: the mixture itself as every estimate (the floor) and the ideal ratio
mask (the best any mask on this STFT can do). Finally :func:`select_stems` maps predicted instruments
(OpenMIC-2018 classes) to stems and :func:`write_selection` writes only those, with a manifest that says
what was chosen, why, and what the mapping cannot do.

Separating copyrighted music is for research and personal use; nothing separated here is redistributed.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from torch import nn
from tqdm.auto import tqdm

from .audio import load_audio, resample, save_audio
from .files import atomic_path, project_root, write_json
from .models import read_checkpoint
from .params import CRNNParams, Params
from .render import GROUPS, OPENMIC_CLASSES

FOUR_STEMS = ("drums", "bass", "other", "vocals")  # htdemucs and the CRNN, in Demucs' order
SIX_STEMS = ("drums", "bass", "other", "vocals", "guitar", "piano")  # htdemucs_6s
CHECKPOINT_NAME = "model.pt"  # the CRNN's file in its run folder and in its MLflow run's artifacts
CRNN_SEGMENT_SECONDS = 10.0  # the CRNN's segment when none is asked for: the length of a rendered piece
SDR_CLAMP_DB = 100.0  # an estimate equal to its reference (a stem that is the whole mixture) scores this, not inf


# --------------------------------------------------------------------------- the mask CRNN


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
        batch, _, samples = mix.shape
        spectrum = self.stft(mix[:, 0])
        stems = self.masks(spectrum) * spectrum[:, None]
        waves = torch.istft(stems.flatten(0, 1), self.n_fft, self.hop, window=self.window, length=samples)
        return waves.reshape(batch, len(self.sources), 1, samples)


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


# --------------------------------------------------------------------------- Demucs


def load_demucs(name: str = "htdemucs", repo: str | Path | None = None) -> nn.Module:
    """A pretrained Demucs model (or bag of models) by name, in eval mode.

    `repo` None: demucs downloads the official weights itself (Hugging Face hub, then Meta's legacy
    server) into its cache. A folder: the model is read from there, as demucs lays it out:
    `<signature>-<sha256 prefix>.th` files and optional `<name>.yaml` bags. A relative folder is taken
    from the project root. Demucs files are pickles: load only files you made or downloaded from the
    official source.
    """
    from demucs.pretrained import get_model

    if repo is not None:
        repo = Path(repo).expanduser()
        repo = repo if repo.is_absolute() else project_root() / repo
        if not repo.is_dir():
            raise FileNotFoundError(f"separation.demucs_repo {repo}: no such folder; put the Demucs weights there "
                                    "or set it to null to download the official ones")
    where = f"the folder {repo}" if repo is not None else "the official download (Hugging Face hub, Meta's server)"
    try:
        return get_model(name, repo=repo).eval()
    except Exception as err:  # demucs raises several kinds (ModelLoadingError, network errors, pickle errors)
        present = sorted(p.name for p in repo.iterdir() if p.suffix in (".th", ".yaml")) if repo else []
        hint = f"; that folder holds: {present or 'no .th or .yaml files'}" if repo else (
            "; without internet, download the weights elsewhere into a folder and set separation.demucs_repo")
        raise ValueError(f"could not load Demucs model {name!r} from {where}: {type(err).__name__}: {err}{hint}"
                         ) from err


def max_segment(model: nn.Module) -> float:
    """The longest segment a separator accepts: HTDemucs was trained on a fixed length, others have no limit."""
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs

    if isinstance(model, BagOfModels):
        return model.max_allowed_segment
    return float(model.segment) if isinstance(model, HTDemucs) else math.inf


# --------------------------------------------------------------------------- separating


@dataclass
class Separation:
    """Stems of one input: name -> (channels, samples) at `sample_rate`, as long as the input."""

    stems: dict[str, torch.Tensor]
    sample_rate: int


def separate(model: nn.Module, wave: torch.Tensor, sample_rate: int, segment_seconds: float | None = None,
             overlap: float = 0.25, progress: bool = False, device: str | None = None) -> Separation:
    """Separate (channels, samples) audio of any rate and channel count with a CRNN or a Demucs model.

    The input is resampled to the model's rate. Demucs reads stereo (a mono input is doubled, more than
    two channels are averaged first) standardised as in its own `separate` recipe; the CRNN reads each
    channel on its own. The file goes through the network in segments of `segment_seconds` (None: the
    model's own, at most what HTDemucs was trained on) overlapping by `overlap`, cross-faded; without
    random time shifts, so the result is deterministic.
    """
    from demucs.apply import apply_model

    if wave.dim() != 2 or wave.shape[-1] == 0:
        raise ValueError(f"expected audio shaped (channels, samples), got {tuple(wave.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    limit = max_segment(model)
    segment = min(segment_seconds or limit, limit)
    if math.isinf(segment):
        segment = getattr(model, "segment", CRNN_SEGMENT_SECONDS)
    wave = resample(wave.float(), sample_rate, model.samplerate)
    kwargs = {"shifts": 0, "split": True, "overlap": overlap, "segment": segment, "progress": progress,
              "device": device}
    if isinstance(model, MaskCRNN):
        out = apply_model(model, wave[:, None], **kwargs)[:, :, 0].transpose(0, 1)  # channels as a batch
    else:
        if wave.shape[0] > 2:
            wave = wave.mean(dim=0, keepdim=True)
        stereo = wave.expand(2, -1) if wave.shape[0] == 1 else wave
        reference = stereo.mean(dim=0)
        mean, std = reference.mean(), reference.std() + 1e-8
        out = apply_model(model, ((stereo - mean) / std)[None], **kwargs)[0] * std + mean
    return Separation({name: stem for name, stem in zip(model.sources, out.cpu())}, model.samplerate)


def open_separator(choice: str, params: Params) -> nn.Module:
    """The separator a command line or notebook names: "demucs", "crnn" or a CRNN checkpoint file.

    "demucs" loads `separation.demucs_name` from `separation.demucs_repo` (or the official download);
    "crnn" is the CRNN of the profile's newest finished `separator` run (notebook 08).
    """
    sp = params.separation
    if choice == "demucs":
        return load_demucs(sp.demucs_name, sp.demucs_repo)
    if choice == "crnn":
        from . import tracking

        return load_crnn(tracking.artifact_path(tracking.latest_run(params, "separator"), CHECKPOINT_NAME))
    if Path(choice).is_file():
        return load_crnn(choice)
    raise FileNotFoundError(f"separator {choice!r}: give demucs, crnn (the profile {params.profile}'s "
                            "trained CRNN) or the path of a CRNN checkpoint")


# --------------------------------------------------------------------------- training the CRNN


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
    history: pd.DataFrame  # one row per epoch: epoch, steps, train_loss, val_loss, seconds, elapsed
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
    gradients clipped, mixed precision on CUDA only.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    sampler = RemixSampler(train["path"], model.sources, model.samplerate, seed)
    val_pieces = [load_piece(m, model.sources, model.samplerate) for m in val["path"]]
    if not val_pieces:
        raise ValueError("no validation pieces: the pieces table has no rows in the val split")
    frames = round(cp.crop_seconds * model.samplerate)
    steps = cp.steps_per_epoch or max(1, round(sum(sampler.frames) / (cp.batch_size * frames)))
    torch.manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cp.lr, weight_decay=cp.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    history: list[dict] = []
    best = {"epoch": 0, "val_loss": math.inf, "state": copy.deepcopy(model.state_dict())}
    bad_epochs, elapsed = 0, 0.0

    last = run_dir / "last.pt"
    if last.is_file():
        state = torch.load(last, map_location=device, weights_only=True)
        if state["spec"] != model.spec:
            raise ValueError(f"{last} was written by a CRNN with other settings; delete it or use another run_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, bad_epochs, elapsed = state["history"], state["best"], state["bad_epochs"], state["elapsed"]
        sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming {run_dir.name} after epoch {len(history)} ({elapsed:.0f} s spent)")

    def out_of_time() -> bool:
        return cp.time_budget_s is not None and elapsed >= cp.time_budget_s

    for epoch in range(len(history), cp.epochs):
        if bad_epochs >= cp.patience or out_of_time():
            break
        model.train()
        started, total, done = time.perf_counter(), 0.0, 0
        for _ in tqdm(range(steps), desc=f"epoch {epoch + 1}/{cp.epochs}", disable=not progress, leave=False):
            mixture, sources = (x.to(device) for x in sampler.batch(cp.batch_size, frames))
            with torch.autocast(device.type, enabled=cuda):
                loss = magnitude_loss(model, mixture, sources)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(optimizer)
            scaler.update()
            total, done = total + loss.item(), done + 1
            if cp.time_budget_s is not None and elapsed + time.perf_counter() - started >= cp.time_budget_s:
                break
        val_loss = validation_loss(model, val_pieces, device)
        seconds = time.perf_counter() - started
        elapsed += seconds
        row = {"epoch": epoch + 1, "steps": done, "train_loss": total / done, "val_loss": val_loss,
               "seconds": seconds, "elapsed": elapsed}
        history.append(row)
        if val_loss < best["val_loss"]:
            best = {"epoch": epoch + 1, "val_loss": val_loss, "state": copy.deepcopy(model.state_dict())}
            bad_epochs = 0
        else:
            bad_epochs += 1
        with atomic_path(last) as tmp:
            torch.save({"spec": model.spec, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "history": history, "best": best, "bad_epochs": bad_epochs, "elapsed": elapsed,
                        "sampler_rng": sampler.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, tmp)
        if progress:
            print(f"epoch {epoch + 1}: {done} steps, train loss {row['train_loss']:.4f}, val loss {val_loss:.4f} "
                  f"({seconds:.0f} s, {elapsed:.0f} s in all)")
        if on_epoch is not None:
            on_epoch(row)
    stopped = "patience" if bad_epochs >= cp.patience else "time budget" if out_of_time() else "epochs"
    model.load_state_dict(best["state"])
    model.cpu().eval()
    checkpoint = save_crnn(model, run_dir / CHECKPOINT_NAME, history=history, best_epoch=best["epoch"])
    return TrainResult(pd.DataFrame(history), best["epoch"], best["val_loss"], stopped, checkpoint)


# --------------------------------------------------------------------------- scores


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


# --------------------------------------------------------------------------- instruments -> stems

# Instruments a separator's stems are named after, where the OpenMIC class has another name.
STEM_OF_CLASS = {"voice": "vocals", "cymbals": "drums", "drums": "drums", "bass": "bass", "guitar": "guitar",
                 "piano": "piano"}


def stem_mapping(sources: Iterable[str], classes: Iterable[str] = OPENMIC_CLASSES) -> dict[str, str]:
    """Which stem carries each instrument class: its own stem when the separator has one, else 'other'."""
    sources = list(sources)
    fallback = "other" if "other" in sources else sources[-1]
    return {c: STEM_OF_CLASS[c] if STEM_OF_CLASS.get(c) in sources else fallback for c in classes}


def mapping_table() -> pd.DataFrame:
    """The mapping for a 4-stem (htdemucs, the CRNN) and a 6-stem (htdemucs_6s) separator, one row per class."""
    return pd.DataFrame({"class": OPENMIC_CLASSES,
                         "4 stems": list(stem_mapping(FOUR_STEMS).values()),
                         "6 stems": list(stem_mapping(SIX_STEMS).values())})


def mapping_limits(mapping: dict[str, str], sources: Iterable[str]) -> list[str]:
    """What the mapping cannot do, in words, for the manifest and the notebook."""
    sources = list(sources)
    limits = []
    for instrument in ("guitar", "piano"):
        if mapping.get(instrument) not in (None, instrument):
            limits.append(f"{instrument} is inside '{mapping[instrument]}' for this {len(sources)}-stem separator "
                          f"(a 6-stem model such as htdemucs_6s has its own {instrument} stem)")
    shared: dict[str, list[str]] = {}
    for name, stem in mapping.items():
        shared.setdefault(stem, []).append(name)
    for stem, names in shared.items():
        if len(names) > 1:
            limits.append(f"several instruments share '{stem}' ({', '.join(names)}): a stem chosen for one of them "
                          "holds the others too, mixed together")
    unknown = [name for name in mapping if name not in OPENMIC_CLASSES]
    if unknown:
        limits.append(f"classes that are not OpenMIC-2018 instruments go to '{mapping[unknown[0]]}': "
                      f"{', '.join(unknown)}")
    limits.append("the classifier says which instruments play somewhere in the file, not when or in which stem; "
                  "a chosen stem also carries whatever the separator leaked into it from other instruments")
    return limits


@dataclass
class Selection:
    """Which stems to hand over and why: every stem has a reason, chosen or not."""

    scores: dict[str, float]
    threshold: float | None  # None: no classifier, every stem is handed over
    mapping: dict[str, str]
    chosen: list[str]
    reasons: dict[str, str]
    limits: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"scores": {c: round(p, 4) for c, p in self.scores.items()}, "threshold": self.threshold,
                "chosen": self.chosen, "reasons": self.reasons, "mapping": self.mapping, "limits": self.limits}


def select_stems(scores: dict[str, float] | None, threshold: float, sources: Iterable[str],
                 mapping: dict[str, str] | None = None, all_stems: bool = False) -> Selection:
    """Choose the stems whose instruments score at least `threshold`; reasons for every stem.

    `scores` maps class names to probabilities (a multi-label classifier's sigmoid outputs); None means
    no classifier was run, and then every stem is handed over, as with `all_stems`. `mapping` defaults to
    :func:`stem_mapping` of the separator's sources, over the OpenMIC classes and any other scored class.
    """
    sources = list(sources)
    classified = scores is not None
    scores = dict(scores or {})
    mapping = mapping or stem_mapping(sources, dict.fromkeys([*OPENMIC_CLASSES, *scores]))
    heard: dict[str, list[str]] = {s: [] for s in sources}
    for name, probability in sorted(scores.items(), key=lambda item: -item[1]):
        if probability >= threshold and mapping.get(name) in heard:
            heard[mapping[name]].append(f"{name} {probability:.2f}")
    reasons = {}
    for stem in sources:
        if heard[stem]:
            reasons[stem] = f"{', '.join(heard[stem])} >= {threshold:g}"
        elif not classified:
            reasons[stem] = "no classifier was run: every stem is handed over"
        else:
            mapped = [n for n, s in mapping.items() if s == stem and n in scores]
            best = max(mapped, key=scores.__getitem__, default=None)
            reasons[stem] = (f"no instrument of this stem reached {threshold:g}" +
                             (f" (best: {best} {scores[best]:.2f})" if best else " (no class maps here)"))
            if all_stems:
                reasons[stem] += "; written anyway (all stems asked for)"
    chosen = [s for s in sources if heard[s] or all_stems or not classified]
    return Selection(scores, threshold if classified else None, mapping, chosen, reasons,
                     mapping_limits(mapping, sources))


def write_selection(out_dir: str | Path, track: str, separation: Separation, selection: Selection,
                    info: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the chosen stems as `<out_dir>/<track>/<stem>.wav` and a `manifest.json`; return the folder.

    WAV files are 32-bit float, so a stem louder than full scale is not clipped. The folder is written
    under a temporary name and renamed into place once complete. An existing track folder is an error
    unless `overwrite` is True: a user's earlier output is never replaced silently.
    """
    out_dir = Path(out_dir)
    target = out_dir / track
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (audiokd separate --overwrite) "
                              "or choose another output folder")
    unknown = [s for s in selection.chosen if s not in separation.stems]
    if unknown:
        raise ValueError(f"chosen stems {unknown} are not among the separator's {list(separation.stems)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{track}."))
    try:
        for stem in selection.chosen:
            save_audio(tmp / f"{stem}.wav", separation.stems[stem], separation.sample_rate, subtype="FLOAT")
        write_json(tmp / "manifest.json", {
            "track": track, "sample_rate": separation.sample_rate, "stems": list(separation.stems),
            "files": {s: f"{s}.wav" for s in selection.chosen}, **selection.as_dict(), **(info or {}),
        })
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
