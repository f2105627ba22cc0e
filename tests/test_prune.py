"""Pruning: masks leave the original alone, channel pruning shrinks consistently and survives a checkpoint."""

from __future__ import annotations

import copy

import pytest
import thop
import torch
from torch import nn

from audiokd_lib.compress import prune
from audiokd_lib.experiment import runs
from audiokd_lib.experiment.params import load_params
from audiokd_lib.models import checkpoints

CLASSES = ["Flute", "Oboe", "Violin"]


def thop_macs(model, features):
    return thop.profile(copy.deepcopy(model.net), inputs=(model.normalise(features),), verbose=False)[0]


def test_unstructured_pruning_zeroes_weights_of_a_copy_but_not_its_file_size(smoke_profile, tiny_student, tmp_path):
    params, model = load_params(smoke_profile), tiny_student(CLASSES)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    features = torch.randn(2, 1, 128, 50)
    pruned = prune.prune_unstructured(model, 0.7)

    assert prune.sparsity(pruned)["weight_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert prune.sparsity(pruned)["nonzero_params"] < 0.35 * prune.sparsity(pruned)["params"]
    assert prune.sparsity(model)["weight_sparsity"] == 0
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert pruned.head(features).shape == (2, 3)
    assert pruned.spec["pruning"] == {"kind": "unstructured", "amount": 0.7}
    assert not torch.nn.utils.prune.is_pruned(pruned)  # masks made permanent: plain tensors, no hooks

    dense_file = checkpoints.save_checkpoint(model, tmp_path / "dense.pt")
    assert prune.nonzero_macs(model, features[:1]) == runs.measure(params, model, dense_file, features)["macs"]
    assert prune.nonzero_macs(pruned, features[:1]) < 0.7 * prune.nonzero_macs(model, features[:1])
    pruned_file = checkpoints.save_checkpoint(pruned, tmp_path / "pruned.pt")
    assert pruned_file.stat().st_size == pytest.approx(dense_file.stat().st_size, rel=0.01)  # zeros are stored
    with torch.no_grad():
        assert torch.equal(checkpoints.load_checkpoint(pruned_file).head(features), pruned.head(features))
    assert prune.compressed_size_mb(pruned) < 0.5 * dense_file.stat().st_size / 1e6
    assert prune.compressed_size_mb(pruned) < 0.5 * prune.compressed_size_mb(model)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v2"])
def test_channel_pruning_shrinks_every_coupled_layer_and_loads_back(tiny_student, tmp_path, arch):
    model = tiny_student(CLASSES, arch=arch)
    before = prune.channel_counts(model)
    features = torch.randn(2, 1, 128, 50)
    pruned = prune.prune_channels(model, 0.5, features[:1])

    assert prune.channel_counts(model) == before
    after = prune.channel_counts(pruned)
    assert after.keys() == before.keys() and all(after[k] <= before[k] for k in before)
    assert sum(after.values()) - 3 < 0.6 * (sum(before.values()) - 3)  # the last linear layer keeps its 3 classes
    assert list(after.values())[-1] == 3 and pruned.head(features).shape == (2, 3)
    assert sum(p.numel() for p in model.parameters()) > 3 * sum(p.numel() for p in pruned.parameters())
    assert thop_macs(model, features[:1]) > 2.5 * thop_macs(pruned, features[:1])
    for module in pruned.net.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            assert module.groups == module.in_channels == module.out_channels
    assert pruned.spec["pruning"] == {"kind": "structured", "ratio": 0.5, "importance": "l1"}

    loaded = checkpoints.load_checkpoint(checkpoints.save_checkpoint(pruned, tmp_path / "pruned.pt"))
    assert prune.channel_counts(loaded) == after
    assert [m.groups for m in loaded.modules() if isinstance(m, nn.Conv2d)] == \
        [m.groups for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        assert torch.equal(loaded.head(features), pruned.head(features))


def test_taylor_importance_ranks_channels_by_gradients_of_one_batch(tiny_student):
    model = tiny_student(CLASSES)
    features = torch.randn(8, 1, 128, 50)
    calibration = (features, torch.arange(8) % 3)
    with pytest.raises(ValueError, match="calibration"):
        prune.prune_channels(model, 0.5, features[:1], importance="taylor")

    taylor = prune.prune_channels(model, 0.5, features[:1], importance="taylor", calibration=calibration)
    l1 = prune.prune_channels(model, 0.5, features[:1])
    assert prune.channel_counts(taylor) == prune.channel_counts(l1) and taylor.head(features).shape == (8, 3)
    assert not all(torch.equal(a, b) for a, b in zip(taylor.parameters(), l1.parameters()))
    assert all(p.grad is None for p in (*model.parameters(), *taylor.parameters()))
