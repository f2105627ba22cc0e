"""Training shared by the teacher, the baseline student and the distilled students.

One loop, three uses: only the loss changes (hard labels, or Hinton distillation from a teacher).
What the loop does, in the order a reader meets it:

- features are computed once per clip and cached (:func:`cached_features`), so an epoch costs only
  the network; augmentation then works on the cached log-mels: a random crop, a gain (a constant in
  the log domain), noise (added in the power domain), SpecAugment and mixup (mixed as power, not as
  logs). Notebook 02 shows the waveform-level augmentations (room, codec) and their cost: about 15 ms
  a clip, more than a small student's whole training step on a CPU.
- one step per batch (:func:`train_step`): AdamW with a linear warm-up and a cosine decay, one seed
  for everything random;
- early stopping on the validation score (macro-F1, or mAP for multi-label data): the best epoch's
  weights are restored at the end and saved;
- after every epoch the full state (weights, optimiser, schedule, history, random generators) is
  written to `last.pt`, so an interrupted run resumes where it stopped. The epochs, early stopping
  and `last.pt` are :mod:`~audiokd_lib.core.loop`'s, shared with the separator's training.

With `distributed.processes` above 1 a run is trained data-parallel by several processes (GPUs, or
CPU cores), each taking its slice of every batch: :mod:`~audiokd_lib.core.distributed`.

Distillation (:func:`distillation_loss`) follows Hinton et al. (2015). In `cached` mode the teacher's
logits on the clean clips are computed once and looked up; in `consistent` mode (Beyer et al., 2022)
the teacher sees exactly the augmented, cropped, mixed batch the student sees.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from audiokd_lib.audio import augment
from audiokd_lib.audio.features import SkippedFiles, iter_clips
from audiokd_lib.compress.distill import distillation_loss, logits_at, soft_targets
from audiokd_lib.compress.export import head_module
from audiokd_lib.compress.prune import recalibrate_batchnorm
from audiokd_lib.core import distributed, metrics, tracking
from audiokd_lib.core.files import atomic_path, file_digest, write_json
from audiokd_lib.core.loop import EpochLoop
from audiokd_lib.core.losses import hard_loss
from audiokd_lib.core.params import KDParams, Params, TrainParams
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.models.students import prunable_layers


@dataclass
class FeatureSet:
    """Cached features of one split with their targets (class indices, multi-hot rows, or soft rows)."""

    features: torch.Tensor          # (clips, 1, bins, frames), float16 on disk, float32 in use
    targets: torch.Tensor           # (clips,) int64, or (clips, classes) float: multi-hot, or probabilities
    paths: list[str]
    classes: list[str]
    data_fingerprint: str           # of the whole clip table the split came from (data.fingerprint)
    skipped: list[str] = field(default_factory=list)
    cache_file: str | None = None   # where `features` came from, so a copy sent to a worker needs no payload
    soft_targets: bool = False      # (clips, classes) rows are one label's probabilities, not multi-hot
    # Windows of longer recordings (the real split): rows are windows and `groups` the recording of each, so
    # a recording is judged as `audiokd classify` judges a file (see :func:`predict_files`). None: rows are clips.
    groups: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        # Sent to a training worker (runs.train_many): the features travel as their cache file's path.
        state = dict(self.__dict__)
        if self.cache_file is not None:
            state["features"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        if state["features"] is None:
            state["features"] = torch.load(state["cache_file"], weights_only=True)["features"].float()
        self.__dict__.update(state)

    @property
    def multilabel(self) -> bool:
        return self.targets.dim() == 2 and not self.soft_targets

    def __len__(self) -> int:
        return len(self.paths)


def result_key(data: dict[str, FeatureSet] | str, checkpoints: Iterable[str | Path] = (), **settings) -> str:
    """The key of a result computed from models (their checkpoints' hashes) on `data` with `settings`: equal
    keys, the same result, which :func:`~audiokd_lib.core.files.cached` then reads back instead of computing.

    `data`: feature sets (every split's clips and targets, the real recordings' included) or a data
    fingerprint; `settings`: plain values or settings sections (e.g. `prune=params.prune`).
    """
    if not isinstance(data, str):
        digest = hashlib.sha256()
        for split in sorted(data):
            clips = data[split]
            digest.update(split.encode() + "\n".join(clips.paths).encode() + clips.targets.numpy().tobytes())
        data = digest.hexdigest()[:12]
    plain = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in settings.items()}
    return tracking.settings_key({"data": data, "checkpoints": [file_digest(c) for c in checkpoints], **plain})


def is_multilabel(table: pd.DataFrame) -> bool:
    """Whether a clip table lists several classes per clip (`labels`, as OpenMIC and the pieces) or one (`label`)."""
    return "label" not in table


def class_names(table: pd.DataFrame) -> list[str]:
    """Sorted class names of a clip table (the order of every model's outputs).

    Single-label: the `label` values. Multi-label: every class named as a positive (`labels`) or left
    unanswered (`labels_unknown`) anywhere in the table.
    """
    if not is_multilabel(table):
        return sorted(table["label"].unique())
    columns = [c for c in ("labels", "labels_unknown") if c in table]
    return sorted({name for c in columns for names in table[c].fillna("").astype(str) for name in names.split("|")
                   if name})


def cached_features(params: Params, table: pd.DataFrame, split: str, model: Classifier, key: str,
                    classes: list[str], progress: bool = True) -> FeatureSet:
    """Features of one split through `model`'s front end, computed once and cached on disk.

    `key` names the front end (e.g. a features fingerprint); the data fingerprint is part of the file
    name too, so a changed dataset or front end never meets an old cache. Unreadable clips are
    skipped, listed in the result and warned about, never fatal.

    Targets: class indices from a `label` column (one class per clip), or multi-hot float rows from a
    `labels` column of '|'-joined class names (the pieces, several instruments at once), where every
    class not listed is a negative, except those in `labels_unknown` (OpenMIC's unanswered questions):
    their target is NaN, which the losses and metrics skip (`losses.hard_loss`, `metrics`).
    """
    from audiokd_lib.data.real import multilabel_targets
    from audiokd_lib.data.tables import fingerprint

    rows, data_fp = table[table["split"] == split], fingerprint(table)
    path = params.output_dir / "features" / "cache" / f"{split}-{key}-{data_fp}.pt"
    skipped = SkippedFiles()
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        skipped.extend(saved["skipped"])  # warned again: the cache would otherwise hide them
    else:
        feats, kept = [], []
        with torch.inference_mode():
            for clip_path, wave in iter_clips(rows["path"], model.sample_rate, model.spec["clip_seconds"], skipped,
                                              progress, desc=f"features {split}"):
                feats.append(model.features(wave).half())
                kept.append(clip_path)
        if not feats:
            raise ValueError(f"no readable clips in split {split!r} ({len(rows)} listed)")
        saved = {"features": torch.cat(feats), "paths": kept, "skipped": skipped.errors}
        with atomic_path(path) as tmp:
            torch.save(saved, tmp)
    kept_rows = rows.set_index("path").loc[saved["paths"]]
    if "label" in kept_rows:
        index = {name: i for i, name in enumerate(classes)}
        targets = torch.tensor([index[label] for label in kept_rows["label"]])
    else:
        answers, known = multilabel_targets(kept_rows, classes)
        targets = torch.from_numpy(np.where(known, answers, np.nan).astype(np.float32))
    return FeatureSet(saved["features"].float(), targets, list(saved["paths"]), classes, data_fp,
                      skipped.errors, cache_file=str(path))


def cached_windows(params: Params, table: pd.DataFrame, model: Classifier, key: str, classes: list[str],
                   progress: bool = True) -> FeatureSet:
    """Features of every non-silent window of each recording in `table` (path, label), cached like clips.

    For a multi-label model the targets are multi-hot rows with only `label` present.

    Recordings of any length are cut as `audiokd classify` cuts a file (windows of clip_seconds, half
    overlapping; silent ones dropped); `groups` says which recording each window belongs to.
    """
    from audiokd_lib.audio.loading import AudioLoadError, load_audio
    from audiokd_lib.classify import loud_windows
    from audiokd_lib.data.tables import fingerprint

    path = params.output_dir / "features" / "cache" / f"windows-{key}-{fingerprint(table)}.pt"
    skipped = SkippedFiles()
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        skipped.extend(saved["skipped"])
    else:
        feats, kept, groups = [], [], []
        size = round(model.spec["clip_seconds"] * model.sample_rate)
        with torch.inference_mode():
            for clip_path in tqdm(list(table["path"]), desc="features real", disable=not progress):
                try:
                    chunks = loud_windows(load_audio(clip_path, model.sample_rate, mono=True), size)
                except AudioLoadError as err:
                    skipped.add(err)
                    continue
                if len(chunks):
                    feats.append(model.features(chunks).half())
                    groups += [len(kept)] * len(chunks)
                    kept.append(clip_path)
        if not feats:
            raise ValueError(f"no readable, non-silent recordings among the {len(table)} listed")
        saved = {"features": torch.cat(feats), "paths": kept, "groups": torch.tensor(groups), "skipped": skipped.errors}
        with atomic_path(path) as tmp:
            torch.save(saved, tmp)
    index = {name: i for i, name in enumerate(classes)}
    labels = table.set_index("path").loc[saved["paths"], "label"]
    groups = saved["groups"]
    targets = torch.tensor([index[label] for label in labels])[groups]
    if model.spec["multilabel"]:  # one instrument playing: its class positive, every other a known negative
        targets = F.one_hot(targets, len(classes)).float()
    return FeatureSet(saved["features"].float(), targets, [saved["paths"][g] for g in groups.tolist()], classes,
                      fingerprint(table), skipped.errors, cache_file=str(path), groups=groups)


def predict_files(model: Classifier, data: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """(targets, scores) with one row per recording: windows combined as `audiokd classify` combines them.

    Scores are the log of the windows' mean softmax (single-label), or the logit of their max sigmoid
    (multi-label), so they rank and threshold like logits. A set without `groups` is returned clip by clip, as logits.
    """
    from audiokd_lib.classify import combine

    logits = predict(model, data)
    if data.groups is None:
        return data.targets.numpy(), logits.numpy()
    counts = torch.bincount(data.groups).tolist()  # a recording's windows are consecutive (cached_windows)
    probs = torch.stack([combine(windows, data.multilabel) for windows in logits.split(counts)])
    first = torch.tensor(counts).cumsum(0) - torch.tensor(counts)
    scores = torch.logit(probs, eps=1e-6) if data.multilabel else probs.clamp_min(1e-12).log()
    return data.targets[first].numpy(), scores.numpy()


def with_transfer_set(train: FeatureSet, transfer: FeatureSet, train_logits: torch.Tensor,
                      transfer_logits: torch.Tensor) -> tuple[FeatureSet, torch.Tensor]:
    """The labelled training clips plus the transfer clips, and the teacher's logits for all of them.

    The transfer clips' own labels are thrown away: their targets are the teacher's probabilities, so
    the whole loss on them, the label term included, says what the teacher heard. The labelled clips
    keep their labels as one-hot rows. Saved beside the features cache, so a worker process reads it
    from disk instead of receiving it.
    """
    if train.multilabel or transfer.classes != train.classes:
        raise ValueError("a transfer set needs single-label data with the training split's classes")
    features = torch.cat([train.features, transfer.features])
    targets = torch.cat([F.one_hot(train.targets, len(train.classes)).float(), F.softmax(transfer_logits, dim=1)])
    cache_file = None
    if train.cache_file is not None:
        digest = hashlib.sha256(f"{train.cache_file}|{transfer.cache_file}".encode() + targets.numpy().tobytes())
        cache_file = Path(train.cache_file).with_name(f"train+transfer-{digest.hexdigest()[:12]}.pt")
        if not cache_file.is_file():
            with atomic_path(cache_file) as tmp:
                torch.save({"features": features.half()}, tmp)
    combined = FeatureSet(features, targets, train.paths + transfer.paths, train.classes, train.data_fingerprint,
                          train.skipped + transfer.skipped, None if cache_file is None else str(cache_file),
                          soft_targets=True)
    return combined, torch.cat([train_logits, transfer_logits])

class FeatureAugment:
    """Cheap augmentations of a batch of log-mel features, with their own seeded generator.

    The noise profile is the log-mel of white noise through the same front end, so "noise at
    20 dB SNR" here means what it means for a waveform, up to the random phase of the noise.
    """

    def __init__(self, params: Params, model: Classifier, seed: int, kinds: list[str], crop_frames: int | None):
        self.aug, self.kinds, self.crop_frames = params.augment, set(kinds), crop_frames
        self.num_classes, self.multilabel = len(model.classes), model.spec["multilabel"]
        self.rng = np.random.default_rng(seed)
        self.torch_gen = torch.Generator().manual_seed(seed)
        self.log_power = model.spec["kind"] != "ast"  # AST's features are already normalised
        self.frame_seconds = params.features.hop_length / params.features.sample_rate
        if self.log_power and "noise" in self.kinds:
            noise = torch.randn(1, round(model.sample_rate * 2), generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                self.noise_mel = model.features(noise).exp().mean(dim=-1, keepdim=True)[0]  # (1, bins, 1)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """A random window of crop_frames per example (the whole clip when it is shorter)."""
        frames = x.shape[-1]
        if self.crop_frames is None or self.crop_frames >= frames:
            return x
        starts = self.rng.integers(0, frames - self.crop_frames + 1, size=x.shape[0])
        return torch.stack([x[i, ..., s:s + self.crop_frames] for i, s in enumerate(starts)])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, extra: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Augment (x, y); `extra` (cached teacher probabilities) is mixed exactly like y."""
        if self.log_power and "reverb" in self.kinds:  # the room first, on the whole clip: its tail crosses the crop
            r = self.aug.rir
            x = augment.mel_reverb(x, self.frame_seconds, r.min_rt60, r.max_rt60, self.rng, p=r.p)
        x = self.crop(x)
        batch = x.shape[0]
        if self.log_power and "eq" in self.kinds:
            e = self.aug.eq
            x = augment.mel_equalizer(x, e.max_db, e.bumps, self.rng, p=e.p)
        g = self.aug.gain_noise
        if self.log_power and "gain" in self.kinds:
            on = torch.from_numpy(self.rng.random(batch) < g.gain_p)
            db = torch.from_numpy(self.rng.uniform(g.min_gain_db, g.max_gain_db, batch)).float()
            x = x + (on * db * math.log(10) / 10).view(-1, 1, 1, 1)  # power gain in the log domain
        if self.log_power and "noise" in self.kinds:
            on = torch.from_numpy(self.rng.random(batch) < g.noise_p).view(-1, 1, 1, 1)
            snr = torch.from_numpy(self.rng.uniform(g.min_snr_db, g.max_snr_db, batch)).float().view(-1, 1, 1, 1)
            power = x.exp()
            signal = power.sum(dim=(1, 2), keepdim=True).mean(dim=-1, keepdim=True)
            scale = signal / self.noise_mel.sum() / 10 ** (snr / 10)
            x = torch.where(on, torch.log(power + scale * self.noise_mel), x)
        if "mixup" in self.kinds:
            m = self.aug.mixup
            y1 = y if y.dim() == 2 else F.one_hot(y, self.num_classes).float()
            joint = y1 if extra is None else torch.cat([y1, extra], dim=1)
            source = x.exp() if self.log_power else x  # mix sounds (power), not their logarithms
            mixed, joint, _ = augment.mixup(source, joint, m.alpha, self.rng, self.multilabel, p=m.p)
            x = mixed.clamp_min(1e-12).log() if self.log_power else mixed
            y, extra = (joint, None) if extra is None else (joint[:, :y1.shape[1]], joint[:, y1.shape[1]:])
        if "specaugment" in self.kinds:
            s = self.aug.specaugment
            if self.log_power:
                x = augment.spec_augment(x, s.freq_mask, s.time_mask, s.n_masks, self.torch_gen)
            else:  # AST's features are (batch, frames, bins): mask them the right way round
                x = augment.spec_augment(x.transpose(-1, -2), s.freq_mask, s.time_mask, s.n_masks,
                                         self.torch_gen).transpose(-1, -2)
        return x, y, extra


@dataclass
class FitResult:
    history: pd.DataFrame           # one row per epoch: train_loss, val_loss, val_<metric>, lr, seconds
    best_epoch: int
    best_score: float
    metric: str
    stopped_early: bool


def predict(model: Classifier, data: FeatureSet, batch_size: int = 64) -> torch.Tensor:
    """Logits of `model` for every clip of a feature set (whole clips, no augmentation)."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model.head(data.features[i:i + batch_size]) for i in range(0, len(data), batch_size)])


def score(data: FeatureSet, logits: torch.Tensor) -> tuple[str, float]:
    """The validation score early stopping watches: macro-F1, or mAP for multi-label data."""
    result = metrics.classification_metrics(data.targets.numpy(), logits.numpy(), data.classes, data.multilabel)
    name = "mAP" if data.multilabel else "macro_f1"
    return name, result[name]


def _schedule(tp: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    warmup = max(1, round(tp.warmup_epochs * steps_per_epoch))
    total = tp.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _pruned_weights(model: Classifier) -> list[torch.Tensor]:
    """The conv and linear weights of an unstructured-pruned model (see prune.py), else none."""
    if model.spec.get("pruning", {}).get("kind") != "unstructured":
        return []
    return [layer.weight for layer in prunable_layers(model)]


def train_step(model: Classifier, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               scaler: torch.amp.GradScaler) -> torch.Tensor:
    """One optimisation step on one batch of features: forward, loss, backward, optimiser, schedule."""
    with torch.autocast(x.device.type, enabled=scaler.is_enabled()):  # mixed precision where the scaler works
        loss = loss_fn(model.head(x))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # scaled up, so that small float16 gradients do not round to zero
    scaler.step(optimizer)  # unscales first, and skips the step if a gradient overflowed
    scaler.update()
    scheduler.step()  # the learning rate moves every step: linear warm-up, then cosine decay
    return loss.detach()


def _weighted(loss_fn: Callable[[torch.Tensor], torch.Tensor], weight: float, logits: torch.Tensor) -> torch.Tensor:
    return weight * loss_fn(logits)


def fit(model: Classifier, train: FeatureSet, val: FeatureSet, tp: TrainParams, params: Params, seed: int,
        run_dir: str | Path, *, teacher: Classifier | None = None, teacher_logits: torch.Tensor | None = None,
        kd: KDParams | None = None, on_epoch: Callable[[dict], None] | None = None,
        progress: bool = True) -> FitResult:
    """Train `model` in place, restore its best validation epoch and recalibrate its BatchNorm statistics.

    Hard labels only when `kd` is None; otherwise Hinton's loss at `kd.temperature` and `kd.alpha`,
    with soft targets from `teacher_logits` (cached mode: one row per training clip) or from `teacher`
    run on the augmented batch (consistent mode). `on_epoch` receives each epoch's row (to log it to
    MLflow). Each batch goes through :func:`train_step`; the epochs, early stopping and resuming are
    :class:`~audiokd_lib.core.loop.EpochLoop`'s.
    """
    if kd is not None and (teacher is None) == (teacher_logits is None):
        raise ValueError("distillation needs exactly one of `teacher` (consistent) or `teacher_logits` (cached)")
    rank, processes = distributed.rank_and_size()
    progress = progress and rank == 0
    torch.manual_seed(seed + rank)  # dropout: each process its own draws
    device = distributed.device()
    cuda = device.type == "cuda"
    model.to(device)
    net = distributed.wrap(model, head_module(model))  # `model` itself, or DDP around its head
    if teacher is not None:
        teacher.to(device).eval()
    # An unstructured-pruned model re-trains with its zeros kept: they are put back after every step.
    zeros = [(w, w.detach() != 0) for w in _pruned_weights(model)]
    params_list = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params_list, lr=tp.lr, weight_decay=tp.weight_decay)
    steps = math.ceil(len(train) / tp.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(tp, steps))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)  # AMP on CUDA only
    # AST reads a fixed number of frames (its position embeddings): it always gets whole clips.
    crop = None
    if tp.crop_seconds is not None and model.spec["kind"] != "ast":
        crop = round(tp.crop_seconds * model.sample_rate / model.spec["features"]["hop_length"])
    aug = FeatureAugment(params, model, seed, tp.augment, crop)
    order_gen = torch.Generator().manual_seed(seed)
    loop = EpochLoop(model, run_dir, tp.epochs, tp.patience, on_epoch=on_epoch,
                     stateful={"optimizer": optimizer, "scheduler": scheduler, "aug_rng": aug.rng,
                               "aug_torch": aug.torch_gen, "order": order_gen})

    metric = "mAP" if val.multilabel else "macro_f1"
    # Cached soft targets travel with the labels through mixup, so they are kept as probabilities.
    soft = None if teacher_logits is None else soft_targets(teacher_logits, kd.temperature, train.multilabel)
    for epoch in loop:
        model.train()
        total, seen = 0.0, 0
        order = torch.randperm(len(train), generator=order_gen)
        batches = [order[i:i + tp.batch_size] for i in range(0, len(train), tp.batch_size)]
        for idx in tqdm(batches, desc=f"epoch {epoch + 1}/{tp.epochs}", disable=not progress, leave=False):
            x, y, probs = aug(train.features[idx], train.targets[idx], None if soft is None else soft[idx])
            if processes > 1:  # every process augmented the same batch; each keeps its slice
                x, y, probs = distributed.shard(x), distributed.shard(y), distributed.shard(probs)
            x, y = x.to(device), y.to(device)
            if kd is None:
                loss_fn = partial(hard_loss, targets=y, multilabel=train.multilabel,
                                  label_smoothing=tp.label_smoothing)
            else:
                with torch.no_grad(), torch.autocast(device.type, enabled=cuda):
                    # consistent: the teacher sees this very batch; cached: its soft labels, mixed like y
                    t_logits = (teacher.head(x) if teacher is not None
                                else logits_at(probs.to(device), kd.temperature, train.multilabel))
                loss_fn = partial(distillation_loss, teacher=t_logits, targets=y, temperature=kd.temperature,
                                  alpha=kd.alpha, multilabel=train.multilabel)
            if processes > 1:  # DDP averages the slices' gradients: weighted, that is the batch's mean gradient
                loss_fn = partial(_weighted, loss_fn, distributed.shard_weight(len(idx)))
            loss = train_step(net, x, loss_fn, optimizer, scheduler, scaler)
            with torch.no_grad():
                for weight, mask in zeros:
                    weight.mul_(mask)
            total += loss.item() * len(idx) / processes  # summed over the processes: the batch's total
            seen += len(idx)
        [total] = distributed.total(total)
        distributed.average_buffers(model)  # BatchNorm statistics: every process validates the same model
        val_logits = predict(model, val)
        val_loss = hard_loss(val_logits, val.targets, val.multilabel).item()
        _, val_score = score(val, val_logits)
        row = loop.end_epoch({"train_loss": total / seen, "val_loss": val_loss, f"val_{metric}": val_score,
                              "lr": optimizer.param_groups[0]["lr"]}, val_score)
        if progress:
            print(f"epoch {epoch + 1}: train loss {row['train_loss']:.3f}, val loss {val_loss:.3f}, "
                  f"val {metric} {val_score:.3f} ({row['seconds']:.0f} s)")
    loop.restore_best()
    model.cpu()
    if tp.recalibrate_batches:  # statistics of whole, clean clips: what the model will be tested on
        recalibrated = recalibrate_batchnorm(model, train.features, tp.recalibrate_batches, tp.batch_size)
        model.load_state_dict(recalibrated.state_dict())
    model.eval()
    if rank == 0:
        write_json(Path(run_dir) / "history.json", loop.history)
    return FitResult(pd.DataFrame(loop.history), loop.best["epoch"], loop.best["score"], metric,
                     stopped_early=len(loop.history) < tp.epochs)
