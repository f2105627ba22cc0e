"""Pruning: masks leave the original alone, channel pruning shrinks consistently and survives a checkpoint."""

from __future__ import annotations

import copy

import pytest
import thop
import torch
from torch import nn

from audiokd_lib.compress import prune
from audiokd_lib.core.params import load_params
from audiokd_lib.experiment import evaluation
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
    assert pruned.spec["pruning"] == {"kind": "unstructured", "amount": 0.7, "ranking": "lamp"}
    assert not torch.nn.utils.prune.is_pruned(pruned)  # masks made permanent: plain tensors, no hooks

    dense_file = checkpoints.save_checkpoint(model, tmp_path / "dense.pt")
    assert prune.nonzero_macs(model, features[:1]) == evaluation.measure(params, model, dense_file, features)["macs"]
    assert prune.nonzero_macs(pruned, features[:1]) < 0.7 * prune.nonzero_macs(model, features[:1])
    pruned_file = checkpoints.save_checkpoint(pruned, tmp_path / "pruned.pt")
    assert pruned_file.stat().st_size == pytest.approx(dense_file.stat().st_size, rel=0.01)  # zeros are stored
    with torch.no_grad():
        assert torch.equal(checkpoints.load_checkpoint(pruned_file).head(features), pruned.head(features))
    assert prune.compressed_size_mb(pruned) < 0.5 * dense_file.stat().st_size / 1e6
    assert prune.compressed_size_mb(pruned) < 0.5 * prune.compressed_size_mb(model)


def test_lamp_ranking_spreads_the_zeros_where_raw_magnitudes_empty_layers(tiny_student):
    model = tiny_student(CLASSES)
    layer_sparsity = {}
    for ranking in ("l1", "lamp"):
        pruned = prune.prune_unstructured(model, 0.7, ranking=ranking)
        assert prune.sparsity(pruned)["weight_sparsity"] == pytest.approx(0.7, abs=0.01)
        layer_sparsity[ranking] = [1 - torch.count_nonzero(m.weight).item() / m.weight.numel()
                                   for m in prune.prunable_layers(pruned)]
    # The classifier's weights start a hundred times smaller than the convolutions': raw |w| takes them all.
    assert layer_sparsity["l1"][-1] == 1.0
    assert max(layer_sparsity["lamp"]) < 1.0  # every layer keeps its largest weights

    weight = torch.tensor([[3.0, -1.0], [0.0, 2.0]])
    assert torch.allclose(prune.lamp_scores(weight), torch.tensor([[1.0, 1 / 14], [0.0, 4 / 13]]))


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


def mean_gap_to_batch_statistics(model, features):
    """How far eval-mode logits (running statistics) lie from train-mode logits (this batch's statistics)."""
    batch_mode = copy.deepcopy(model).train()
    for module in batch_mode.modules():
        if isinstance(module, nn.Dropout):
            module.eval()  # only BatchNorm should differ between the two forwards
    with torch.no_grad():
        return (model.eval().head(features) - batch_mode.head(features)).abs().mean().item()


def test_batchnorm_recalibration_measures_statistics_again_and_leaves_weights_alone(tiny_student):
    features = torch.randn(64, 1, 128, 50, generator=torch.Generator().manual_seed(0)) * 3 - 6
    trained = prune.recalibrate_batchnorm(tiny_student(CLASSES), features)  # statistics of the unpruned network
    pruned = prune.prune_channels(trained, 0.5, features[:1])
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    recalibrated = prune.recalibrate_batchnorm(pruned, features, batches=4, batch_size=16)

    assert all(torch.equal(state[k], v) for k, v in pruned.state_dict().items())  # a copy: the input is untouched
    norms = [m for m in recalibrated.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in norms} == {0.1} and not recalibrated.training  # the student's own momentum is back
    for name, value in recalibrated.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            assert not torch.equal(value, state[name]), name
        elif name.endswith("num_batches_tracked"):
            assert value.item() == 4
        else:
            assert torch.equal(value, state[name]), name  # weights, biases and the normalisation do not move
    assert prune.channel_counts(recalibrated) == prune.channel_counts(pruned)
    # Pruned, the layers after a cut see other activations than their statistics describe; measured again, they match.
    assert mean_gap_to_batch_statistics(recalibrated, features) < 0.5 * mean_gap_to_batch_statistics(pruned, features)


def test_reinitialised_control_keeps_the_pruned_architecture_with_fresh_weights(tiny_student):
    features = torch.randn(4, 1, 128, 50)
    pruned = prune.recalibrate_batchnorm(prune.prune_channels(tiny_student(CLASSES), 0.5, features[:1]), features)
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    fresh = prune.reinitialise(pruned, seed=1)

    assert all(torch.equal(state[k], v) for k, v in pruned.state_dict().items())
    assert prune.channel_counts(fresh) == prune.channel_counts(pruned)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert fresh.spec["pruning"] == {**pruned.spec["pruning"], "reinitialised": 1}
    for name, module in fresh.net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert not torch.equal(module.weight, state[f"net.{name}.weight"]), name
        if isinstance(module, nn.Conv2d):
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            if module.weight.numel() >= 256:  # enough draws for the spread to be the He-normal one
                assert module.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.25), name
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.running_var, torch.ones_like(module.running_var))
    assert torch.equal(fresh.normalise.shift, pruned.normalise.shift)  # the front end is not part of the network
    again, other = prune.reinitialise(pruned, seed=1), prune.reinitialise(pruned, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), other.parameters()))
    assert fresh.head(features).shape == (4, 3)
