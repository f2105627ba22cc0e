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
# # 03 · The teacher: a large pretrained model, fine-tuned, and its soft labels
#
# Knowledge distillation needs a teacher that knows more than the student can learn from our labels
# alone. A model pretrained on AudioSet (two million YouTube clips, 527 sound classes) has heard
# thousands of violins, trumpets and flutes played by different people in different rooms: that
# breadth is what we hope to hand down to a small student.
#
# Which teacher this notebook uses is the profile's choice (`teacher.kind`), and it is never
# swapped silently:
#
# - **`ast`** (the `full` profile): the Audio Spectrogram Transformer, `MIT/ast-finetuned-audioset-10-10-0.4593`
#   from the Hugging Face hub, 86 M parameters, with its own 16 kHz Kaldi filter-bank front end;
# - **`efficientat`** (the `quick` and `smoke` profiles, no downloads needed beyond a 4 MB file):
#   EfficientAT's `mn04_as`, a MobileNetV3 that was itself distilled from an ensemble of PaSST transformers
#   on AudioSet (mAP 0.432). It is an honest *offline substitute*: pretrained on AudioSet, but 1 M parameters,
#   not 86 M. One fine-tuned mn04 is barely larger than our student, so the `quick` profile's teacher is an
#   **ensemble** of several, fine-tuned from different seeds, whose logits are averaged (see below).
#   Every table row says which teacher taught it.
#
# The steps: load the pretrained model, check that it hears what AudioSet taught it, put a new head
# on it for our 14 instruments, fine-tune every member, average them into one model, evaluate it exactly
# like the students, and cache its logits for every clip: the **soft labels** notebook 05 distils from.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import Image, display

from audiokd_lib import training
from audiokd_lib.audio.loading import load_clip
from audiokd_lib.compress import soft_labels
from audiokd_lib.compress.distill import soft_targets
from audiokd_lib.core import plots
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables
from audiokd_lib.experiment import evaluation, runs
from audiokd_lib.models import ensemble, teachers

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
classes = training.class_names(clips)
multilabel = training.is_multilabel(clips)  # OpenMIC: several instruments a clip, a sigmoid per class
print(f"profile {params.profile}: {len(clips)} clips, {len(classes)} classes{' (multi-label)' * multilabel}; "
      f"teacher kind: {params.teacher.kind}")

# %% [markdown]
# ## What the pretrained model hears, before we touch it
#
# For the EfficientAT teacher we can ask the untouched AudioSet model what it hears in one mezzo-forte
# note from the middle of each instrument's range. If the front end matched badly (another mel scale,
# another normalisation), these answers would be nonsense; good answers tell us the features are the
# ones the weights expect.

