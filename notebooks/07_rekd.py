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
# # 07 · Re-distillation, and the final table
#
# Pruning costs accuracy (notebook 06's sensitivity curves), even with the BatchNorm statistics
# measured again. Re-training wins it back, and the question is how: with the teacher's soft labels
# again (**re-distillation**), or on the hard labels alone (**fine-tuning**)? Both start from the same
# pruned weights, with the same recipe (`prune.train`: a short warm-up, then a cosine decay of the
# learning rate to zero).
#
# And were the pruned weights worth keeping at all? Liu et al. (ICLR 2019, "Rethinking the value of
# network pruning") found that a pruned *architecture* trained from random weights often matches the
# pruned-and-fine-tuned network: then pruning was an architecture search, and the weights it kept were
# not the point. The control here (`scratch`) is that experiment: the structured student's exact
# layer widths, fresh random weights, the same distillation on the same budget.
#
# An unstructured-pruned student keeps its zeros while it re-trains: after every optimiser step the
# pruned weights are set back to zero, so the sparsity it was pruned to is the sparsity it ends with.
# A structured-pruned student is simply a smaller dense network and trains like one.
#
# The notebook ends with the course's results table, read from MLflow: every model from the teacher
# to the re-distilled pruned students, with scores, sizes, MACs, latency and ratios.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import pandas as pd
import torch
from IPython.display import Image, Markdown, display

from audiokd_lib import training
from audiokd_lib.compress import export, prune, soft_labels
from audiokd_lib.core.files import cached
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables
from audiokd_lib.experiment import evaluation, report, runs
from audiokd_lib.models import checkpoints

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
# Pruned students of earlier settings stay in the MLflow store; only those whose checkpoints say they were pruned
# at this profile's settings (prune.sparsity, prune.channel_ratio) are re-trained.
pruned_runs = report.pruned_students(params)
print(f"re-training {list(pruned_runs['model'])} with {params.prune.retrain}, {params.prune.train.epochs} epochs each")

# %% [markdown]
# ## Re-training every pruned student, both ways, and the control
#
# `kd`: the Hinton loss of notebook 05 against the teacher's cached logits (same temperature and
# alpha). `labels`: cross-entropy on the labels only. `scratch`: the structured student's architecture
# re-initialised as torchvision initialises a MobileNet (`prune.reinitialise`), then distilled exactly
# like `kd`. All runs train side by side, as in 04 and 05.

# %%
first = checkpoints.load_checkpoint(runs.checkpoint_path(params, pruned_runs["model"].iloc[0]))
sets = evaluation.feature_sets(params, clips, first)
teacher_logits, identity = soft_labels.load_teacher_logits(params, sets)
seed = params.prune.train.seeds[0]
recipes = {"kd": ("student-rekd", "rekd", "{} + re-KD"), "labels": ("student-finetuned", "finetuned", "{} + labels"),
           "scratch": ("student-scratch", "scratch", "{}, from scratch + KD")}
jobs = []
for name, variant, pruning in zip(pruned_runs["model"], pruned_runs["variant"], pruned_runs["pruning"]):
    for mode in params.prune.retrain:
        model = checkpoints.load_checkpoint(runs.checkpoint_path(params, name))
        if mode == "scratch":
            if pruning != "structured":
                continue  # unstructured pruning keeps the dense architecture: there is no new one to test
            model = prune.reinitialise(model, seed)
        role, suffix, label = recipes[mode]
        kd = mode != "labels"
        jobs.append(runs.RunJob(role, f"{name}-{suffix}", model, seed,
                                tags={"variant": label.format(variant), "source": name,
                                      "teacher": identity if kd else "none (labels only)"},
                                teacher_logits=teacher_logits["train"] if kd else None, kd=params.kd if kd else None))
retrained = runs.train_many(params, jobs, sets, tp=params.prune.train, params_file=params_file)

# %%
display(Image(filename=str(params.output_dir / "figures" / f"{jobs[0].name}_loss.png")))

