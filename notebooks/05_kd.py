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
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from audiokd_lib import training
from audiokd_lib.audio import augment
from audiokd_lib.audio.features import NormStats
from audiokd_lib.compress import distill, soft_labels
from audiokd_lib.compress.soft_labels import teacher_logits_path
from audiokd_lib.core.files import file_digest
from audiokd_lib.core.losses import hard_loss
from audiokd_lib.core.params import Params, load_params
from audiokd_lib.data import tables
from audiokd_lib.experiment import evaluation, report, results, runs
from audiokd_lib.models import checkpoints, students
from audiokd_lib.training import FeatureSet

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
classes = training.class_names(clips)
multilabel = training.is_multilabel(clips)  # OpenMIC: a sigmoid per class, BCE that skips unknown answers
stats = NormStats.load(params.output_dir / "features" / "norm_stats.json", params.fingerprint("features"),
                       tables.fingerprint(clips))
student = students.build_student(params, classes, stats, multilabel=multilabel)
sets = evaluation.feature_sets(params, clips, student)
teacher = checkpoints.load_checkpoint(runs.checkpoint_path(params, "teacher"))
teacher_logits, identity = soft_labels.load_teacher_logits(params, sets)
kd = params.kd
print(f"teacher: {identity}; T = {kd.temperature:g}, alpha = {kd.alpha:g}; modes {kd.modes}; "
      f"seeds {params.train.seeds}")

# %% [markdown]
# ## The loss, in code
#
# This is the function the training loop calls, as the library has it (`audiokd_lib/compress/distill.py`;
# a test checks that the two copies are the same code). `hard_loss` is cross-entropy for one label per
# clip and binary cross-entropy for multi-label data. PyTorch's `kl_div` takes the student's
# log-probabilities first; with `log_target=True` the teacher's come as log-probabilities too, which
# is exact where a probability underflows.

# %%
# lesson code: audiokd_lib.compress.distill.distillation_loss
def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                      alpha: float, multilabel: bool = False) -> torch.Tensor:
    """Hinton distillation: alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * hard loss.

    The T^2 factor keeps the soft term's gradients on the same scale as the hard term's when T
    changes (soft gradients shrink as 1/T^2). For multi-label data every class is its own yes/no
    question: BCE against the teacher's sigmoid(z_t / T), mixed with the hard-label BCE.
    """
    t = temperature
    if multilabel:
        soft = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t))
    else:
        soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard_loss(student, targets, multilabel)


# %% [markdown]
# Before training on it, two limits the formula must obey: with $\alpha = 0$ it is plain cross-entropy,
# and a student whose logits equal the teacher's pays nothing for the soft term.

# %%
z_s, z_t, y = torch.randn(4, len(classes)), torch.randn(4, len(classes)), torch.arange(4) % len(classes)
assert torch.isclose(distillation_loss(z_s, z_t, y, 3.0, 0.0), F.cross_entropy(z_s, y))
assert torch.isclose(distillation_loss(z_t, z_t, y, 3.0, 1.0), torch.tensor(0.0), atol=1e-6)
print("alpha = 0 is cross-entropy; identical logits give a zero soft term")

# %% [markdown]
# ## Cached soft labels meet mixup
#
# Mixup trains on $\lambda x_i + (1-\lambda) x_j$ with the label $\lambda y_i + (1-\lambda) y_j$. A
# cached soft label must be mixed the same way, with the *same* $\lambda$ and the same partner $j$,
# or it would describe another sound than the one the student hears (EfficientAT mixes its stored
# teacher predictions exactly so). Logits cannot be averaged meaningfully, probabilities can: the
# training loop turns the cached logits into probabilities at temperature $T$ once, mixes them
# together with the one-hot labels in a single `mixup` call (one $\lambda$, one permutation for both),
# and turns the mixed probabilities back into logits for the loss:

# %%
# lesson code: audiokd_lib.compress.distill.soft_targets
def soft_targets(teacher_logits: torch.Tensor, temperature: float, multilabel: bool) -> torch.Tensor:
    """The teacher's probabilities at temperature T: what mixup may mix (logits cannot be mixed)."""
    return torch.sigmoid(teacher_logits / temperature) if multilabel else F.softmax(teacher_logits / temperature, 1)


# lesson code: audiokd_lib.compress.distill.logits_at
def logits_at(probs: torch.Tensor, temperature: float, multilabel: bool) -> torch.Tensor:
    """Logits z with softmax(z / T) (or sigmoid(z / T)) equal to `probs`: the inverse of soft_targets."""
    probs = probs.clamp(1e-7, 1 - 1e-7)
    return temperature * (torch.logit(probs) if multilabel else probs.log())


# %% [markdown]
# One batch of four training clips, mixed as the training loop mixes them: labels and soft labels
# side by side in one tensor, so one draw of $\lambda$ and one permutation serve both. Each mixed soft
# label is the same blend of the two clips' soft labels as the mixed one-hot label is of their labels.

# %%
T = params.kd.temperature
probs = soft_targets(teacher_logits["train"][:4], T, multilabel=multilabel)
labels = sets["train"].targets[:4] if multilabel else F.one_hot(sets["train"].targets[:4], len(classes)).float()
mixed_x, mixed_joint, lam = augment.mixup(sets["train"].features[:4].exp(), torch.cat([labels, probs], dim=1),
                                          alpha=0.3, generator=np.random.default_rng(0), multilabel=multilabel, p=1.0)
