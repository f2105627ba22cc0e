"""Separating any audio file into stems, with Demucs or the CRNN, behind one call (:func:`separate`).

- **Demucs** (Défossez et al.; `demucs` on PyPI, MIT): HTDemucs, a waveform + spectrogram U-Net with a
  transformer, pretrained on MUSDB18-HQ plus 800 extra songs. `htdemucs` gives drums / bass / other /
  vocals, `htdemucs_6s` adds guitar and piano. Its weights come from the official download (demucs
  fetches them itself) or from a local folder (:func:`load_demucs`).
- **the mask CRNN** of :mod:`~audiokd_lib.separation.crnn`.

Long files are separated in overlapping segments (Demucs' own `apply_model`, for both kinds), so the
model never sees more than one segment at a time: the memory the network needs does not grow with the
file, only the output does (one copy of the audio per stem).

Separating copyrighted music is for research and personal use; nothing separated here is redistributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from audiokd_lib.audio.loading import resample
from audiokd_lib.core.files import project_root
from audiokd_lib.core.params import Params
from audiokd_lib.separation.crnn import CHECKPOINT_NAME, CRNN_SEGMENT_SECONDS, MaskCRNN, load_crnn

SIX_STEMS = ("drums", "bass", "other", "vocals", "guitar", "piano")  # htdemucs_6s




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
        from audiokd_lib.core import tracking

        return load_crnn(tracking.artifact_path(tracking.latest_run(params, "separator"), CHECKPOINT_NAME))
    if Path(choice).is_file():
        return load_crnn(choice)
    raise FileNotFoundError(f"separator {choice!r}: give demucs, crnn (the profile {params.profile}'s "
                            "trained CRNN) or the path of a CRNN checkpoint")
