"""Pruning: removing weights (unstructured) or whole channels (structured) from a trained student.

Two ways to make a network smaller by deleting parts of it:

- **Unstructured** (:func:`prune_unstructured`): set the individually least important weights to zero,
  ranked across all layers at once, by magnitude rescaled per layer (LAMP, :func:`lamp_scores`) so that
  no layer is emptied. Accuracy holds up well to high sparsity, but the tensors keep
  their shapes: the checkpoint is as large as before and a dense CPU kernel multiplies the zeros just
  the same. The savings are real only for a sparse storage format (:func:`compressed_size_mb`) or
  sparse hardware, and :func:`nonzero_macs` counts what such hardware could skip.
- **Structured** (:func:`prune_channels`): remove whole output channels of convolutions, so every
  tensor shrinks and any dense kernel gets faster. A channel cannot be removed alone: the next layer's
  input, the BatchNorm after it, a depthwise convolution, a squeeze-excitation gate and every block
  joined by a residual addition must lose the same channel. torch-pruning's dependency graph (DepGraph,
  Fang et al., 2023) traces the network once to find these coupled groups and removes channels group by
  group, ranked by the importance of the whole group.

A structurally pruned model is a :class:`~audiokd_lib.models.classifier.Classifier` like any other; its spec
records how it was pruned, and :func:`~audiokd_lib.models.checkpoints.load_checkpoint` rebuilds it at its new width.

Pruned either way, a network's BatchNorm layers still hold the running statistics of the unpruned one,
measured on activations that no longer exist; :func:`recalibrate_batchnorm` measures them again (adaptive
BatchNorm, EagleEye: Li et al., 2020), which alone lifts a student pruned in one shot from near chance to
a useful start for re-training.
:func:`reinitialise` gives a pruned architecture fresh random weights: the control that asks whether the
pruned weights were worth keeping at all (Liu et al., 2019).
"""

from __future__ import annotations

import copy
import io
import zlib
from typing import Literal

import thop
import torch
import torch_pruning
from torch import nn
from torch.nn.utils import prune as torch_prune

