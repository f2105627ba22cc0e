# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Pruning: deleting weights, and deleting channels
#
# Distillation made the student as good as it can be at its size. Pruning makes it smaller still, by
# deleting the parts of the trained network that matter least. There are two very different ways:
#
# - **unstructured pruning** sets individual weights to zero, the smallest in magnitude across the
#   whole network (global L1). The network keeps its shape, so on an ordinary CPU nothing gets faster
#   or smaller until a sparse format or sparse hardware skips the zeros;
# - **structured pruning** removes whole channels, and with them the matching rows and columns of
#   every layer they touch. The result is a smaller dense network: fewer parameters, fewer MACs and a
#   faster forward pass on any hardware.
#
# Either way, the pruned network's BatchNorm layers still describe the activations of the network that
# was pruned. Measuring their statistics again on some training clips (no gradients, no weight changes)
# is the cheapest repair there is, and it changes what a sensitivity curve says.
#
# This notebook prunes the distilled student both ways over a range of settings and measures how much
# each setting costs in accuracy *before any re-training*, with the BatchNorm statistics as trained and
# measured again (the sensitivity curves). Notebook 07 then re-trains the chosen settings, with the
# teacher's help and without, and trains the chosen architecture from scratch as a control.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import copy
from typing import Literal

import pandas as pd
import torch
import torch_pruning
from IPython.display import Image, display
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from audiokd_lib import training
from audiokd_lib.compress import prune
from audiokd_lib.core.files import cached
from audiokd_lib.core.losses import hard_loss
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables
from audiokd_lib.experiment import evaluation, report, results, runs
from audiokd_lib.models import checkpoints
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.models.students import prunable_layers

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")

# %% [markdown]
# ## The student we prune
#
# Of the runs of role `prune.source` (the distilled students by default), the one with the best
# **validation** score: choosing by the test or held-out scores would make them optimistic.

# %%
source = results.best_run(params, params.prune.source)
student = checkpoints.load_checkpoint(runs.checkpoint_path(params, source["model"]))
sets = evaluation.feature_sets(params, clips, student)
example = sets["val"].features[:1]
metric = "mAP" if student.spec.get("multilabel") else "macro_f1"
print(f"pruning {source['model']}: validation {metric} {source['val_' + metric]:.3f}")
print(f"{prune.sparsity(student)['params']:,} parameters, {prune.nonzero_macs(student, example):,} MACs per clip")

# %% [markdown]
# ## Unstructured: global magnitude pruning, ranked layer by layer
#
# `torch.nn.utils.prune.global_unstructured` ranks every conv and linear weight of the network and
# masks the lowest-ranked fraction; `prune.remove` then writes the zeros into the weights for good.
# Ranking by raw |w| with one threshold for the whole network sounds fair, but layers differ in scale:
# torchvision starts a MobileNet's linear layers about a hundred times smaller than its convolutions,
# and a short training does not close the gap, so a global |w| threshold empties the classifier first.
# LAMP (layer-adaptive magnitude pruning, Lee et al., ICLR 2021) rescales before ranking: each weight's
# w², divided by the sum of the w² in its layer that are at least as large. A layer's largest weight
# scores 1 whatever the layer's scale, so no layer is emptied, and the one global threshold still
# decides how much each layer gives up. This is the whole of it, as the library runs it
# (`audiokd_lib/compress/prune.py`; a test checks the copies are the same code):

# %%
# lesson code: audiokd_lib.compress.prune.lamp_scores
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


# %%
# lesson code: audiokd_lib.compress.prune.prune_unstructured
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


# %% [markdown]
# The two rankings at the chosen sparsity (`prune.sparsity`): the six layers that lose the largest
# share of their weights, and what each pruned student scores, before any repair, and what it would
# cost on hardware that skips zeros. The same share of weights is not the same share of work: a
# linear layer uses each weight once per clip, a convolution at every time-frequency position. Raw |w|
# strips the cheap linear weights, LAMP keeps some and takes more from the convolutions, so it saves
# fewer non-zero MACs; the accuracy is what that buys.

