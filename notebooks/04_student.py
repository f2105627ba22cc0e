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
# # 04 · The student, trained on labels alone: the baseline
#
# The student is the model we want to ship: a torchvision MobileNet (`student.arch`, with the width
# multiplier `student.width_mult` scaling every layer's channels) reading one-channel log-mel
# spectrograms. Here it learns from the hard labels only, with cross-entropy, from random weights.
#
# Everything the distilled students of notebook 05 will do differently is the loss. The data, the
# augmentation, the optimiser, the schedule, the number of epochs and the seeds are the same, so
# any difference in the results is distillation's doing, or chance. To tell the two apart we train
# one model per seed (`train.seeds`) and look at the spread.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import torch
from IPython.display import Image, display

from audiokd_lib.audio.features import NormStats
from audiokd_lib.data import tables
from audiokd_lib.experiment import report, runs, training
from audiokd_lib.experiment.params import load_params
from audiokd_lib.models import students

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
classes = training.class_names(clips)
stats = NormStats.load(params.output_dir / "features" / "norm_stats.json", params.fingerprint("features"),
                       tables.fingerprint(clips))
print(f"profile {params.profile}: {len(classes)} classes; seeds {params.train.seeds}; "
      f"{params.train.epochs} epochs of {params.train.crop_seconds or params.features.clip_seconds} s crops")

# %% [markdown]
# ## The architecture
#
# torchvision builds the network; two changes make it an audio model. The first convolution takes
# one channel (a spectrogram) instead of three (RGB), and BatchNorm's running statistics follow the
# batches ten times faster than torchvision's ImageNet default (momentum 0.1 instead of 0.01): in a
# run of a dozen epochs the slow default leaves the validation statistics so stale that accuracy
# sits at chance while the training loss falls. The normalisation in front of the network uses the
# per-mel-bin statistics notebook 02 measured on the training split.

# %%
student = students.build_student(params, classes, stats)
print(f"{params.student.arch}, width {params.student.width_mult}: "
      f"{sum(p.numel() for p in student.parameters()):,} parameters")
print(student.net.features[0])
print(student.net.classifier)

# %% [markdown]
# ## Training, one run per seed
#
# Features come from the cache notebook 03 filled (the students share the teacher's front end).
# Each run logs its settings, per-epoch losses, final metrics and checkpoint to MLflow; a run that
# already finished with the same settings is reused, an interrupted one resumes.
#
# The runs are independent, so they train side by side: `workers` processes (by default one per CPU
# core) of `threads` threads each. On a CPU that is the cheap way to use several cores, since a
# small network on one core per process trains faster than one process spread over all of them.
# Evaluation and the latency measurement come afterwards, one run at a time, on a quiet machine.

# %%
sets = runs.feature_sets(params, clips, student)
jobs = [runs.RunJob("student-baseline", f"student-baseline-seed{seed}",
                    students.build_student(params, classes, stats, seed=seed), seed, tags={"variant": "baseline"})
        for seed in params.train.seeds]
baseline_runs = runs.train_many(params, jobs, sets, tp=params.train, params_file=params_file)

# %%
display(Image(filename=str(params.output_dir / "figures" / f"student-baseline-seed{params.train.seeds[0]}_loss.png")))

# %% [markdown]
# ## How good is the baseline?
#
# The same measures as the teacher's, from the same MLflow store. Compare the in-domain test split
# with the held-out soundfont: the drop is how much the student has learnt the training soundfont's
# particular samples rather than the instruments.

# %%
table = runs.results_table(params, ["teacher", "student-baseline"])
display(table)
display(runs.seed_summary(table, report.main_score(table),
                          by="variant"))
