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
# This notebook prunes the distilled student both ways over a range of settings and measures how much
# each setting costs in accuracy *before any re-training* (the sensitivity curves). Notebook 07 then
# re-trains the chosen settings, with the teacher's help and without.

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

from audiokd_lib.compress import prune
from audiokd_lib.data import tables
from audiokd_lib.experiment import report, runs
from audiokd_lib.experiment.losses import hard_loss
from audiokd_lib.experiment.params import load_params
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
source = runs.best_run(params, params.prune.source)
student = checkpoints.load_checkpoint(runs.checkpoint_path(params, source["model"]))
sets = runs.feature_sets(params, clips, student)
example = sets["val"].features[:1]
metric = "mAP" if student.spec.get("multilabel") else "macro_f1"
print(f"pruning {source['model']}: validation {metric} {source['val_' + metric]:.3f}")
print(f"{prune.sparsity(student)['params']:,} parameters, {prune.nonzero_macs(student, example):,} MACs per clip")

# %% [markdown]
# ## Unstructured: global magnitude pruning
#
# `torch.nn.utils.prune.global_unstructured` ranks every conv and linear weight of the network by
# |w| and masks the smallest fraction; `prune.remove` then writes the zeros into the weights for good.
# One threshold for the whole network means layers with small weights lose more than others. This is
# the whole of it, as the library runs it (`audiokd_lib/compress/prune.py`; a test checks the two
# copies are the same code):

# %%
# lesson code: audiokd_lib.compress.prune.prune_unstructured
def prune_unstructured(model: Classifier, amount: float) -> Classifier:
    """A copy with the fraction `amount` of conv and linear weights set to zero, smallest |w| first.

    The ranking is global (one threshold for all layers), so layers with small weights lose more. The
    mask is made permanent: the copy holds plain tensors with zeros in them, no pruning hooks.
    """
    pruned = copy.deepcopy(model)
    targets = [(module, "weight") for module in prunable_layers(pruned)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for module, name in targets:
        torch_prune.remove(module, name)
    pruned.spec["pruning"] = {"kind": "unstructured", "amount": amount}
    return pruned


# %% [markdown]
# Count what changed. The parameter count is the same (zeros are parameters too), the checkpoint is
# the same size, and a dense kernel does the same MACs. Only the *non-zero* counts drop, and a file
# only shrinks when the zeros are not stored (here: sparse rows, then zipped).

# %%
sparse = prune_unstructured(student, params.prune.sparsity)


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
# ## Sensitivity: accuracy against how much is removed, before re-training
#
# Every setting of both sweeps, scored on the in-domain test split and the held-out soundfont. These
# curves say how much damage pruning does on its own; re-training (notebook 07) repairs some of it.

# %%
settings = [("none", 0.0, student)]
settings += [("unstructured", amount, prune_unstructured(student, amount)) for amount in params.prune.sparsities]
settings += [("structured", ratio, prune_channels(student, ratio, example, params.prune.importance, calibration))
             for ratio in params.prune.channel_ratios]
curves = pd.DataFrame([{"kind": kind, "amount": amount, **runs.scores(model, sets),
                        "non-zero MACs": prune.nonzero_macs(model, example)} for kind, amount, model in settings])
curves = curves.rename(columns=runs.TABLE_COLUMNS)
display(curves.round(3))
display(Image(filename=str(report.sensitivity_figure(params, curves, "mAP" if student.spec.get("multilabel") else "macro-F1"))))

# %% [markdown]
# ## The two pruned students, measured and logged
#
# The chosen settings (`prune.sparsity`, `prune.channel_ratio`) are measured like every other model
# (scores, parameters, size, MACs, latency at batch 1 and 32) and logged to MLflow with role
# `student-pruned`. Notebook 07 re-trains them.

# %%
tags = {"source": source["model"], "teacher": source.get("teacher", "none")}
pruned_runs = [
    runs.log_model(params, "student-pruned", f"pruned-unstructured-{params.prune.sparsity:g}", sparse, sets,
                   tags={**tags, "variant": f"unstructured {params.prune.sparsity:.0%}"}, params_file=params_file),
    runs.log_model(params, "student-pruned", f"pruned-structured-{params.prune.channel_ratio:g}", slim, sets,
                   tags={**tags, "variant": f"structured {params.prune.channel_ratio:.0%}"}, params_file=params_file),
]
display(runs.results_table(params, ["student-kd", "student-pruned"]))