# %%
rankings = {ranking: prune_unstructured(student, params.prune.sparsity, ranking) for ranking in ("l1", "lamp")}
zero_share = pd.DataFrame({ranking: {name: 1 - torch.count_nonzero(m.weight).item() / m.weight.numel()
                                     for name, m in model.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
                           for ranking, model in rankings.items()})
display(zero_share.loc[zero_share.max(axis=1).nlargest(6).index].round(3))
pd.DataFrame({ranking: {**evaluation.scores(model, sets), "non-zero MACs": prune.nonzero_macs(model, example)}
              for ranking, model in rankings.items()}).round(3)

# %% [markdown]
# Count what changed. The parameter count is the same (zeros are parameters too), the checkpoint is
# the same size, and a dense kernel does the same MACs. Only the *non-zero* counts drop, and a file
# only shrinks when the zeros are not stored (here: sparse rows, then zipped).

# %%
sparse = rankings["lamp"]


def footprint(model):
    info = prune.sparsity(model)
    return {"params": info["params"], "non-zero params": info["nonzero_params"],
            "share of conv/linear weights at zero": round(info["weight_sparsity"], 3),
            "non-zero MACs": prune.nonzero_macs(model, example),
            "sparse+zip MB": round(prune.compressed_size_mb(model), 3)}


pd.DataFrame({"distilled student": footprint(student), f"{params.prune.sparsity:.0%} sparse": footprint(sparse)})

# %% [markdown]
# ## Structured: removing channels with a dependency graph
#
# A channel cannot leave one layer alone. The convolution that makes it, the BatchNorm that scales
# it, the depthwise convolution that filters it, the squeeze-excitation gate that weighs it and the
# next layer that reads it must all lose the same channel, and blocks joined by a residual addition
# must agree. torch-pruning (DepGraph) traces the network once to find these coupled groups, ranks the
# channels of each group (`prune.importance`: L1 norm of the weights, or a first-order Taylor estimate
# of the loss change), and cuts the lowest-ranked share from every group. The last layer keeps its
# outputs: the classes do not change.
#
# The importance scores: "l1" needs no data; "taylor" (Molchanov et al., 2019) estimates how much the
# loss would change without a channel from |weight x gradient|, so it needs one batch of training
# data to compute gradients on. The model is traced in eval mode so that BatchNorm keeps its trained
# statistics. The code, as the library runs it:

# %%
# lesson code: audiokd_lib.compress.prune.prune_channels
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

# %%
calibration = (sets["train"].features[:64], sets["train"].targets[:64])  # one batch, for Taylor importance
slim = prune_channels(student, params.prune.channel_ratio, example, params.prune.importance, calibration)
before, after = prune.channel_counts(student), prune.channel_counts(slim)
display(pd.DataFrame({"before": before, "after": after}).head(12))
print(f"parameters {prune.sparsity(student)['params']:,} -> {prune.sparsity(slim)['params']:,}; "
      f"MACs {prune.nonzero_macs(student, example):,} -> {prune.nonzero_macs(slim, example):,}")

# %% [markdown]
# ## Pruning leaves BatchNorm behind
#
# Score the pruned student as it comes out of `prune_channels`:

# %%
repair = pd.DataFrame({"distilled student": evaluation.scores(student, sets), "pruned": evaluation.scores(slim, sets)})
repair.round(3)

# %% [markdown]
# Far worse than the few removed channels can explain. Every BatchNorm layer normalises with a running
# mean and variance, measured during training on the activations of the *unpruned* network. Remove
# channels and each later layer sums over fewer inputs: its activations shift and shrink, the stored
# statistics no longer describe them, and the error compounds layer after layer. Zeroing weights does
# the same. The weights may be fine; the statistics are stale.
#
# EagleEye (Li et al., 2020) calls the repair *adaptive BatchNorm*: reset the statistics and measure
# them again, in train mode, over a few dozen training batches, without gradients. No weight changes;
# it takes a second. `momentum = None` makes the running statistics a plain average over the batches
# instead of the usual exponential one. The code, as the library runs it:

# %%
# lesson code: audiokd_lib.compress.prune.recalibrate_batchnorm
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


# %%
recalibration = {"batches": params.prune.recalibrate_batches, "batch_size": params.prune.train.batch_size}


def recalibrated(model):
    """The model with its BatchNorm statistics measured again, unless the profile turns that off."""
    if not recalibration["batches"]:
        return model
    return recalibrate_batchnorm(model, sets["train"].features, **recalibration)


repair["pruned, BatchNorm recalibrated"] = pd.Series(evaluation.scores(recalibrated(slim), sets))
repair.round(3)

# %% [markdown]
# ## Sensitivity: accuracy against how much is removed, before re-training
#
# Every setting of both sweeps, scored on the in-domain test split and the held-out soundfont, with the
# BatchNorm statistics as trained (dashed) and recalibrated (solid). Without recalibration the curves
# measure stale statistics more than lost weights, and would send re-training after the wrong
# settings. Recalibrated, they say how much damage pruning itself does; re-training (notebook 07)
# repairs some of it.
#
# Compare the two points at amount 0 as well: nothing was pruned there. The student's statistics are
# an exponential average over its *training* batches (random 1 s crops, mixed, with noise and gain),
# and it is tested on clean whole clips; whatever recalibration changes there is that mismatch.

#
# The sweep is the costly part of this notebook: it runs once per source checkpoint, pruning settings and
# clips, and a second run reads its table back (`cached`, keyed by `training.result_key`).

# %%
def sensitivity() -> pd.DataFrame:
    settings = [("none", 0.0, student)]
    settings += [("unstructured", amount, prune_unstructured(student, amount)) for amount in params.prune.sparsities]
    settings += [("structured", ratio, prune_channels(student, ratio, example, params.prune.importance, calibration))
                 for ratio in params.prune.channel_ratios]
    return pd.DataFrame([{"kind": kind, "amount": amount, "BatchNorm": stage, **evaluation.scores(model, sets),
                          "non-zero MACs": prune.nonzero_macs(model, example)}
                         for kind, amount, pruned in tqdm(settings, desc="sensitivity")
                         for stage, model in (("as trained", pruned), ("recalibrated", recalibrated(pruned)))])


key = training.result_key(sets, [runs.checkpoint_path(params, source["model"])], prune=params.prune)
curves = cached(params.output_dir / "models" / "pruning-sensitivity.pkl", key, sensitivity)
curves = curves.rename(columns=results.TABLE_COLUMNS)
display(curves.round(3))
figure = report.sensitivity_figure(params, curves, "mAP" if student.spec.get("multilabel") else "macro-F1")
display(Image(filename=str(figure)))

# %% [markdown]
# ## The two pruned students, measured and logged
#
# The chosen settings (`prune.sparsity`, `prune.channel_ratio`), with their BatchNorm statistics
# recalibrated, are measured like every other model (scores, parameters, size, MACs, latency at batch 1
# and 32) and logged to MLflow with role `student-pruned`. Notebook 07 re-trains them.

# %%
sparse, slim = recalibrated(sparse), recalibrated(slim)
tags = {"source": source["model"], "teacher": source.get("teacher", "none")}
pruned_runs = [runs.log_model(params, "student-pruned", f"pruned-{kind}-{amount:g}", model, sets,
                              tags={**tags, "variant": f"{kind} {amount:.0%}"}, params_file=params_file)
               for kind, amount, model in (("unstructured", params.prune.sparsity, sparse),
                                           ("structured", params.prune.channel_ratio, slim))]
display(results.results_table(params, ["student-kd", "student-pruned"]))