mixed_labels, mixed_probs = mixed_joint[:, :len(classes)], mixed_joint[:, len(classes):]
if not multilabel:  # multi-label rows (a sigmoid per class) are mixed as a union, not a distribution
    assert torch.allclose(mixed_probs.sum(dim=1), torch.ones(4))  # still a distribution
assert torch.allclose(soft_targets(logits_at(mixed_probs, T, multilabel), T, multilabel), mixed_probs, atol=1e-4)
display(pd.DataFrame({"label weight of the top class": mixed_labels.nan_to_num(0).max(dim=1).values.numpy().round(2),
                      "teacher's top class after mixing": [classes[i] for i in mixed_probs.argmax(dim=1)]}))

# %% [markdown]
# ## The teacher-logit cache
#
# Notebook 03 ran the teacher once over every clip and saved its logits with the teacher's identity,
# the hash of its checkpoint and the clips' paths. Loading checks all three, so a re-trained teacher
# or a changed dataset can never be paired with stale soft labels:

# %%
# lesson code: audiokd_lib.compress.soft_labels.load_teacher_logits
def load_teacher_logits(params: Params, sets: dict[str, FeatureSet]) -> tuple[dict[str, torch.Tensor], str]:
    """The cached soft labels for these feature sets, checked against the teacher and the clips."""
    path = teacher_logits_path(params)
    checkpoint = path.with_name("model.pt")
    if not path.is_file() or not checkpoint.is_file():
        raise FileNotFoundError(f"{path}: no cached teacher logits; run notebook 03_teacher first")
    saved = torch.load(path, weights_only=True)
    if saved["checkpoint_sha256"] != file_digest(checkpoint):
        raise ValueError(f"{path} was made by another teacher checkpoint than {checkpoint}; re-run notebook 03")
    out = {}
    for split, data in sets.items():
        cached = saved["splits"].get(split)
        if cached is None or cached["paths"] != data.paths or saved["classes"] != data.classes:
            raise ValueError(f"{path}: the cached logits of split {split!r} belong to other clips or classes "
                             "(the dataset changed); re-run notebook 03")
        out[split] = cached["logits"]
    return out, saved["identity"]


# %%
again, _ = load_teacher_logits(params, sets)
assert all(torch.equal(again[split], teacher_logits[split]) for split in sets)
print({split: tuple(logits.shape) for split, logits in again.items()}, "logits (clips, classes) per split")

# %% [markdown]
# ## A transfer set: clips only the teacher can label
#
# Distillation has one advantage no labels-only recipe can match: the teacher can label clips that
# have no labels. Hinton et al. (2015) trained their students on such a *transfer set*, and Stanton et
# al. (2021, sec. 5) found that what the student learns from the teacher depends mostly on it. Ours
# is the training notes played by other soundfonts (`data.transfer_soundfonts`: TimGM6mb in the quick
# profile), at the training split's pitches only, rendered by notebook 01 with labels that no model
# ever sees: the teacher's probabilities are their only targets. The held-out soundfont is never part
# of it (the parameters refuse it). The labels-only baseline of notebook 04 trains on the same
# labelled clips and cannot use these.

# %%
transfer_sets = {}
if "transfer" in sets:
    transfer_sets["kd-cached+transfer"] = training.with_transfer_set(
        sets["train"], sets["transfer"], teacher_logits["train"], teacher_logits["transfer"])
    print(f"{len(sets['train'])} labelled training clips + {len(sets['transfer'])} transfer clips "
          f"({', '.join(params.data.transfer_soundfonts)}), labelled by the teacher only")
else:
    print("no transfer split in this profile (data.transfer_soundfonts is empty or not installed)")

# %% [markdown]
# ## Training: every mode, every seed
#
# The student, data, augmentation, optimiser, schedule and epochs are those of the baseline; only the
# loss differs (and, for the transfer variant, the unlabelled clips added). In consistent mode the
# teacher must read the student's features: true for the EfficientAT teacher, which shares the
# students' front end.

# %%
jobs = []
for mode in params.kd.modes:
    if mode == "consistent":
        distill.check_shared_frontend(teacher, student)
    jobs += [runs.RunJob("student-kd", f"student-kd-{mode}-seed{seed}",
                         students.build_student(params, classes, stats, multilabel=multilabel, seed=seed), seed,
                         tags={"variant": f"kd-{mode}", "teacher": identity, "kd_mode": mode},
                         teacher=teacher if mode == "consistent" else None,
                         teacher_logits=teacher_logits["train"] if mode == "cached" else None, kd=kd)
             for seed in params.train.seeds]
for variant, (kd_train, kd_logits) in transfer_sets.items():
    jobs += [runs.RunJob("student-kd", f"student-{variant.replace('+', '-')}-seed{seed}",
                         students.build_student(params, classes, stats, multilabel=multilabel, seed=seed), seed,
                         tags={"variant": variant, "teacher": identity, "kd_mode": "cached"},
                         teacher_logits=kd_logits, kd=kd, train=kd_train)
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
table = results.results_table(params, ["teacher", "student-baseline", "student-kd"])
display(table)

# %% [markdown]
# ## Did distillation help on unseen timbres?
#
# The held-out-soundfont macro-F1 of every distilled variant against the baseline, across seeds:
# the mean difference, its 95% confidence interval and Welch's t-test (which does not assume the two
# recipes vary alike). With three seeds a side the test is weak, so a gain counts only when its
# whole interval lies above zero; the course's target is a gain of at least 3 points.

# %%
score = report.main_score(table)
comparison = results.compare_to_baseline(table, score, by="variant")
display(comparison.round(3))
display(Markdown(results.verdict(comparison, score, target=0.03)))