# %% [markdown]
# ## The final table
#
# One row per recipe, every figure read back from the MLflow store
# (`mlflow ui --backend-store-uri sqlite:///outputs/<profile>/mlflow.db` browses the same runs).
# Rows that average several seeds say how many in `seeds`, and `±` is the standard deviation of the
# main score over them.
#
# How to read the cost columns:
#
# - `params`, `size MB`, `MACs` and the latencies are what a dense CPU run pays. `MACs` are counted by
#   thop for one clip's features (front end excluded); latency is the median of repeated forward
#   passes on `threads` CPU thread(s), at batch 1 and per clip at batch 32.
# - `non-zero params`, `non-zero MACs` and `sparse+zip MB` are what the same weights would cost if zeros
#   were free: only the unstructured-pruned rows differ, and only sparse formats or hardware collect it.
# - `... / teacher` and `... / baseline` divide a row's dense cost by the teacher's and the baseline's.

# %%
table = report.final_table(params)
results_csv, results_md = report.save_results(params, table)
display(table.round(3))
print(f"saved {results_csv} and {results_md}")

# %%
display(Image(filename=str(report.pareto_figure(params, table))))

# %% [markdown]
# ## What the table says
#
# The targets of the course, checked against the table rather than asserted: the structured-pruned,
# re-distilled student should have at most half the baseline's MACs, run measurably faster per clip at
# batch 32, and, like the unstructured one, stay within 2 points of the distilled student it was pruned
# from, in-domain and on the held-out soundfont. The last line compares it with its control.

# %%
display(Markdown(report.targets_verdict(params, table)))

# %% [markdown]
# ## The headline: how much of the teacher does the final student keep?
#
# The question the course set out to answer, in one paragraph: the teacher against the baseline and
# the final student in size, the best distilled student against the baseline, and the final student
# against the teacher in score, MACs and CPU latency. The same sentences go to
# `outputs/<profile>/headline.md`, which `make readme-results` copies into the README.

# %%
display(Markdown(report.headline(params, table)))

# %% [markdown]
# ## Shipping the final student: ONNX
#
# The structured-pruned, re-distilled student is the one to ship (`report.final_student` finds its run by
# what its checkpoint says: pruned structurally at `prune.channel_ratio`, then re-distilled). ONNX (opset 17)
# carries it out of PyTorch: the network only, from log-mel features to logits, with the class names and
# front-end settings in the file's metadata. The log-mel front end stays outside: ONNX has no complex STFT,
# and an app computes its features natively anyway. The export is checked against PyTorch on real test
# clips (largest logit difference, cosine similarity, the same top class) and both are timed on the
# CPU with the same threads.

# %%
final_run = report.final_student(params)
checkpoint = runs.checkpoint_path(params, final_run["model"])
final = checkpoints.load_checkpoint(checkpoint)
onnx_file = params.output_dir / "models" / "final_student.onnx"


def export_and_compare() -> tuple[dict, dict]:
    export.export_onnx(final, sets["val"].features[:1], onnx_file)
    return (export.check_onnx(final, onnx_file, sets["test"].features[:64]),
            export.time_onnx(final, onnx_file, sets["test"].features[:32], threads=params.threads))


# Once per final checkpoint, clips and threads (and again if the file is gone): a second run reads both back.
checked, timed = cached(onnx_file.with_suffix(".check.pkl"),
                        training.result_key(sets, [checkpoint], threads=params.threads), export_and_compare,
                        needs=[onnx_file])
display(pd.Series(checked, name=onnx_file.name))
display(pd.DataFrame(timed).rename_axis("batch").round(3))

# %% [markdown]
# The same comparison for whole models, side by side in one process per model, is a command:
#
# ```bash
# .venv/bin/audiokd bench --profile quick --models teacher student-baseline \
#     outputs/quick/models/pruned-structured-0.5-rekd/model.pt
# ```
