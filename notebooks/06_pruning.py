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
import pandas as pd
import torch
from IPython.display import Image, display

from audiokd_lib.compress import prune
from audiokd_lib.data import tables
from audiokd_lib.experiment import report, runs
from audiokd_lib.experiment.params import load_params
from audiokd_lib.models import checkpoints

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
# One threshold for the whole network means layers with small weights lose more than others.
#
# Count what changed. The parameter count is the same (zeros are parameters too), the checkpoint is
# the same size, and a dense kernel does the same MACs. Only the *non-zero* counts drop, and a file
# only shrinks when the zeros are not stored (here: sparse rows, then zipped).

# %%
sparse = prune.prune_unstructured(student, params.prune.sparsity)


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

# %%
calibration = (sets["train"].features[:64], sets["train"].targets[:64])  # one batch, for Taylor importance
slim = prune.prune_channels(student, params.prune.channel_ratio, example, params.prune.importance, calibration)
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
settings += [("unstructured", amount, prune.prune_unstructured(student, amount)) for amount in params.prune.sparsities]
settings += [("structured", ratio, prune.prune_channels(student, ratio, example, params.prune.importance, calibration))
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
