"""The embedding model, its two metric losses, distillation and training (notebook 10).

- **One backbone per modality** (:class:`Backbone`): three 1-D convolutions over time, mean and max
  pooling, a linear layer: a vector per modality.
- **Gated fusion** (:class:`GatedFusion`): a learned sigmoid gate per modality says how much that view
  counts for *this* segment; the gates are normalised to sum to one and weight the modality vectors.
- **Embedding**: a projection of the fused vector, L2-normalised, so the inner product of two
  embeddings is their cosine similarity, what the FAISS index searches by.
- **Metric learning**: positives are other segments of the same piece (and the piece in other training
  soundfonts), negatives every other piece in the batch. Triplet loss (margin on Euclidean distances
  of unit vectors, batch-all) or supervised contrastive loss (Khosla et al. 2020, with a temperature).
- **Distillation**: a small model learns the metric loss and, with weight `kd_alpha`, a larger model's
  embedding of the same crops: its direction (1 - cosine) or its in-batch similarities (relational).
- **Training** (:func:`train_embedding`): the epochs, patience and resumable state are
  :class:`~audiokd_lib.core.loop.EpochLoop`'s; :func:`fit_embedding` reuses a finished run with the same
  settings (:mod:`~audiokd_lib.models.reuse`). :func:`tune` is the short Optuna search over the learning
  rate and the contrastive temperature that comes first.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from audiokd_lib.core.files import atomic_path, cached, digest, file_digest, run_folder
from audiokd_lib.core.loop import EpochLoop
from audiokd_lib.core.params import Params, SearchParams
from audiokd_lib.core.tracking import settings_key
from audiokd_lib.models.checkpoints import read_kind, write_checkpoint
from audiokd_lib.models.reuse import Fit, train_or_reuse
from audiokd_lib.search.features import MODALITIES, Segments, channels, crop, segment_frames, settings
from audiokd_lib.search.metrics import retrieval_scores


class Backbone(nn.Module):
    """(batch, channels, frames) -> (batch, dim): three convolutions over time, mean and max pooled."""

    def __init__(self, inputs: int, width: int, dim: int):
        super().__init__()

        def block(a: int, b: int, stride: int) -> list[nn.Module]:
            return [nn.Conv1d(a, b, 3, stride, 1, bias=False), nn.BatchNorm1d(b), nn.ReLU()]

        self.net = nn.Sequential(nn.BatchNorm1d(inputs), *block(inputs, width, 1), *block(width, width, 2),
                                 *block(width, 2 * width, 2))
        self.out = nn.Linear(4 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return self.out(torch.cat([h.mean(-1), h.amax(-1)], dim=1))


class GatedFusion(nn.Module):
    """Modality vectors [(batch, dim)] -> (fused (batch, dim), weights (batch, modalities) summing to 1)."""

    def __init__(self, dim: int, modalities: int):
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(dim, 1) for _ in range(modalities))

    def forward(self, vectors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.cat([torch.sigmoid(gate(v)) for gate, v in zip(self.gates, vectors)], dim=1)
        weights = gates / gates.sum(dim=1, keepdim=True)
        return (weights.unsqueeze(-1) * torch.stack(vectors, dim=1)).sum(dim=1), weights


class EmbeddingNet(nn.Module):
    """(timbre, harmony, rhythm) features -> unit-length embeddings (batch, dim)."""

    def __init__(self, inputs: dict[str, int], width: int, dim: int):
        super().__init__()
        self.backbones = nn.ModuleDict({m: Backbone(inputs[m], width, dim) for m in MODALITIES})
        self.fusion = GatedFusion(dim, len(MODALITIES))
        self.project = nn.Linear(dim, dim)

    def embed(self, timbre: torch.Tensor, harmony: torch.Tensor, rhythm: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, gate weights per modality)."""
        views = {"timbre": timbre, "harmony": harmony, "rhythm": rhythm}
        fused, weights = self.fusion([self.backbones[m](views[m]) for m in MODALITIES])
        return F.normalize(self.project(fused), dim=-1), weights

    def forward(self, timbre: torch.Tensor, harmony: torch.Tensor, rhythm: torch.Tensor) -> torch.Tensor:
        return self.embed(timbre, harmony, rhythm)[0]


