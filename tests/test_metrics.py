"""Tests for audiokd_lib.metrics: scores on hand-computable cases, figures, and the cost of a tiny model."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from audiokd_lib.core import metrics

CLASSES3 = ["flute", "oboe", "violin"]
CLASSES4 = ["flute", "oboe", "violin", "tuba"]

# A 3-class case worked out by hand: true 0 0 1 1 2 2, predicted 0 1 1 1 2 0.
#   flute:  TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2
#   oboe:   TP 2, FP 1, FN 0 -> P 2/3, R 1,   F1 4/5
#   violin: TP 1, FP 0, FN 1 -> P 1,   R 1/2, F1 2/3
HAND_TRUE = np.array([0, 0, 1, 1, 2, 2])
HAND_SCORES = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 4.0  # logits whose argmax is the prediction

# Multi-label: two classes occur, "tuba" never does.
#   flute scores rank pos, neg, pos, neg  -> AP (1 + 2/3) / 2 = 5/6
#   oboe scores rank pos, pos, neg, neg   -> AP 1
ML_TRUE = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
ML_SCORES = np.array([[2.0, -2.0, -1.0], [-1.0, 1.0, -1.0], [0.5, 3.0, -1.0], [1.0, 0.0, -1.0]])
ML_CLASSES = ["flute", "oboe", "tuba"]


def test_perfect_single_label_predictions_score_one():
    y_true = np.array([0, 1, 2, 3, 0, 1])
    result = metrics.classification_metrics(y_true, np.eye(4)[y_true] * 5.0, CLASSES4, multilabel=False)
    assert result == {"accuracy": 1.0, "macro_f1": 1.0, "top3_accuracy": 1.0}


def test_single_label_metrics_match_the_hand_computation():
    result = metrics.classification_metrics(HAND_TRUE, HAND_SCORES, CLASSES3, multilabel=False)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert "top3_accuracy" not in result  # with three classes it is always 1


def test_probabilities_give_the_same_metrics_as_logits():
    logits = np.random.default_rng(0).normal(size=(20, 4))
    y_true = np.arange(20) % 4
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert metrics.classification_metrics(y_true, logits, CLASSES4, False) == pytest.approx(
        metrics.classification_metrics(y_true, probabilities, CLASSES4, False)
    )


def test_top3_counts_the_true_class_among_the_three_highest():
    scores = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    # clip 0: class 0 is ranked last -> miss; clip 1: class 2 is ranked third -> hit
    result = metrics.classification_metrics(np.array([0, 2]), scores, CLASSES4, multilabel=False)
    assert result["top3_accuracy"] == 0.5


def test_multilabel_map_ignores_a_class_without_positives():
    result = metrics.classification_metrics(ML_TRUE, ML_SCORES, ML_CLASSES, multilabel=True)
    assert result["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    assert result["mAP"] == pytest.approx(average_precision_score(ML_TRUE[:, :2], ML_SCORES[:, :2], average="macro"))
    # sigmoid >= 0.5: predicted flute 1 0 1 1, oboe 0 1 1 1, tuba never -> TP 4, FP 2, FN 0 -> F1 0.8
    assert result["micro_f1"] == pytest.approx(0.8)


def test_perfect_multilabel_predictions_score_one():
    result = metrics.classification_metrics(ML_TRUE, (ML_TRUE * 2 - 1) * 3.0, ML_CLASSES, multilabel=True)
    assert result == {"mAP": 1.0, "micro_f1": 1.0}


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"4 classes.*got shape \(6, 3\)"):
        metrics.classification_metrics(HAND_TRUE, HAND_SCORES, CLASSES4, multilabel=False)
    with pytest.raises(ValueError, match="0/1 matrix"):
        metrics.classification_metrics(HAND_TRUE, HAND_SCORES, CLASSES3, multilabel=True)


def test_per_class_report_has_one_row_per_class():
    report = metrics.per_class_report(HAND_TRUE, HAND_SCORES, CLASSES3, multilabel=False)
    assert list(report.index) == CLASSES3
    assert list(report.columns) == ["precision", "recall", "f1-score", "support"]
    assert report.loc["oboe", "f1-score"] == pytest.approx(4 / 5)
    assert report["support"].tolist() == [2, 2, 2]
    multilabel = metrics.per_class_report(ML_TRUE, ML_SCORES, ML_CLASSES, multilabel=True)
    assert list(multilabel.index) == ML_CLASSES
    assert multilabel.loc["tuba", "support"] == 0


def test_confusion_figure_has_one_axes_and_percent_labels():
    fig = metrics.confusion_figure(HAND_TRUE, HAND_SCORES, CLASSES3, title="hand")
    try:
        assert len(fig.axes) == 1  # no colorbar
        texts = sorted(t.get_text() for t in fig.axes[0].texts if t.get_text())
        assert texts == ["100%", "50%", "50%", "50%", "50%"]  # zero cells are blank
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    ("y_true", "scores", "classes", "multilabel", "curves"),
    [
        (HAND_TRUE, HAND_SCORES, CLASSES3, False, 3),
        (ML_TRUE, ML_SCORES, ML_CLASSES, True, 2),  # tuba has no positive clip, hence no curve
    ],
)
def test_pr_curve_figure_draws_a_curve_per_class_and_the_micro_average(y_true, scores, classes, multilabel, curves):
    fig = metrics.pr_curve_figure(y_true, scores, classes, multilabel)
    try:
        assert len(fig.axes) == 1
        lines = fig.axes[0].get_lines()
        assert len(lines) == curves + 1
        assert lines[-1].get_linewidth() > lines[0].get_linewidth()  # the micro-average stands out
    finally:
        plt.close(fig)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_complexity_of_a_tiny_model(tmp_path):
    model = tiny_model()
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        result = metrics.complexity(model, torch.randn(1, 1, 8, 8), checkpoint, threads=1, repeats=5, warmup=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
    assert result.params == 4 * 9 + 4 + 4 * 2 + 2 == 50
    # By hand, multiply-accumulates are 4*9*36 (conv: 4 channels x 9 taps x 36 outputs) + 8 (linear) = 1304.
    # thop also counts the adaptive average pool: 36 additions + 1 division per output, 4 outputs = 148,
    # and leaves the conv bias out; 1296 + 148 + 8 = 1452.
    assert result.macs == 4 * 9 * 36 + 4 * (36 + 1) + 8 == 1452
    assert result.size_mb == pytest.approx(checkpoint.stat().st_size / 1e6)
    for latency in (result.latency_ms, result.latency_batch_ms):
        assert 0 < latency < 100 and math.isfinite(latency)  # microseconds of arithmetic, plus overhead
    assert result.threads == 1
    assert list(model.buffers()) == []  # thop's counting buffers went onto a copy


def test_complexity_explains_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="batch 1"):
        metrics.complexity(tiny_model(), torch.randn(2, 1, 8, 8), tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="save the model"):
        metrics.complexity(tiny_model(), torch.randn(1, 1, 8, 8), tmp_path / "missing.pt")
