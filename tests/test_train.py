"""The shared training loop: distillation loss, feature augmentation, fitting, resuming, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audiokd_lib import training
from audiokd_lib.audio.features import NormStats
from audiokd_lib.compress import distill
from audiokd_lib.compress.distill import distillation_loss
from audiokd_lib.core.params import KDParams, load_params
from audiokd_lib.models import checkpoints, students
from audiokd_lib.training import FeatureAugment, FeatureSet, fit


def test_distillation_loss_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen) * 3
    y = torch.tensor([0, 1, 2, 3, 1])
    t, alpha = 3.0, 0.7
    p_t, p_s = torch.softmax(z_t / t, 1), torch.softmax(z_s / t, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    ce = -torch.log_softmax(z_s, 1)[torch.arange(5), y].mean()
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert torch.isclose(distillation_loss(z_s, z_t, y, t, alpha), expected, atol=1e-6)


def test_distillation_loss_limits():
    z_s, z_t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.isclose(distillation_loss(z_s, z_t, y, 3.0, 0.0), F.cross_entropy(z_s, y))
    assert distillation_loss(z_t, z_t, y, 3.0, 1.0).abs() < 1e-6
    # Multi-label: BCE against the teacher's tempered sigmoids, mixed with the hard BCE.
    y_multi = torch.randint(0, 2, (6, 5)).float()
    soft = F.binary_cross_entropy_with_logits(z_s / 2.0, torch.sigmoid(z_t / 2.0))
    expected = 0.5 * 4.0 * soft + 0.5 * F.binary_cross_entropy_with_logits(z_s, y_multi)
    assert torch.isclose(distillation_loss(z_s, z_t, y_multi, 2.0, 0.5, multilabel=True), expected)


def test_soft_targets_round_trip_to_logits():
    z = torch.randn(3, 4) * 4
    for multilabel in (False, True):
        probs = distill.soft_targets(z, 3.0, multilabel)
        again = distill.soft_targets(distill.logits_at(probs, 3.0, multilabel), 3.0, multilabel)
        assert torch.allclose(probs, again, atol=1e-5)


def test_feature_augment_keeps_shapes_and_label_mass(tiny):
    params, classes, stats, data = tiny
    model = students.build_student(params, classes, stats)
    aug = FeatureAugment(params, model, seed=0, kinds=["gain", "noise", "specaugment", "mixup"], crop_frames=25)
    probs = torch.softmax(torch.randn(16, 4), 1)
    x, y, extra = aug(data.features[:16], data.targets[:16], probs)
    assert x.shape == (16, 1, 128, 25) and torch.isfinite(x).all()
    assert torch.allclose(y.sum(1), torch.ones(16)) and torch.allclose(extra.sum(1), torch.ones(16))
    gain_only = FeatureAugment(params, model, seed=0, kinds=["gain"], crop_frames=None)
    shifted, _, _ = gain_only(data.features[:16], data.targets[:16])
    offsets = (shifted - data.features[:16]).flatten(1)
    assert torch.allclose(offsets.min(1).values, offsets.max(1).values, atol=1e-4)  # one constant per clip


def test_fit_learns_restores_the_best_epoch_and_resumes_exactly(tiny, tmp_path):
    params, classes, stats, data = tiny
    tp = params.train.model_copy(update={"batch_size": 16, "crop_seconds": None, "patience": 5, "augment": []})

    def run(folder, on_epoch=None):
        torch.manual_seed(0)
        model = students.build_student(params, classes, stats)
        result = fit(model, data, data, tp.model_copy(update={"epochs": 4}), params, 0, tmp_path / folder,
                     on_epoch=on_epoch, progress=False)
        return model, result

    model, full = run("straight")
    assert full.best_score > 0.5 and len(full.history) == 4
    best_row = full.history.loc[full.history["epoch"] == full.best_epoch].iloc[0]
    assert best_row["val_macro_f1"] == pytest.approx(full.best_score)

    def interrupt(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    # Interrupted after two epochs, then started again: it resumes and ends where the straight run did.
    with pytest.raises(KeyboardInterrupt):
        run("resumed", interrupt)
    _, resumed = run("resumed")
    assert resumed.history["train_loss"].tolist() == pytest.approx(full.history["train_loss"].tolist(), rel=1e-5)


def test_checkpoint_rebuilds_the_same_model(tiny, tmp_path):
    params, classes, stats, _ = tiny
    model = students.build_student(params, classes, NormStats(torch.randn(128), torch.rand(128) + 0.5, 1, [], "f", "d"))
    path = checkpoints.save_checkpoint(model.eval(), tmp_path / "model.pt")
    again = checkpoints.load_checkpoint(path)
    wave = torch.randn(2, 16000)
    assert torch.allclose(model(wave), again(wave), atol=1e-6)
    assert again.classes == classes and again.spec["kind"] == "student"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not an audiokd checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "junk.pt")


def test_an_unstructured_pruned_model_keeps_its_zeros_while_it_trains(tiny, tmp_path):
    from audiokd_lib.compress import prune

    params, classes, stats, data = tiny
    sparse = prune.prune_unstructured(students.build_student(params, classes, stats, seed=0), 0.6)
    zeros_before = prune.sparsity(sparse)["weight_sparsity"]
    fit(sparse, data, data, params.train.model_copy(update={"epochs": 1}), params, 0, tmp_path, progress=False)
    assert prune.sparsity(sparse)["weight_sparsity"] == pytest.approx(zeros_before)


def test_multilabel_tables_give_multi_hot_targets(smoke_profile, tmp_path):
    import numpy as np
    import pandas as pd
    import soundfile as sf

    params = load_params(smoke_profile)
    classes = ["bass", "drums", "piano"]
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"piece{i}.wav"))
        sf.write(paths[-1], np.random.default_rng(i).normal(0, 0.1, 16000).astype(np.float32), 16000)
    table = pd.DataFrame({"path": paths, "labels": ["bass|drums", "piano", "drums|piano|bass"], "split": "train"})
    stats = NormStats(torch.zeros(128), torch.ones(128), 1, [], "f", "d")
    model = students.build_student(params, classes, stats, multilabel=True)
    data = training.cached_features(params, table, "train", model, "test-key", classes, progress=False)
    assert data.multilabel and data.targets.dtype == torch.float32
    assert data.targets.tolist() == [[1, 1, 0], [0, 0, 1], [1, 1, 1]]
    again = training.cached_features(params, table, "train", model, "test-key", classes, progress=False)  # the cache
    assert torch.equal(again.targets, data.targets) and torch.equal(again.features, data.features)
    # Multi-hot rows go through mixup (as a union), a distillation fit and mAP like class indices do.
    tp = params.train.model_copy(update={"epochs": 1, "batch_size": 3, "crop_seconds": 0.5})
    result = fit(model, data, data, tp, params, 0, tmp_path / "run", teacher_logits=torch.randn(3, 3),
                 kd=KDParams(temperature=2.0, alpha=0.5), progress=False)
    assert result.metric == "mAP" and 0.0 <= result.best_score <= 1.0
    # OpenMIC's unanswered questions are NaN targets, which the loss and the metrics skip.
    unknown = table.assign(labels_unknown=["piano", "bass", ""])
    partial = training.cached_features(params, unknown, "train", model, "test-key", classes, progress=False)
    assert partial.targets.isnan().tolist() == [[False, False, True], [True, False, False], [False] * 3]
    assert training.class_names(unknown) == classes and training.is_multilabel(unknown)
    result = fit(model, partial, partial, tp, params, 0, tmp_path / "run-unknown", progress=False)
    assert np.isfinite(result.history["train_loss"]).all() and 0.0 <= result.best_score <= 1.0


def test_unknown_answers_add_no_loss_and_stay_unknown_through_mixup():
    from audiokd_lib.audio import augment
    from audiokd_lib.core import losses

    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    nan = float("nan")
    targets = torch.tensor([[1.0, nan], [nan, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    assert torch.isclose(losses.hard_loss(logits, targets, multilabel=True), expected)
    # Union mixup: a sure positive on either side is a positive; otherwise an unknown side leaves it unknown.
    y = torch.tensor([[1.0, nan, 0.0], [nan, 0.0, 0.0]])
    _, mixed, lam = augment.mixup(torch.zeros(2, 1), y, 0.4, np.random.default_rng(1), multilabel=True)
    assert (lam < 1).all()  # seed 1: both rows are mixed with the other one
    assert mixed[:, 0].tolist() == [1.0, 1.0] and mixed[:, 1].isnan().all() and mixed[:, 2].tolist() == [0.0, 0.0]


def test_a_transfer_set_is_labelled_by_the_teacher_only(tiny, tmp_path):
    params, classes, stats, data = tiny
    train, transfer = data, FeatureSet(data.features[:16] + 0.1, data.targets[:16], [f"t{i}" for i in range(16)],
                                       classes, "fp")
    train_logits, transfer_logits = torch.randn(64, 4), torch.randn(16, 4) * 3
    combined, logits = training.with_transfer_set(train, transfer, train_logits, transfer_logits)
    assert len(combined) == 80 and not combined.multilabel and torch.equal(logits[64:], transfer_logits)
    assert torch.equal(combined.targets[:64], F.one_hot(data.targets, 4).float())  # labelled clips keep labels
    assert torch.allclose(combined.targets[64:], torch.softmax(transfer_logits, 1))  # the rest: the teacher's view
    tp = params.train.model_copy(update={"batch_size": 16, "crop_seconds": None, "epochs": 2,
                                         "augment": ["mixup", "gain"]})
    model = students.build_student(params, classes, stats)
    result = fit(model, combined, data, tp, params, 0, tmp_path / "kd", teacher_logits=logits,
                 kd=KDParams(temperature=2.0, alpha=0.9), progress=False)
    assert len(result.history) == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_cached_soft_labels_are_mixed_with_the_inputs_lambda_and_partner(tiny):
    params, classes, stats, data = tiny
    model = students.build_student(params, classes, stats)
    aug = FeatureAugment(params, model, seed=3, kinds=["mixup"], crop_frames=None)
    y = data.targets[:16]
    # Soft labels equal to the one-hot labels must come out equal to the mixed labels, row by row.
    _, mixed_y, mixed_soft = aug(data.features[:16], y, F.one_hot(y, 4).float())
    assert torch.equal(mixed_y, mixed_soft)
    assert (mixed_y.max(dim=1).values < 1).any()  # some rows really were mixed