@dataclass
class Embedder:
    """A network with what rebuilds it (`spec`: sizes, and the feature settings it reads)."""

    spec: dict[str, Any]
    net: EmbeddingNet

    def params(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def __call__(self, features: dict[str, torch.Tensor], batch: int = 256) -> np.ndarray:
        """(n, dim) embeddings of stacked segment features, in eval mode."""
        self.net.eval()
        with torch.inference_mode():
            return in_batches(lambda *views: self.net(*views).numpy(), features, self.spec["dim"], batch)


def in_batches(run, features: dict[str, torch.Tensor], dim: int, batch: int = 256) -> np.ndarray:
    """(n, dim) embeddings: `run(timbre, harmony, rhythm)` (a network, an ONNX session) on `batch` segments at a
    time; an empty set gives an empty array."""
    n = len(features["timbre"])
    if not n:
        return np.zeros((0, dim), np.float32)
    return np.concatenate([run(*(features[m][i:i + batch] for m in MODALITIES)) for i in range(0, n, batch)])


def build(sp: SearchParams, sample_rate: int, width: int | None = None, seed: int | None = None) -> Embedder:
    """An embedding model of `width` channels a backbone (default: the small model's)."""
    if seed is not None:
        torch.manual_seed(seed)
    spec = {"kind": "search-embedding", "width": width or sp.width, "dim": sp.embedding_dim,
            "inputs": channels(sp), "features": settings(sp, sample_rate),
            "segment_seconds": sp.segment_seconds, "segment_hop": sp.segment_hop}
    return Embedder(spec, EmbeddingNet(spec["inputs"], spec["width"], spec["dim"]))


def save(model: Embedder, path: str | Path) -> Path:
    return write_checkpoint(path, model.spec, model.net.state_dict())


def load(path: str | Path) -> Embedder:
    """A model saved by :func:`save` (the weights-only loader), in eval mode."""
    saved = read_kind(path, "search-embedding", "search embedding model", "notebook 10")
    spec = saved["spec"]
    model = Embedder(spec, EmbeddingNet(spec["inputs"], spec["width"], spec["dim"]))
    model.net.load_state_dict(saved["state_dict"])
    model.net.eval()
    return model


def ship(source: str | Path, target: str | Path) -> Path:
    """Copy a trained model's checkpoint to `target` (where the command line looks), unless it is there
    already: an unchanged file keeps its sha256, so the index and ONNX export made from it stay valid."""
    source, target = Path(source), Path(target)
    if not target.is_file() or file_digest(target) != file_digest(source):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    return target


def identity(path: str | Path, spec: dict[str, Any]) -> dict[str, Any]:
    """What an index records of the model that made its vectors: the file, its sha256 and its spec."""
    return {"model": str(Path(path).resolve()), "sha256": file_digest(path), "spec": spec}


# ---------------------------------------------------------------------------------------------- losses


def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) masks of a batch: same label and not itself; other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-all triplet loss: max(0, d(a, p) - d(a, n) + margin) over every (anchor, positive, negative)
    of the batch, averaged over the triplets that still violate the margin (Hermans et al. 2017's
    "batch all"; averaging over all of them would let the many easy ones drown the few that teach).
    d is the Euclidean distance between unit vectors, sqrt(2 - 2 cos)."""
    cos = embeddings @ embeddings.T
    distance = (2 - 2 * cos).clamp_min(1e-12).sqrt()
    positive, negative = pair_masks(labels)
    losses = F.relu(distance[:, :, None] - distance[:, None, :] + margin)
    losses = losses[positive[:, :, None] & negative[:, None, :]]
    active = losses > 0
    return losses[active].mean() if active.any() else losses.sum() * 0.0


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out): for each anchor with positives,
    -mean over positives p of log(exp(s_ap / T) / sum over every other a' of exp(s_aa' / T))."""
    positive, _ = pair_masks(labels)
    logits = (embeddings @ embeddings.T / temperature).masked_fill(
        torch.eye(len(labels), dtype=torch.bool, device=labels.device), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    has = positive.any(dim=1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=1)[has] / positive.sum(dim=1)[has]
    return per_anchor.mean()


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational distillation (Park et al. 2019): the mean squared difference of the two models' in-batch
    cosine-similarity matrices. The student copies how the crops relate, not where they lie, which a
    narrower network (or one with another embedding space) can do."""
    return ((student @ student.T - teacher @ teacher.T) ** 2).mean()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """How far the student's embeddings of a batch are from the teacher's (both unit length).

    cosine: 1 - cosine between the two embeddings of each crop (the student copies each vector);
    relational: :func:`relational_loss` (the student copies the batch's similarities).
    """
    if kind == "cosine":
        return (1 - (student * teacher).sum(dim=-1)).mean()
    if kind == "relational":
        return relational_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r}: cosine or relational")


# ---------------------------------------------------------------------------------------------- training


@dataclass
class Recording:
    """One training recording: its group (the composition) and its cached features."""

    group: int
    features: dict[str, np.ndarray]


def _batch(recordings: list[Recording], by_group: dict[int, list[int]], groups: list[int], length: int,
           segments: int, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`segments` random crops of each group: any of its recordings, any start."""
    stacked, labels = {m: [] for m in MODALITIES}, []
    for g in groups:
        for _ in range(segments):
            rec = recordings[by_group[g][int(rng.integers(len(by_group[g])))]]
            frames = rec.features["timbre"].shape[1]
            start = int(rng.integers(0, max(1, frames - length + 1)))
            for m, x in crop(rec.features, start, length).items():
                stacked[m].append(x)
            labels.append(g)
    return {m: torch.from_numpy(np.stack(x)) for m, x in stacked.items()}, torch.tensor(labels)


def train_embedding(model: Embedder, train: list[Recording], val: tuple[Segments, Segments], sp: SearchParams,
                    seed: int, run_dir: str | Path | None = None, loss: str = "supcon", teacher: Embedder | None = None,
                    lr: float | None = None, supcon_temperature: float | None = None, epochs: int | None = None,
                    progress: bool = True, device: str | torch.device = "cpu",
                    on_epoch: Callable[[dict], None] | None = None) -> Fit:
    """Train `model.net` in place on batches of P pieces x K random crops; keep the epoch with the best
    validation recall@5 (ties broken by mAP) of `val`'s queries against its catalogue, relevant being
    the same group: the notebook passes validation pieces in one timbre searched among the same pieces in
    another, where recall@5 is not already perfect after an epoch. The same Segments twice: each segment
    searches the others (never finding itself).

    `loss`: "supcon" or "triplet". With `teacher`, the loss is (1 - kd_alpha) x the metric loss +
    kd_alpha x :func:`distill_loss` (`kd_loss`) to the teacher's embeddings of the same crops. On CUDA
    the forward passes run in mixed precision (autocast, with a gradient scaler). The epochs, patience and
    `run_dir/last.pt` (an interrupted run resumes where it stopped; without `run_dir`, a temporary folder)
    are :class:`~audiokd_lib.core.loop.EpochLoop`'s; `on_epoch` receives each epoch's row.
    """
    with run_folder(run_dir) as folder:
        return _train_embedding(model, train, val, sp, seed, folder, loss, teacher, lr, supcon_temperature, epochs,
                                progress, torch.device(device), on_epoch)


def _train_embedding(model: Embedder, train: list[Recording], val: tuple[Segments, Segments], sp: SearchParams,
                     seed: int, run_dir: Path, loss: str, teacher: Embedder | None, lr: float | None,
                     supcon_temperature: float | None, epochs: int | None, progress: bool, device: torch.device,
                     on_epoch: Callable[[dict], None] | None) -> Fit:
    tp = sp.train
    lr, epochs = lr or tp.lr, epochs or tp.epochs
    supcon_temperature = supcon_temperature or sp.supcon_temperature
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    length = segment_frames(sp, model.spec["features"]["sample_rate"])
    by_group: dict[int, list[int]] = {}
    for i, rec in enumerate(train):
        by_group.setdefault(rec.group, []).append(i)
    group_ids = sorted(by_group)
    per_batch = min(tp.pieces_per_batch, len(group_ids))
    steps = max(1, math.ceil(len(group_ids) / per_batch))
    net = model.net.to(device)
    if teacher is not None:
        teacher.net.to(device).eval()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=tp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    metric = {"supcon": lambda e, y: supcon_loss(e, y, supcon_temperature),
              "triplet": lambda e, y: triplet_loss(e, y, sp.margin)}[loss]
    val_groups = [v.items["group"].to_numpy() for v in val]
    queries = len(val_groups[0])
    settings = {"spec": model.spec, "train": tp.model_dump(), "seed": seed, "loss": loss, "lr": lr,
                "supcon_temperature": supcon_temperature, "epochs": epochs, "margin": sp.margin,
                "kd": None if teacher is None else [sp.kd_loss, sp.kd_alpha]}
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "rng": rng, **({"scaler": scaler} if amp else {})}
    loop = EpochLoop(net, run_dir, epochs, tp.patience, on_epoch=on_epoch, settings=settings, stateful=stateful)
    for _ in tqdm(loop, desc="epochs", disable=not progress, leave=False):
        total = 0.0
        net.train()
        for _ in range(steps):
            chosen = rng.choice(group_ids, size=per_batch, replace=False)
            x, y = _batch(train, by_group, list(chosen), length, tp.segments, rng)
            x, y = {m: v.to(device) for m, v in x.items()}, y.to(device)
            with torch.autocast(device.type, enabled=amp):
                emb = net(*(x[m] for m in MODALITIES)).float()
                value = metric(emb, y)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher.net(*(x[m] for m in MODALITIES)).float()
                    value = (1 - sp.kd_alpha) * value + sp.kd_alpha * distill_loss(emb, target, sp.kd_loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += value.item()
        net.cpu()
        scores = retrieval_scores(model(val[0].features), val_groups[0], model(val[1].features), val_groups[1], (5,),
                                  exclude_self=val[0] is val[1])
        net.to(device)
        # recall@5 first, mAP breaking ties: recall@5 moves in steps of 1 / queries, the mAP term stays below one
        loop.end_epoch({"train_loss": total / steps, "val_recall@5": scores["recall@5"], "val_mAP": scores["mAP"]},
                       score=scores["recall@5"] + scores["mAP"] / (queries + 1))
    loop.restore_best()
    net.cpu().eval()
    if teacher is not None:
        teacher.net.cpu()
    best = loop.history[loop.best["epoch"] - 1]
    return Fit(pd.DataFrame(loop.history), loop.best["epoch"],
               {"recall@5": best["val_recall@5"], "mAP": best["val_mAP"]})


def recordings_digest(train: list[Recording], val: tuple[Segments, Segments]) -> str:
    """A fingerprint of what a model learns from and is chosen by: the training recordings' features and
    groups, the validation segments' features and groups."""
    return digest([[r.group, r.features] for r in train],
                  [[v.items["group"].to_numpy(), dict(v.features)] for v in val])


def tune(params: Params, train: list[Recording], val: tuple[Segments, Segments],
         device: str | torch.device = "cpu") -> pd.DataFrame:
    """Optuna's TPE search over the small contrastive model's learning rate and `supcon_temperature`:
    `search.optuna_trials` trials (the profile's own values first), each trained `search.optuna_epochs` epochs
    and scored by validation mAP. One row per trial: number, lr, supcon_temperature, val mAP.

    The table is kept in `outputs/<profile>/search/optuna.pkl` with the key of the search settings, the seed,
    the data (:func:`recordings_digest`) and the device, and the study runs again only when those change.
    """
    import optuna

    sp, seed = params.search, params.seed

    def trial_score(trial: optuna.Trial) -> float:
        model = build(sp, params.beats.pieces.sample_rate, seed=seed)
        fit = train_embedding(model, train, val, sp, seed, loss="supcon", progress=False, device=device,
                              lr=trial.suggest_float("lr", 1e-3, 1e-2, log=True),
                              supcon_temperature=trial.suggest_float("supcon_temperature", 0.02, 0.2, log=True),
                              epochs=sp.optuna_epochs)
        return fit.best["mAP"]

    def study() -> pd.DataFrame:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        found = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        found.enqueue_trial({"lr": sp.train.lr, "supcon_temperature": sp.supcon_temperature})
        found.optimize(trial_score, n_trials=sp.optuna_trials, show_progress_bar=True)
        return (found.trials_dataframe()[["number", "params_lr", "params_supcon_temperature", "value"]]
                .rename(columns={"params_lr": "lr", "params_supcon_temperature": "supcon_temperature",
                                 "value": "val mAP"}))

    key = settings_key({"search": sp.model_dump(), "seed": seed, "data": recordings_digest(train, val),
                        "device": str(device)})
    return cached(params.output_dir / "search" / "optuna.pkl", key, study)


def fit_embedding(params: Params, name: str, model: Embedder, train: list[Recording],
                  val: tuple[Segments, Segments], loss: str = "supcon", teacher: Embedder | None = None,
                  lr: float | None = None, supcon_temperature: float | None = None, data: str | None = None,
                  params_file: str | Path | None = None, progress: bool = True,
                  device: str | torch.device = "cpu") -> Fit:
    """Train (or resume, or reuse) one model of notebook 10 as MLflow run `name` (role search-teacher for the
    large model, search-student for the others), distilled from `teacher` when given.

    A finished run with the same settings (the model's spec and initial weights, the loss and its settings,
    the seed, the data's fingerprint `data` (default: :func:`recordings_digest`), the teacher's weights) is
    reused: its weights are loaded into `model`, nothing is trained.
    """
    sp, seed = params.search, params.seed
    lr, supcon_temperature = lr or sp.train.lr, supcon_temperature or sp.supcon_temperature
    settings = {"task": "search", "spec": model.spec, "start": digest(model.net), "loss": loss, "lr": lr,
                "supcon_temperature": supcon_temperature if loss == "supcon" else None,
                "margin": sp.margin if loss == "triplet" else None, "train": sp.train.model_dump(), "seed": seed,
                "data": data or recordings_digest(train, val),
                "teacher": None if teacher is None else digest(teacher.net),
                "kd": None if teacher is None else [sp.kd_loss, sp.kd_alpha]}

    def run(run_dir: Path) -> Fit:
        return train_embedding(model, train, val, sp, seed, run_dir, loss, teacher, lr, supcon_temperature,
                               progress=progress, device=device)

    def final(fit: Fit) -> dict[str, float]:
        return {**{f"val_{k}": v for k, v in fit.best.items()}, "params": model.params(), "macs": macs(model),
                "best_epoch": fit.best_epoch, "epochs_run": len(fit.history),
                "train_seconds": float(fit.history["seconds"].sum())}

    role = "search-student" if model.spec["width"] == sp.width else "search-teacher"
    return train_or_reuse(params, role, name, settings, model.net, model.spec, run, final, params_file)


def macs(model: Embedder) -> int:
    """Multiply-accumulates of one segment's embedding, counted by thop on the network."""
    from thop import profile

    frames = round(model.spec["segment_seconds"] * model.spec["features"]["sample_rate"]
                   / model.spec["features"]["hop_length"])
    inputs = tuple(torch.zeros(1, model.spec["inputs"][m], frames) for m in MODALITIES)
    counted, _ = profile(copy.deepcopy(model.net).eval(), inputs=inputs, verbose=False)
    return int(counted)