from audiokd_lib.core.losses import hard_loss
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.models.students import PRUNABLE, prunable_layers


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al., 2021) of one layer's weights: each w² over the sum of the w² at least as large.

    A layer's largest weight scores 1 whatever the layer's scale, so one global threshold on these
    scores never empties a layer, as a threshold on raw |w| does to layers with small weights.
    """
    squared = weight.detach().flatten() ** 2
    order = squared.argsort()
    ranked = squared[order]
    scores = torch.empty_like(squared)
    scores[order] = ranked / ranked.flip(0).cumsum(0).flip(0)
    return scores.view_as(weight)


def prune_unstructured(model: Classifier, amount: float, ranking: Literal["lamp", "l1"] = "lamp") -> Classifier:
    """A copy with the fraction `amount` of conv and linear weights set to zero, least important first.

    One threshold for all layers, on LAMP scores (`ranking="lamp"`) or on raw |w| ("l1", which strips
    layers with small weights first). The mask is made permanent: the copy holds plain tensors with
    zeros in them, no pruning hooks.
    """
    pruned = copy.deepcopy(model)
    targets = [(module, "weight") for module in prunable_layers(pruned)]
    scores = {target: lamp_scores(target[0].weight) for target in targets} if ranking == "lamp" else None
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=amount,
                                    importance_scores=scores)
    for module, name in targets:
        torch_prune.remove(module, name)
    pruned.spec["pruning"] = {"kind": "unstructured", "amount": amount, "ranking": ranking}
    return pruned


def sparsity(model: Classifier) -> dict[str, float]:
    """How many weights are zero.

    `params`: all parameters; `nonzero_params`: those not zero (a fresh model's biases start at zero,
    so this is a little below `params` even unpruned); `weight_sparsity`: the share of zeros among the
    conv and linear weights, the ones pruning acts on.
    """
    weights = [module.weight for module in prunable_layers(model)]
    prunable = sum(w.numel() for w in weights)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "nonzero_params": sum(int(torch.count_nonzero(p)) for p in model.parameters()),
        "weight_sparsity": 1 - sum(int(torch.count_nonzero(w)) for w in weights) / prunable,
    }


def _count_nonzero_weights(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    """thop rule for Conv2d and Linear: each non-zero weight is one MAC per output position."""
    positions = output.numel() // output.shape[1 if isinstance(module, nn.Conv2d) else -1]
    module.total_ops += positions * int(torch.count_nonzero(module.weight))


def nonzero_macs(model: Classifier, example: torch.Tensor) -> int:
    """MACs of one forward of `model.head` on `example` (batch 1) that involve a non-zero weight.

    Counted exactly as :func:`audiokd_lib.core.metrics.complexity` counts (thop), except for convolutions and
    linear layers: there a zero weight costs nothing, so a layer counts its dense MACs times the
    fraction of its weights that are non-zero. BatchNorm and pooling count as thop counts them, and
    activations, residual additions and the normalisation of the features count zero, as in thop.
    For an unpruned model this is thop's number; it is what hardware that skips zeros would execute,
    not what a dense CPU kernel does.
    """
    # thop leaves hooks and buffers behind on modules it has no rule for, so it gets a throwaway copy.
    copied = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        features = copied.normalise(example.detach().cpu())
    rules = {kind: _count_nonzero_weights for kind in PRUNABLE}
    macs, _ = thop.profile(copied.net, inputs=(features,), custom_ops=rules, verbose=False)
    return int(macs)


def compressed_size_mb(model: Classifier) -> float:
    """Size of the state dict stored sparsely and deflated, in MB (1e6 bytes).

    Pruning with a mask only writes zeros into dense tensors: a zero float still takes 4 bytes, so the
    checkpoint of a 70%-sparse model is as large as the original. To profit, the zeros must not be
    stored. Here every weight tensor that is at least half zeros is kept in CSR form (compressed sparse
    rows, a row per output channel): its non-zero values, their int32 column indices and where each row
    ends. A non-zero then costs 8 bytes instead of 4, so the sparse form wins from 50% zeros on. The
    saved bytes are then deflated (zlib, as in a .zip), which also squeezes the index arrays. Compare
    with the same function on the unpruned model, which measures deflate alone.
    """
    stored = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.dim() >= 2 and tensor.is_floating_point() and torch.count_nonzero(tensor) <= tensor.numel() / 2:
            rows = tensor.reshape(tensor.shape[0], -1)
            kept = rows != 0
            stored[f"{name}.values"] = rows[kept]
            stored[f"{name}.columns"] = kept.nonzero()[:, 1].int()
            stored[f"{name}.row_ends"] = kept.sum(dim=1).cumsum(dim=0).int()
        else:
            stored[name] = tensor
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    return len(zlib.compress(buffer.getvalue(), 9)) / 1e6


def prune_channels(
    model: Classifier,
    ratio: float,
    example: torch.Tensor,
    importance: Literal["l1", "taylor"] = "l1",
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    round_to: int | None = None,
) -> Classifier:
    """A copy with the fraction `ratio` of channels removed from every coupled group of layers.

    `example` (features as `model.head` takes them) lets torch-pruning trace which layers share
    channels. Each group keeps its own share 1 - `ratio`; the last linear layer keeps its outputs.
    `importance`: "l1" (weight norms) or "taylor" (|weight x gradient| on the `calibration` batch of
    (features, targets)). `round_to` keeps channel counts multiples of it (off by default).
    """
    if importance not in ("l1", "taylor"):
        raise ValueError(f"importance must be 'l1' or 'taylor', got {importance!r}")
    if importance == "taylor" and calibration is None:
        raise ValueError("Taylor importance needs gradients: pass calibration=(features, targets), one batch")
    pruned = copy.deepcopy(model).eval()  # eval: BatchNorm statistics stay as trained while tracing
    if importance == "taylor":
        features, targets = calibration
        pruned.zero_grad(set_to_none=True)
        hard_loss(pruned.head(features), targets, pruned.spec["multilabel"]).backward()
        scorer = torch_pruning.importance.GroupTaylorImportance()
    else:
        scorer = torch_pruning.importance.GroupMagnitudeImportance(p=1)
    classifier = [module for module in pruned.net.modules() if isinstance(module, nn.Linear)][-1]
    pruner = torch_pruning.pruner.BasePruner(pruned.net, pruned.normalise(example), importance=scorer,
                                             pruning_ratio=ratio, global_pruning=False,
                                             ignored_layers=[classifier], round_to=round_to)
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    pruned.spec["pruning"] = {"kind": "structured", "ratio": ratio, "importance": importance}
    return pruned.train(model.training)


def recalibrate_batchnorm(model: Classifier, features: torch.Tensor, batches: int = 40,
                          batch_size: int = 32) -> Classifier:
    """A copy whose BatchNorm running statistics are measured afresh on up to `batches` batches of `features`.

    The statistics are reset and then averaged over the batches with equal weight (momentum None),
    in train mode so that each layer sees the statistics of its own batch, without gradients: the
    weights do not change. The clips are taken in a fixed random order, so the result is reproducible.
    """
    recalibrated = copy.deepcopy(model).train()
    norms = [module for module in recalibrated.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:batches * batch_size]
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            recalibrated.head(features[order[start:start + batch_size]])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return recalibrated.train(model.training)


def reinitialise(model: Classifier, seed: int) -> Classifier:
    """A copy with the same (possibly pruned) architecture and fresh random weights, as torchvision
    initialises a MobileNet: He-normal convolutions (fan out), unit BatchNorm with reset statistics,
    N(0, 0.01) linear layers, zero biases. The front end and its normalisation are kept."""
    fresh = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for module in fresh.net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", generator=generator)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01, generator=generator)
        if isinstance(module, PRUNABLE) and module.bias is not None:
            nn.init.zeros_(module.bias)
    fresh.spec["pruning"] = {**fresh.spec.get("pruning", {}), "reinitialised": seed}
    return fresh


def channel_counts(model: Classifier) -> dict[str, int]:
    """Output channels of every convolution (and outputs of every linear layer), by module name."""
    return {name: module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            for name, module in model.net.named_modules() if isinstance(module, PRUNABLE)}
