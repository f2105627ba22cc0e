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
#   EfficientAT's `mn04_as`, a MobileNetV3 that was itself distilled from AST ensembles on AudioSet
#   (mAP 0.432). It is an honest *offline substitute*: pretrained on AudioSet, but 1 M parameters, not 86 M.
#   Every table row says which teacher taught it.
#
# The steps: load the pretrained model, check that it hears what AudioSet taught it, put a new head
# on it for our 14 instruments, fine-tune, evaluate it exactly like the students, and cache its
# logits for every clip: the **soft labels** notebook 05 distils from.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Image, display

from audiokd_lib import plots
from audiokd_lib.audio.loading import load_clip
from audiokd_lib.compress import soft_labels
from audiokd_lib.data import tables
from audiokd_lib.experiment import runs, training
from audiokd_lib.experiment.params import load_params
from audiokd_lib.models import teachers

params = load_params(params_file)
torch.set_num_threads(params.threads)
clips = tables.load_clip_table(params, "clips")
classes = training.class_names(clips)
print(f"profile {params.profile}: {len(clips)} clips, {len(classes)} classes; teacher kind: {params.teacher.kind}")

# %% [markdown]
# ## What the pretrained model hears, before we touch it
#
# For the EfficientAT teacher we can ask the untouched AudioSet model what it hears in one mezzo-forte
# note from the middle of each instrument's range. If the front end matched badly (another mel scale, another normalisation), these
# answers would be nonsense; good answers tell us the features are the ones the weights expect.

# %%
if params.teacher.kind == "efficientat":
    audioset = teachers.pretrained_audioset(params)
    test_mf = clips[(clips["split"] == "test") & (clips["dynamics"] == "mf")].sort_values("pitch_id")
    examples = test_mf.groupby("label", group_keys=False)[test_mf.columns].apply(lambda g: g.iloc[[len(g) // 2]])
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
teacher = teachers.build_teacher(params, classes)
trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
total = sum(p.numel() for p in teacher.parameters())
identity = teachers.teacher_identity(teacher)
print(f"teacher: {identity}\n{total:,} parameters, {trainable:,} trainable (finetune: {params.teacher.finetune})")

# %% [markdown]
# ## Features, computed once
#
# Every clip goes through the teacher's front end once; the result is cached under
# `outputs/<profile>/features/cache/`, named by the front end's and the data's fingerprints. The
# EfficientAT teacher and the students share one front end, so they share this cache too.

# %%
sets = runs.feature_sets(params, clips, teacher)
for split, subset in sets.items():
    print(f"{split:8s} {len(subset):5d} clips, features {tuple(subset.features.shape[1:])}")

# %% [markdown]
# ## Fine-tuning
#
# The shared training loop (AdamW, warm-up then cosine decay, early stopping on validation macro-F1,
# resumable) with the teacher's own budget from `teacher.train`. Training sees random crops with
# gain, noise, mixup and SpecAugment; evaluation sees whole clips.

# %%
teacher, teacher_run = runs.train_and_log(params, "teacher", "teacher", teacher, sets, seed=params.seed,
                                          tp=params.teacher.train, tags={"teacher": identity, "variant": "teacher"},
                                          params_file=params_file)
display(Image(filename=str(params.output_dir / "figures" / "teacher_loss.png")))
print(f"teacher test macro-F1 {teacher_run['test_macro_f1']:.3f}, "
      f"held-out soundfont macro-F1 {teacher_run.get('heldout_macro_f1', float('nan')):.3f}")

# %% [markdown]
# The held-out split holds the same instruments played by a soundfont no model has trained on. The
# gap between the two numbers above is the problem distillation is meant to help with: a student
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

index = int(np.argmax(sets["val"].targets.numpy() == sets["val"].targets.numpy()[0]))
fig, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True)
for ax, t in zip(axes, (1.0, params.kd.temperature)):
    probs = torch.softmax(logits["val"][index] / t, dim=0).numpy()
    ax.bar(range(len(classes)), probs)
    ax.set(title=f"T = {t:g}", xticks=range(len(classes)), ylabel="probability")
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
fig.suptitle(f"teacher's view of one {classes[int(sets['val'].targets[index])]} note")
plots.save_fig(fig, params, "03_soft_labels")
plt.show()
