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
from collections.abc import Callable
from functools import partial

import torch
from IPython.display import Image, display

from audiokd_lib import training
from audiokd_lib.audio.features import NormStats
from audiokd_lib.core import losses
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables
from audiokd_lib.experiment import evaluation, report, results, runs
from audiokd_lib.models import students
from audiokd_lib.models.classifier import Classifier

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
classes = training.class_names(clips)
multilabel = training.is_multilabel(clips)  # OpenMIC: a sigmoid per class, BCE that skips unknown answers
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
student = students.build_student(params, classes, stats, multilabel=multilabel)
print(f"{params.student.arch}, width {params.student.width_mult}: "
      f"{sum(p.numel() for p in student.parameters()):,} parameters")
print(student.net.features[0])
print(student.net.classifier)

# %% [markdown]
# ## One training step
#
# Every classifier of the course (teacher, students, the detector of notebook 08) learns through this
# one step on a batch of cached log-mel features: the network's logits, a loss on them, the gradients,
# one AdamW update, one move of the learning-rate schedule. Only the loss changes from notebook to
# notebook, so it comes in as `loss_fn`, a function of the logits that already knows the batch's
# targets: here cross-entropy on the labels (`losses.hard_loss`), in notebook 05 Hinton's
# distillation loss. On CUDA the forward pass runs in mixed precision and the `GradScaler` scales the
# loss so that small float16 gradients survive; on a CPU both are switched off.

# %%
# lesson code: audiokd_lib.training.train_step
def train_step(model: Classifier, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
               scaler: torch.amp.GradScaler) -> torch.Tensor:
    """One optimisation step on one batch of features: forward, loss, backward, optimiser, schedule."""
    with torch.autocast(x.device.type, enabled=scaler.is_enabled()):  # mixed precision where the scaler works
        loss = loss_fn(model.head(x))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # scaled up, so that small float16 gradients do not round to zero
    scaler.step(optimizer)  # unscales first, and skips the step if a gradient overflowed
    scaler.update()
    scheduler.step()  # the learning rate moves every step: linear warm-up, then cosine decay
    return loss.detach()


# %% [markdown]
# A few steps on one real batch of training features (the cache notebook 03 filled; the students
# share the teacher's front end), with a fresh student and a constant learning rate. The same batch
# every time, so the loss must fall: the first sanity check of any training code is that a model can
# learn one batch by heart.

# %%
sets = evaluation.feature_sets(params, clips, student)
batch = torch.randperm(len(sets["train"]), generator=torch.Generator().manual_seed(0))[:params.train.batch_size]
x, y = sets["train"].features[batch], sets["train"].targets[batch]
trial = students.build_student(params, classes, stats, multilabel=multilabel, seed=params.train.seeds[0])
trial.train()
optimizer = torch.optim.AdamW(trial.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
scaler = torch.amp.GradScaler("cuda", enabled=False)  # on the CPU: full precision
loss_fn = partial(losses.hard_loss, targets=y, multilabel=sets["train"].multilabel,
                  label_smoothing=params.train.label_smoothing)
for step in range(5):
    print(f"step {step + 1}: loss {train_step(trial, x, loss_fn, optimizer, scheduler, scaler).item():.3f}")

# %% [markdown]
# ## Around the step: the epoch loop
#
# `training.fit` runs that step inside the loop every training of the course shares
# (`experiment.loop.EpochLoop`; the separator of notebook 08 uses it too). One epoch:
#
# 1. **shuffle** the training clips (with a generator seeded by the run's seed) and cut them into
#    batches of `train.batch_size`;
# 2. **augment** each batch on its cached features: a random crop of `train.crop_seconds`, then the
#    kinds in `train.augment` (gain, noise, SpecAugment, mixup);
# 3. one **step** per batch, as above; the schedule warms up linearly for `train.warmup_epochs`, then
#    decays along a cosine to zero at the last epoch;
# 4. **validate** on the whole `val` clips: loss and macro-F1;
# 5. **keep the best**: a copy of the weights whenever macro-F1 is the best so far; after
#    `train.patience` epochs without a better one, **stop early**;
# 6. **save** everything needed to go on (weights, optimiser, schedule, history, random generators)
#    to `last.pt`, so an interrupted run resumes exactly where it stopped.
#
# At the end the best epoch's weights are put back: the model evaluated and saved is the one
# validation chose, not the last one. Then BatchNorm's running statistics are measured again on
# `train.recalibrate_batches` batches of whole, clean training clips ("precise BN"): the averages
# collected while training describe augmented 1 s crops, not the clean 2 s clips the model is tested
# on; measured on the quick profile's distilled student, this alone moved held-out macro-F1 from 0.705
# to 0.775 (notebook 06 teaches the function, `prune.recalibrate_batchnorm`). What is left to the
# library: resuming, worker processes, MLflow logging and the reuse of finished runs.
#
# ## Training, one run per seed
#
# Each run logs its settings, per-epoch losses, final metrics and checkpoint to MLflow; a run that
# already finished with the same settings is reused, an interrupted one resumes.
#
# The runs are independent, so they train side by side: `workers` processes (by default one per CPU
# core) of `threads` threads each. On a CPU that is the cheap way to use several cores, since a
# small network on one core per process trains faster than one process spread over all of them.
# Evaluation and the latency measurement come afterwards, one run at a time, on a quiet machine.

# %%
jobs = [runs.RunJob("student-baseline", f"student-baseline-seed{seed}",
                    students.build_student(params, classes, stats, multilabel=multilabel, seed=seed), seed,
                    tags={"variant": "baseline"})
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
table = results.results_table(params, ["teacher", "student-baseline"])
display(table)
display(results.seed_summary(table, report.main_score(table),
                          by="variant"))
