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
# Pruning costs accuracy (notebook 06's sensitivity curves). A few epochs of re-training win most of
# it back, and the question is how: with the teacher's soft labels again (**re-distillation**), or on
# the hard labels alone (**fine-tuning**)? Both start from the same pruned weights, with the same
# short recipe (`prune.train`).
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

from audiokd_lib.compress import export, soft_labels
from audiokd_lib.data import tables
from audiokd_lib.experiment import report, runs
from audiokd_lib.experiment.params import load_params
from audiokd_lib.models import checkpoints

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
pruned_runs = runs.results_table(params, ["student-pruned"])
print(f"re-training {list(pruned_runs['model'])} with {params.prune.retrain}, {params.prune.train.epochs} epochs each")

# %% [markdown]
# ## Re-training every pruned student, both ways
#
# `kd`: the Hinton loss of notebook 05 against the teacher's cached logits (same temperature and
# alpha). `labels`: cross-entropy on the labels only. All runs train side by side, as in 04 and 05.

# %%
first = checkpoints.load_checkpoint(runs.checkpoint_path(params, pruned_runs["model"].iloc[0]))
sets = runs.feature_sets(params, clips, first)
teacher_logits, identity = soft_labels.load_teacher_logits(params, sets)
jobs = []
for name, variant in zip(pruned_runs["model"], pruned_runs["variant"]):
    for mode in params.prune.retrain:
        kd = mode == "kd"
        jobs.append(runs.RunJob(
            "student-rekd" if kd else "student-finetuned", f"{name}-{'rekd' if kd else 'finetuned'}",
            checkpoints.load_checkpoint(runs.checkpoint_path(params, name)), params.prune.train.seeds[0],
            tags={"variant": f"{variant} + {'re-KD' if kd else 'labels'}", "source": name,
                  "teacher": identity if kd else "none (labels only)"},
            teacher_logits=teacher_logits["train"] if kd else None,
            kd=params.kd if kd else None))
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
# batch 32, and stay within 2 points of the distilled student's in-domain macro-F1.

# %%
display(Markdown(report.targets_verdict(params, table)))

# %% [markdown]
# ## Shipping the final student: ONNX
#
# The structured-pruned, re-distilled student is the one to ship. ONNX (opset 17) carries it out of
# PyTorch: the network only, from log-mel features to logits, with the class names and front-end
# settings in the file's metadata. The log-mel front end stays outside: ONNX has no complex STFT, and
# an app computes its features natively anyway. The export is checked against PyTorch on real test
# clips (largest logit difference, cosine similarity, the same top class) and both are timed on the
# CPU with the same threads.

# %%
final = next(job.model for job in jobs if job.role == "student-rekd" and job.name.startswith("pruned-structured"))
onnx_file = export.export_onnx(final, sets["val"].features[:1], params.output_dir / "models" / "final_student.onnx")
display(pd.Series(export.check_onnx(final, onnx_file, sets["test"].features[:64]), name=onnx_file.name))
display(pd.DataFrame(export.time_onnx(final, onnx_file, sets["test"].features[:32], threads=params.threads))
        .rename_axis("batch").round(3))

# %% [markdown]
# The same comparison for whole models, side by side in one process per model, is a command:
#
# ```bash
# .venv/bin/audiokd bench --profile quick --models teacher student-baseline \
#     outputs/quick/models/pruned-structured-0.5-rekd/model.pt
# ```
