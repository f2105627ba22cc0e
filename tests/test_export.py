"""ONNX export of a student's head: same logits as PyTorch, any batch and clip length, usable alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from audiokd_lib.compress import export


@pytest.fixture(scope="module")
def student_and_features(tiny_student):
    """A tiny student whose logits are of order one, and real log-mel features of noise for it.

    A freshly built student outputs logits near 1e-3, against which any tolerance passes; its BatchNorm
    statistics are fitted to the features and its last layer scaled up, as training would do.
    """
    model = tiny_student().train()  # train mode: the batch below sets the BatchNorm statistics
    features = model.features(0.1 * torch.randn(6, 32000, generator=torch.Generator().manual_seed(0)))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average of the batches seen
    with torch.no_grad():
        model.head(features)
        model.net.classifier[-1].weight.mul_(300)
    return model.eval(), features


@pytest.fixture(scope="module")
def onnx_file(student_and_features, tmp_path_factory):
    model, features = student_and_features
    path = export.export_onnx(model, features[:1], tmp_path_factory.mktemp("onnx") / "sub" / "student.onnx")
    assert not model.net.training, "exporting must leave the model in eval mode"
    return path


def test_export_matches_pytorch_for_any_batch_and_length(student_and_features, onnx_file):
    model, features = student_and_features
    path = onnx_file
    report = export.check_onnx(model, path, features[:5])
    assert report["max_abs_diff"] < 1e-4 and report["min_cosine"] > 0.9999 and report["argmax_agrees"]
    assert report["clips"] == 5
    with torch.inference_mode():
        assert model.head(features).abs().max() > 0.1  # the tolerance above means something

    session = export.onnx_session(path)
    longer = torch.cat([features, features], dim=3)  # twice the frames of the traced example
    for batch in (features[:1], features[:5], longer[:2]):
        got = session.run(["logits"], {"features": batch.numpy()})[0]
        with torch.inference_mode():
            np.testing.assert_allclose(got, model.head(batch).numpy(), atol=1e-4)


def test_onnx_file_describes_itself(onnx_file):
    path = onnx_file
    proto = onnx.load(str(path))
    meta = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(meta["classes"]) == ["a", "b", "c"]
    spec = json.loads(meta["spec"])
    assert spec["features"]["n_mels"] == 128 and spec["sample_rate"] == 32000 and spec["multilabel"] is False
    assert [i.name for i in proto.graph.input] == ["features"] and proto.opset_import[0].version == export.OPSET
    assert sorted(p.name for p in path.parent.iterdir()) == ["student.onnx"]  # one file, no temporary left


def test_timing_reports_both_runtimes(student_and_features, onnx_file):
    model, features = student_and_features
    times = export.time_onnx(model, onnx_file, features, repeats=2, warmup=1, batches=(1, 8))
    assert set(times) == {"onnxruntime", "pytorch"}
    assert all(set(per_batch) == {1, 8} and min(per_batch.values()) > 0 for per_batch in times.values())


def test_training_mode_is_refused(student_and_features, onnx_file):
    model, features = student_and_features
    model.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            export.check_onnx(model, onnx_file, features)
    finally:
        model.eval()
