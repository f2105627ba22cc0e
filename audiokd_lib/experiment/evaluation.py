"""Every model measured the same way: its features, its scores, its costs and its figures.

- the features of every split through a model's front end, cached (:func:`feature_sets`), with the
  real recordings cut into windows;
- accuracy and macro-F1 (mAP and micro-F1 for multi-label data) on the in-domain `test` split, the
  `heldout` split (the unseen soundfont) and the real recordings, a per-class report, a confusion
  matrix, PR curves (:func:`evaluate`);
- parameters, checkpoint size, MACs for one clip, CPU latency per clip (:func:`measure`);
- the learning curve of a run (:func:`loss_figure`);
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from audiokd_lib.compress import prune
from audiokd_lib.compress.export import head_module
from audiokd_lib.core import metrics, plots
from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.params import Params
from audiokd_lib.data import real_eval
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.training import FeatureSet, cached_features, cached_windows, predict_files

EVAL_SPLITS = ("test", "heldout", "real")  # in-domain, the soundfont no model trained on, real recordings


def feature_key(params: Params, model: Classifier) -> str:
    """Names a front end in cache files: students and the EfficientAT teacher share one."""
    if model.spec["kind"] == "ast":
        blob = json.dumps(model.spec["extractor"], sort_keys=True, default=str)
        return "ast-" + hashlib.sha256(blob.encode()).hexdigest()[:10]
    return "logmel-" + params.fingerprint("features")


def feature_sets(params: Params, table: pd.DataFrame, model: Classifier,
                 splits=("train", "val", "test", "heldout", "transfer", "real"),
                 progress: bool = True) -> dict[str, FeatureSet]:
    """Cached features of every split the table has, through `model`'s front end.

    `real`: those of the real recordings notebook 01 found (:mod:`~audiokd_lib.data.real_eval`) whose
    instrument is one of the model's classes (its OpenMIC class, for a multi-label model, every other
    class a known negative), cut into windows; none when no recording is.
    """
    present = [s for s in splits if s != "real" and (table["split"] == s).any()]
    sets = {s: cached_features(params, table, s, model, feature_key(params, model), model.classes, progress)
            for s in present}
    real = real_eval.load_table(params) if "real" in splits else None
    if real is not None and model.spec["multilabel"]:  # a detector of OpenMIC classes: each solo's one instrument
        real = real.assign(label=real["openmic_class"])
    if real is not None and real["label"].isin(model.classes).any():
        real = real[real["label"].isin(model.classes)]
        try:
            sets["real"] = cached_windows(params, real, model, feature_key(params, model), model.classes, progress)
        except ValueError as err:  # none readable or all silent: a report we cannot make, not a failed run
            warnings.warn(f"no real column: {err}", stacklevel=2)
    return sets


def sets_fingerprint(sets: dict[str, FeatureSet]) -> str:
    """Short hash of the splits' clips and targets: the data a run learned from and was tested on.

    The real recordings are left out: they are only reported on, so finding them (or not) changes no run.
    """
    digest = hashlib.sha256()
    for split in sorted(set(sets) - {"real"}):
        digest.update(split.encode() + "\n".join(sets[split].paths).encode() + sets[split].targets.numpy().tobytes())
    return digest.hexdigest()[:12]


def measure(params: Params, model: Classifier, checkpoint: Path, example: torch.Tensor) -> dict[str, float]:
    """Params, size on disk, MACs and CPU latency for one clip's features (front end excluded).

    Next to the dense figures, what only non-zero weights cost: they differ for unstructured-pruned
    models, whose zeros still take dense memory and dense arithmetic (notebook 06).
    """
    head = head_module(model).eval()
    cx = metrics.complexity(head, example[:1], checkpoint, threads=params.threads)
    return {**{k: float(v) for k, v in asdict(cx).items()},
            "nonzero_params": float(prune.sparsity(model)["nonzero_params"]),
            "nonzero_macs": float(prune.nonzero_macs(model, example[:1])),
            "compressed_mb": prune.compressed_size_mb(model)}


def scores(model: Classifier, sets: dict[str, FeatureSet], splits: tuple[str, ...] = EVAL_SPLITS) -> dict[str, float]:
    """The table's scores on the evaluation splits (e.g. `heldout_macro_f1`, `real_accuracy`), nothing saved."""
    results = {}
    for split in splits:
        if split in sets:
            data = sets[split]
            y, logits = predict_files(model, data)
            results.update({f"{split}_{key}": value for key, value in _split_metrics(data, y, logits).items()})
    return results


def _split_metrics(data: FeatureSet, y, logits) -> dict[str, float]:
    """The table's numbers for one split; for recordings of one instrument each (the real split) seen by a
    multi-label model, also the precision and recall of what it names (probability at least 0.5)."""
    found = metrics.classification_metrics(y, logits, data.classes, data.multilabel,
                                           present_only=data.groups is not None)
    if data.groups is not None and data.multilabel:
        plays = [data.classes[row.argmax()] for row in y]
        heard = [[c for c, z in zip(data.classes, row) if z >= 0] for row in logits]
        found.update({k: v for k, v in metrics.solo_detection(plays, heard).items() if k != "named_per_recording"})
    return found


def evaluate(params: Params, model: Classifier, sets: dict[str, FeatureSet], name: str, out: Path
             ) -> tuple[dict[str, float], list[Path]]:
    """Metrics on the test, heldout and real splits, with per-class reports saved in `out`, figures under figures/."""
    results, artifacts = {}, []
    for split in EVAL_SPLITS:
        if split not in sets:
            continue
        data = sets[split]
        y, logits = predict_files(model, data)  # the real recordings: one row per recording, windows combined
        for key, value in _split_metrics(data, y, logits).items():
            results[f"{split}_{key}"] = value
        report = metrics.per_class_report(y, logits, data.classes, data.multilabel)
        with atomic_path(out / f"per_class_{split}.csv") as tmp:
            report.to_csv(tmp)
        artifacts.append(out / f"per_class_{split}.csv")
        title = f"{name}, {split}"
        figures = {"pr": metrics.pr_curve_figure(y, logits, data.classes, data.multilabel, title=title)}
        if not data.multilabel:  # a confusion matrix needs one true class per clip
            figures["confusion"] = metrics.confusion_figure(y, logits, data.classes, title=title)
        for kind, fig in figures.items():
            artifacts.append(plots.save_fig(fig, params, f"{name}_{kind}_{split}"))
            plt.close(fig)
    return results, artifacts


def loss_figure(history: pd.DataFrame, metric: str | None, title: str, loss_name: str = "loss") -> plt.Figure:
    """Train and validation loss per epoch, with the validation score `val_<metric>` (if any) on a second axis."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    ax.plot(history["epoch"], history["val_loss"], "o-", label="val loss")
    ax.set(xlabel="epoch", ylabel=loss_name, title=title)
    lines = ax.get_lines()
    if metric is not None:
        right = ax.twinx()
        right.plot(history["epoch"], history[f"val_{metric}"], "s--", color="tab:green", label=f"val {metric}")
        right.set(ylabel=f"val {metric}", ylim=(0, 1.02))
        lines += right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right" if metric else "best", fontsize=8)
    return fig