# %%
if params.teacher.kind == "efficientat":
    audioset = teachers.pretrained_audioset(params)
    if "pitch_id" in clips:  # rendered notes: a mezzo-forte note from the middle of each instrument's range
        test_mf = clips[(clips["split"] == "test") & (clips["dynamics"] == "mf")].sort_values("pitch_id")
        examples = test_mf.groupby("label", group_keys=False)[test_mf.columns].apply(lambda g: g.iloc[[len(g) // 2]])
    else:  # a real dataset: a few test clips
        examples = clips[clips["split"] == "test"].head(len(classes)).assign(
            label=lambda t: t["labels"] if multilabel else t["label"])
    rows = []
    with torch.inference_mode():
        for _, clip in examples.iterrows():
            wave = load_clip(clip["path"], audioset.sample_rate, params.features.clip_seconds)
            top = torch.sigmoid(audioset(wave))[0].topk(3)
            heard = ", ".join(f"{audioset.classes[i]} {p:.2f}" for p, i in zip(top.values, top.indices))
            rows.append({"instrument": clip["label"], "AudioSet top 3": heard})
    display(pd.DataFrame(rows))
else:
    print("AST: its AudioSet head is replaced below; see the model card for what it was trained on")

# %% [markdown]
# ## A new head for our classes
#
# The 527-way AudioSet classifier becomes a 14-way one: the last linear layer is replaced by a
# freshly initialised one. `teacher.finetune` decides what else trains: only the new head (`head`),
# the head and the last few blocks (`last_blocks`), or everything (`all`). With little data the first
# two protect what pretraining learned; with enough, training everything adapts best.

# %%
teacher = teachers.build_teacher(params, classes, multilabel=multilabel)
trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
total = sum(p.numel() for p in teacher.parameters())
identity = teachers.teacher_identity(teacher)
print(f"teacher: {identity}\n{total:,} parameters, {trainable:,} trainable (finetune: {params.teacher.finetune})")

# %% [markdown]
# ## Why an ensemble of teachers
#
# Distillation hands down what the teacher knows beyond the labels, so the teacher should be clearly
# larger and clearly better than the student. One fine-tuned mn04 is barely larger: 27 M MACs a clip
# against the student's 11 M, and only 7 times the pruned student's 3.7 M. The cheapest stronger
# teacher we can build from what we have is an **ensemble**: several copies of mn04, each fine-tuned from
# its own seed (its own new head, batch order and augmentations), with their logits averaged. The members
# make different mistakes, so their mean is more accurate and better calibrated than any one of them
# (Lakshminarayanan et al., 2017), and its soft labels are smoother exactly where the members disagree:
# the "dark knowledge" distillation is after. The models of this course were made the same way:
# EfficientAT's MobileNets were distilled from an ensemble of PaSST transformers (Schmid et al., 2023),
# and CP-JKU's DCASE 2023 low-complexity scene classifiers from an ensemble of teachers.
#
# `teacher.train.seeds` says how many members: three in `quick` (3 x 27 M = 81 M MACs a clip, about
# 7.6 times the baseline student and over 20 times the pruned one), one in `smoke` (a single fine-tuned
# mn04, to keep CI short), and one in `full`, whose AST is large enough alone and reads a front end of
# its own. The ensemble is one `Classifier` whose network runs every member on the same features and
# averages their logits, so it is evaluated, timed, saved, loaded and distilled from exactly like a
# single model.

# %% [markdown]
# ## Features, computed once
#
# Every clip goes through the teacher's front end once; the result is cached under
# `outputs/<profile>/features/cache/`, named by the front end's and the data's fingerprints. The
# EfficientAT teacher and the students share one front end, so they share this cache too.

# %%
sets = evaluation.feature_sets(params, clips, teacher)
for split, subset in sets.items():
    print(f"{split:8s} {len(subset):5d} clips, features {tuple(subset.features.shape[1:])}")

# %% [markdown]
# ## Fine-tuning every member
#
# The shared training loop (AdamW, warm-up then cosine decay, early stopping on validation macro-F1,
# resumable) with the teacher's own budget from `teacher.train`, once per seed. Training sees random
# crops with gain, noise, mixup and SpecAugment; evaluation sees whole clips. The members are
# independent, so they train side by side, one process per core, like the students' seeds in 04.
# Each is a run of its own (`teacher-seed0`, ...) of role `teacher` and variant `member`.

# %%
seeds = params.teacher.train.seeds
ensemble_of = len(seeds) > 1
names = [f"teacher-seed{seed}" for seed in seeds] if ensemble_of else ["teacher"]
tags = ({"teacher": identity, "variant": "member", "member_of": "teacher"} if ensemble_of
        else {"teacher": identity, "variant": "teacher"})
jobs = [runs.RunJob("teacher", name, teachers.build_teacher(params, classes, multilabel, progress=False, seed=seed),
                    seed, tags)
        for name, seed in zip(names, seeds)]
member_runs = runs.train_many(params, jobs, sets, tp=params.teacher.train, params_file=params_file)
display(Image(filename=str(params.output_dir / "figures" / f"{names[0]}_loss.png")))

# %% [markdown]
# ## The ensemble: one model, the members' logits averaged
#
# The ensemble is logged as a run of its own, of role `teacher` and variant `ensemble`, under the name
# `teacher`: that is the model notebooks 05 and 07 distil from, `audiokd classify --model teacher` runs
# and the final table compares against. It is measured like every model, its validation score included,
# so that it, not a member, is the teacher `results.best_run` picks. Its MACs are the members' summed: the
# average itself costs nothing worth counting.

# %%
if ensemble_of:
    teacher = ensemble.build_ensemble([job.model for job in jobs], seeds)
    identity = teachers.teacher_identity(teacher)
    teacher_run = runs.log_model(params, "teacher", "teacher", teacher, sets, params_file=params_file,
                                 tags={"teacher": identity, "variant": "ensemble", "members": ", ".join(names)},
                                 score_splits=("val",))
else:
    teacher, teacher_run = jobs[0].model, member_runs[0]
columns = {"val_macro_f1": "val macro-F1", "test_macro_f1": "test macro-F1", "heldout_macro_f1": "held-out macro-F1",
           "val_mAP": "val mAP", "test_mAP": "test mAP", "heldout_mAP": "held-out mAP", "macs": "MACs",
           "params": "params", "latency_ms": "latency ms"}
models = pd.DataFrame([*member_runs, teacher_run] if ensemble_of else member_runs).set_index("model")
models = models[[c for c in columns if c in models and models[c].notna().any()]].astype({"macs": int, "params": int})
display(models.rename(columns=columns).round(3))
print(f"teacher: {identity}\n{teacher_run['macs'] / 1e6:.1f} M MACs a clip, "
      f"{teacher_run['macs'] / member_runs[0]['macs']:.1f} x one member's")

# %% [markdown]
# The held-out split holds the same instruments played by a soundfont no model has trained on. The
# gap between the test and held-out scores above is the problem distillation is meant to help with: a student
# trained on one soundfont learns that soundfont's samples; a teacher that has heard real
# instruments should generalise better.

# %%
display(Image(filename=str(params.output_dir / "figures" / "teacher_confusion_heldout.png"))
        if "heldout" in sets else "no heldout split in this profile")

# %% [markdown]
# ## The soft labels
#
# The teacher's logits for every clip of every split are cached once, together with its identity and
# the hash of its checkpoint: a changed teacher or dataset is refused rather than mixed with an old
# cache. Dividing logits by a temperature T > 1 before the softmax reveals what the teacher thinks
# beyond its top choice: which *other* instruments a note resembles. That "dark knowledge" is what
# a one-hot label cannot carry.

# %%
checkpoint = runs.checkpoint_path(params, "teacher")
soft_labels.cache_teacher_logits(params, teacher, checkpoint, sets)
logits, cached_identity = soft_labels.load_teacher_logits(params, sets)
assert cached_identity == identity

index = 0  # the first validation clip
fig, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True)
for ax, t in zip(axes, (1.0, params.kd.temperature)):
    probs = soft_targets(logits["val"][index:index + 1], t, multilabel)[0].numpy()  # softmax, or a sigmoid per class
    ax.bar(range(len(classes)), probs)
    ax.set(title=f"T = {t:g}", xticks=range(len(classes)), ylabel="probability")
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
target = sets["val"].targets[index]
playing = [c for c, y in zip(classes, target.tolist()) if y == 1] if multilabel else [classes[int(target)]]
fig.suptitle(f"teacher's view of one clip of {' + '.join(playing) or 'no known instrument'}")
plots.save_fig(fig, params, "03_soft_labels")
plt.show()
