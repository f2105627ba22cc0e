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
# # 05 · Knowledge distillation: the same student, taught by the teacher
#
# Hinton, Vinyals and Dean (2015) train the student to match the teacher's *softened* output
# distribution as well as the labels:
#
# $$\mathcal{L} = \alpha\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_t/T)\,\|\,\mathrm{softmax}(z_s/T)\big) + (1-\alpha)\,\mathrm{CE}(y, z_s)$$
#
# $z_t$ and $z_s$ are the teacher's and the student's logits, $T$ the temperature (`kd.temperature`)
# and $\alpha$ the weight of the soft term (`kd.alpha`). The $T^2$ keeps the soft term's gradients
# on the scale of the hard term's as $T$ grows. For multi-label data each class is its own yes/no
# question: binary cross-entropy against $\sigma(z_t/T)$ replaces the KL term.
#
# Two ways to get $z_t$ (`kd.modes`):
#
# - **cached**: the teacher's logits on the clean clips, computed once in notebook 03 (the soft
#   labels). Cheap: the teacher never runs during training. But the student sees a random crop with
#   noise and a mixed-in partner, and is asked to match what the teacher said about the clean whole clip.
# - **consistent** (Beyer et al., "Knowledge distillation: a good teacher is patient and consistent",
#   CVPR 2022): the teacher sees exactly the augmented batch the student sees, so the target always
#   describes the input. It costs one teacher forward pass per batch.
#
# Distillation is here to carry the teacher's robustness to unseen timbres into the student, so the
# score that matters is the **held-out soundfont** one, over several seeds.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import torch
from IPython.display import Markdown, display

from audiokd_lib.audio.features import NormStats
from audiokd_lib.compress import distill, soft_labels
from audiokd_lib.data import tables
from audiokd_lib.experiment import report, runs, training
from audiokd_lib.experiment.params import load_params
from audiokd_lib.models import checkpoints, students

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
classes = training.class_names(clips)
stats = NormStats.load(params.output_dir / "features" / "norm_stats.json", params.fingerprint("features"),
                       tables.fingerprint(clips))
student = students.build_student(params, classes, stats)
sets = runs.feature_sets(params, clips, student)
teacher = checkpoints.load_checkpoint(runs.checkpoint_path(params, "teacher"))
teacher_logits, identity = soft_labels.load_teacher_logits(params, sets)
kd = (params.kd.temperature, params.kd.alpha)
print(f"teacher: {identity}; T = {kd[0]:g}, alpha = {kd[1]:g}; modes {params.kd.modes}; seeds {params.train.seeds}")

# %% [markdown]
# ## The loss, checked by hand
#
# Before training on it, two limits the formula must obey: with $\alpha = 0$ it is plain cross-entropy,
# and a student whose logits equal the teacher's pays nothing for the soft term.

# %%
z_s, z_t, y = torch.randn(4, len(classes)), torch.randn(4, len(classes)), torch.tensor([0, 1, 2, 3])
assert torch.isclose(distill.distillation_loss(z_s, z_t, y, 3.0, 0.0), torch.nn.functional.cross_entropy(z_s, y))
assert torch.isclose(distill.distillation_loss(z_t, z_t, y, 3.0, 1.0), torch.tensor(0.0), atol=1e-6)
print("alpha = 0 is cross-entropy; identical logits give a zero soft term")

# %% [markdown]
# ## Training: both modes, every seed
#
# The student, data, augmentation, optimiser, schedule and epochs are those of the baseline; only the
# loss differs. In consistent mode the teacher must read the student's features: true for the
# EfficientAT teacher, which shares the students' front end.

# %%
jobs = []
for mode in params.kd.modes:
    if mode == "consistent":
        distill.check_shared_frontend(teacher, student)
    jobs += [runs.RunJob("student-kd", f"student-kd-{mode}-seed{seed}",
                         students.build_student(params, classes, stats, seed=seed), seed,
                         tags={"variant": f"kd-{mode}", "teacher": identity, "kd_mode": mode},
                         teacher=teacher if mode == "consistent" else None,
                         teacher_logits=teacher_logits["train"] if mode == "cached" else None, kd=kd)
             for seed in params.train.seeds]
kd_runs = runs.train_many(params, jobs, sets, tp=params.train, params_file=params_file)

# %% [markdown]
# ## The table: teacher, baseline and distilled students
#
# Every figure below is read back from MLflow (`outputs/<profile>/mlflow.db`; browse it with
# `mlflow ui --backend-store-uri sqlite:///outputs/<profile>/mlflow.db`). Latency is the median time
# of one forward pass on one clip's features, batch 1, on `threads` CPU threads; MACs are counted by
# thop for one clip.

# %%
table = runs.results_table(params, ["teacher", "student-baseline", "student-kd"])
display(table)

# %% [markdown]
# ## Did distillation help on unseen timbres?
#
# Mean and spread over seeds of the held-out-soundfont macro-F1, and the verdict in plain words. A
# difference smaller than the spread between seeds of the same recipe is not a difference.

# %%
score = report.main_score(table)
summary = runs.seed_summary(table, score, by="variant")
display(summary)
display(Markdown(runs.verdict(summary, score)))
