"""Scores and costs, measured by the same code for every model so that the table compares like with like.

- :func:`classification_metrics`: scikit-learn's accuracy, macro-F1 and top-3 accuracy (single-label);
  mAP over the classes present and micro-F1 at a sigmoid threshold of 0.5 (multi-label)
- :func:`per_class_report`, :func:`confusion_figure`, :func:`pr_curve_figure`: the per-class view
- :func:`complexity`: parameters, checkpoint size, thop MACs of one clip, and CPU latency at batch 1
  and per clip at a larger batch (the two differ: small models at batch 1 are overhead-bound)
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    accuracy_score,
    average_precision_score,
    classification_report,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from torch import nn

# thop 0.1.1 compares versions with distutils' LooseVersion at import, which only warns that distutils
# is deprecated; silence that one import so the warning does not show up in every notebook and test run.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import thop


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _sigmoid(scores: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-scores))


def _check(
    y_true: np.ndarray, scores: np.ndarray, classes: list[str], multilabel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Return y_true and scores as arrays, after checking that their shapes agree with `classes`."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"scores must be (clips, {len(classes)} classes) to match `classes`, got shape {scores.shape}")
    expected = scores.shape if multilabel else scores.shape[:1]
    if y_true.shape != expected:
        kind = "a 0/1 matrix (clips, classes)" if multilabel else "class indices (clips,)"
        raise ValueError(f"y_true must be {kind} of shape {expected}, got {y_true.shape}")
    return y_true.astype(int), scores


def _known(y_true: np.ndarray, multilabel: bool) -> np.ndarray | None:
    """The mask of answered (clip, class) pairs of multi-label targets with unknown (NaN) answers; else None."""
    if not multilabel:
        return None
    known = ~np.isnan(np.asarray(y_true, dtype=np.float64))
    return None if known.all() else known


def _probabilities(scores: np.ndarray, multilabel: bool) -> np.ndarray:
    """Sigmoid of multi-label logits; softmax of single-label logits (probabilities pass unchanged)."""
    if multilabel:
        return _sigmoid(scores)
    is_probability = (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    return scores if is_probability else _softmax(scores)


def _predictions(scores: np.ndarray, multilabel: bool) -> np.ndarray:
    """Hard decisions: the top class, or every class whose sigmoid is at least 0.5 (logit >= 0)."""
    return (scores >= 0).astype(int) if multilabel else scores.argmax(axis=1)


def classification_metrics(
    y_true: np.ndarray, scores: np.ndarray, classes: list[str], multilabel: bool, present_only: bool = False
) -> dict[str, float]:
    """Headline numbers of one model on one split.

    Single-label: `y_true` holds class indices (N,), `scores` logits or probabilities (N, C); returns
    accuracy, macro_f1 and, with more than three classes, top3_accuracy. Multi-label: `y_true` is a
    0/1 matrix (N, C), NaN where the answer is unknown, `scores` logits; returns mAP and micro_f1
    (:func:`masked_multilabel_metrics` when some answers are unknown). `present_only`: the macro-F1
    averages over the classes that occur in `y_true` (a split that holds only some classes, as the
    real recordings do), not over all of them.
    """
    known = _known(y_true, multilabel)
    if known is not None:  # unknown answers (OpenMIC): skip them
        return masked_multilabel_metrics(np.nan_to_num(y_true).astype(int), np.asarray(scores), known, classes)
    y_true, scores = _check(y_true, scores, classes, multilabel)
    labels = sorted(set(y_true.tolist())) if present_only and not multilabel else list(range(len(classes)))
    if multilabel:
        # Average precision is undefined for a class with no positive clip in this split (sklearn warns
        # and scores it 0), so mAP averages only over the classes that occur; NaN when none does.
        present = y_true.sum(axis=0) > 0
        mean_ap = (
            float(average_precision_score(y_true[:, present], scores[:, present], average="macro"))
            if present.any()
            else float("nan")
        )
        micro = f1_score(y_true, _predictions(scores, multilabel), average="micro", zero_division=0)
        return {"mAP": mean_ap, "micro_f1": float(micro)}
    predicted = _predictions(scores, multilabel)
    result = {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "macro_f1": float(f1_score(y_true, predicted, average="macro", labels=labels, zero_division=0)),
    }
    if len(classes) > 3:
        result["top3_accuracy"] = float(top_k_accuracy_score(y_true, scores, k=3, labels=list(range(len(classes)))))
    return result


def solo_detection(plays: list[str], heard: list[list[str]]) -> dict[str, float]:
    """Precision and recall of a detector's positives on solo recordings, each with one instrument.

    `plays[i]` is recording i's instrument and `heard[i]` the classes the detector named on it.
    Precision: named classes that are right, over all named (NaN when it named nothing); recall:
    recordings whose instrument was named, over all recordings. Also the mean number named per recording.
    """
    if len(plays) != len(heard):
        raise ValueError(f"{len(plays)} recordings but {len(heard)} sets of answers")
    named = sum(len(answer) for answer in heard)
    right = sum(truth in answer for truth, answer in zip(plays, heard))
    return {"precision": right / named if named else float("nan"), "recall": right / len(plays) if plays else float("nan"),
            "named_per_recording": named / len(plays) if plays else float("nan")}


def masked_multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, known: np.ndarray,
                              classes: list[str]) -> dict[str, float]:
    """mAP and micro-F1 of a multi-label model counting only the known (clip, class) answers (OpenMIC).

    `known` is a boolean (N, C) mask (datasets.multilabel_targets): each class's average precision
    ranks only the clips whose answer for that class is known, and micro-F1 pools only known pairs.
    """
    y_true, scores = _check(y_true, scores, classes, multilabel=True)
    known = np.asarray(known, dtype=bool)
    if known.shape != y_true.shape:
        raise ValueError(f"known must have the shape of y_true {y_true.shape}, got {known.shape}")
    precisions = [
        average_precision_score(y_true[known[:, c], c], scores[known[:, c], c])
        for c in range(len(classes)) if y_true[known[:, c], c].any()  # AP needs a known positive
    ]
    micro = f1_score(y_true[known], _predictions(scores, multilabel=True)[known], zero_division=0)
    return {"mAP": float(np.mean(precisions)) if precisions else float("nan"), "micro_f1": float(micro)}


def per_class_report(y_true: np.ndarray, scores: np.ndarray, classes: list[str], multilabel: bool) -> pd.DataFrame:
    """Precision, recall, F1 and support of every class, one row per class (index: class names).

    Multi-label answers that are unknown (NaN) are left out of their class's row.
    """
    known = _known(y_true, multilabel)
    if known is not None:
        y_true, scores = np.nan_to_num(np.asarray(y_true, dtype=np.float64)).astype(int), np.asarray(scores)
        predicted, rows = _predictions(scores, multilabel=True), {}
        for c, name in enumerate(classes):
            answered = known[:, c]
            p, r, f, _ = precision_recall_fscore_support(y_true[answered, c], predicted[answered, c],
                                                         average="binary", zero_division=0)
            rows[name] = {"precision": p, "recall": r, "f1-score": f, "support": int(y_true[answered, c].sum())}
        return pd.DataFrame(rows).T.astype({"support": int})[["precision", "recall", "f1-score", "support"]]
    y_true, scores = _check(y_true, scores, classes, multilabel)
    report = classification_report(
        y_true,
        _predictions(scores, multilabel),
        labels=list(range(len(classes))),
        target_names=classes,
        output_dict=True,
        zero_division=0,
    )
    frame = pd.DataFrame({name: report[name] for name in classes}).T
    frame["support"] = frame["support"].astype(int)
    return frame[["precision", "recall", "f1-score", "support"]]


def confusion_figure(y_true: np.ndarray, scores: np.ndarray, classes: list[str], title: str = "") -> plt.Figure:
    """Confusion matrix of a single-label model, each row in percent of that true class's clips.

    Zero cells are left blank so that, with 14 classes, the eye goes to the diagonal and the confusions.
    """
    y_true, scores = _check(y_true, scores, classes, multilabel=False)
    fig, ax = plt.subplots(figsize=(7, 6))
    display = ConfusionMatrixDisplay.from_predictions(
        y_true,
        _predictions(scores, multilabel=False),
        labels=list(range(len(classes))),
        display_labels=classes,
        normalize="true",
        values_format=".0%",  # Python's percent format: 0.25 -> "25%"
        ax=ax,
        colorbar=False,
        text_kw={"fontsize": 7},
        im_kw={"vmin": 0.0, "vmax": 1.0},
    )
    for text, value in zip(display.text_.ravel(), display.confusion_matrix.ravel()):
        if round(value * 100) == 0:
            text.set_text("")
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")  # label ends under its column
    ax.set_title(title or "confusion matrix (% of each true class)")
    fig.tight_layout()
    return fig


def pr_curve_figure(
    y_true: np.ndarray, scores: np.ndarray, classes: list[str], multilabel: bool, title: str = ""
) -> plt.Figure:
    """One-vs-rest precision-recall curve of every class, and the micro-average over all of them in bold.

    A class without a positive clip has no curve (recall is undefined) and is left out of the legend.
    """
    known = _known(y_true, multilabel)  # OpenMIC: unknown answers
    if known is not None:
        y_true = np.nan_to_num(np.asarray(y_true, dtype=np.float64))
    y_true, scores = _check(y_true, scores, classes, multilabel)
    probabilities = _probabilities(scores, multilabel)
    onehot = y_true if multilabel else np.eye(len(classes), dtype=int)[y_true]
    known = np.ones(onehot.shape, dtype=bool) if known is None else known
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10
    for index, name in enumerate(classes):
        if onehot[known[:, index], index].any():
            PrecisionRecallDisplay.from_predictions(
                onehot[known[:, index], index],
                probabilities[known[:, index], index],
                name=name,
                ax=ax,
                curve_kwargs={"linewidth": 1, "color": colors[index % len(colors)]},
            )
    PrecisionRecallDisplay.from_predictions(
        onehot[known],
        probabilities[known],
        name="micro-average",
        ax=ax,
        curve_kwargs={"linewidth": 2.5, "color": "black"},
    )
    ax.set(
        title=title or "precision-recall, one class against the rest",
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return fig


@dataclass
class Complexity:
    """What one model costs: size, arithmetic and CPU time."""

    params: int  # all parameters
    size_mb: float  # size of the saved checkpoint file on disk, MB = 1e6 bytes
    macs: int  # multiply-accumulates of one forward on example_input (batch 1), counted by thop
    latency_ms: float  # median wall time of one forward at batch 1, CPU, `threads` threads
    latency_batch_ms: float  # median time per clip at batch `batch` (small models are overhead-bound at batch 1)
    threads: int


def median_ms(forward: Callable[[Any], Any], inputs: Any, repeats: int, warmup: int) -> float:
    """Median wall time of one `forward(inputs)` call, in milliseconds, after `warmup` untimed calls.

    `forward` is a PyTorch module or any other callable (an ONNX Runtime session's run), so that
    every runtime is timed by the same loop.
    """
    times = []
    with torch.inference_mode():
        for step in range(warmup + repeats):
            start = time.perf_counter()
            forward(inputs)
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def complexity(
    model: nn.Module,
    example_input: torch.Tensor,
    checkpoint: str | Path,
    threads: int = 1,
    repeats: int = 30,
    warmup: int = 5,
    batch: int = 32,
) -> Complexity:
    """Measure a model: parameters, checkpoint size, MACs of one clip and CPU latency.

    `example_input` is one clip as the model takes it (batch 1, e.g. (1, 1, mels, frames)); `checkpoint`
    the file the model was saved to. The model itself is left untouched: counting and timing run on
    CPU copies.

    MACs come from thop (pytorch-OpCounter), the counter most compression papers quote. It counts only
    module types it knows: convolutions (without their bias) and linear layers as MACs, but also BatchNorm
    (4 per element with its affine scale and shift, though inference usually folds it into the convolution)
    and average pooling (one add per input element plus a division per output), while activations such as
    Hardswish and functional operations inside `forward` (residual additions, the squeeze-excitation
    product) count as zero.
    """
    if example_input.shape[0] != 1:
        raise ValueError(f"example_input must hold one clip (batch 1), got shape {tuple(example_input.shape)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist: save the model before measuring it")
    clip = example_input.detach().cpu()
    cpu_model = copy.deepcopy(model).cpu().eval()
    # thop registers counting buffers and hooks on the module it profiles (and leaves some behind on
    # modules it has no rule for), so it gets a throwaway copy.
    macs, _ = thop.profile(copy.deepcopy(cpu_model), inputs=(clip,), verbose=False)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        latency = median_ms(cpu_model, clip, repeats, warmup)
        batched = clip.repeat(batch, *([1] * (clip.dim() - 1)))
        latency_batch = median_ms(cpu_model, batched, repeats, warmup) / batch
    finally:
        torch.set_num_threads(previous_threads)
    return Complexity(
        params=sum(p.numel() for p in model.parameters()),
        size_mb=checkpoint.stat().st_size / 1e6,
        macs=int(macs),
        latency_ms=latency,
        latency_batch_ms=latency_batch,
        threads=threads,
    )
