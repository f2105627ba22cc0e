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
# # 01 · Data: instrument notes and pieces with exact stems
#
# Everything in this course learns from a **table of clips**: a path, its labels, its split, its
# source. This notebook builds two such tables without downloading anything, by *rendering* audio
# from General MIDI soundfonts (collections of recorded instrument samples):
#
# 1. **single notes**, like [TinySOL](https://zenodo.org/record/3685367): 14 orchestral instruments,
#    every semitone of their range, three dynamics. This is the classification task of notebooks 02-07.
# 2. **pieces with stems**, like Slakh or MUSDB: ten-second procedural songs (chords, bass line, drums,
#    melody) where every instrument is rendered on its own, so the exact stems are known. Notebook 08
#    separates them.
#
# Rendering gives what recordings rarely do: exact labels, exact stems, and a controlled **domain
# shift**. We render the training data with one soundfont and keep another soundfont's timbres for a
# `heldout` split that no model trains on: it tells us whether a model learnt *instruments* or just
# *one sample library*.
#
# With `data.dataset` set to a real dataset (the `full` profile uses TinySOL), the notes come from
# real recordings instead, downloaded once as a subset within a byte budget; the pieces are rendered
# as before.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import soundfile as sf
from IPython.display import display

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.core import plots
from audiokd_lib.core.params import load_params
from audiokd_lib.data import real, real_eval, tables
from audiokd_lib.data.pieces import read_pieces

params = load_params(params_file)
print(f"profile {params.profile}: outputs in {params.output_dir}")

# %% [markdown]
# ## Soundfonts
#
# The profile names the training soundfonts and the held-out one. On Debian, `make` installs
# FluidR3_GM and MuseScore General; without them the project substitutes TimGM6mb (shipped inside the
# `pretty_midi` package) and says so here and in the data manifest, so nothing changes silently.

# %%
plan = tables.plan_soundfonts(params.data)
print("training soundfonts:", {name: str(path) for name, path in plan.train.items()})
print("held-out soundfont: ", plan.heldout)
for notice in plan.notices:
    print("NOTE:", notice)

# %% [markdown]
# ## Real recordings (when the profile asks for them)
#
# | `data.dataset` | what it is | licence | table(s) |
# |---|---|---|---|
# | `tinysol` | 2,913 single notes of 14 orchestral instruments (Zenodo 3685367) | CC BY 4.0 | `clips`, single-label |
# | `irmas` | 3 s excerpts with their predominant instrument, 11 classes (Zenodo 1290750) | CC BY-NC-SA 3.0 | `clips`, single-label; `irmas_testing`, multi-label |
# | `openmic` | 10 s clips, 20 instruments, partly labelled (Zenodo 1432913) | CC BY 4.0 | `openmic`, multi-label |
# | `esc50` | 5 s environmental sounds, 50 classes (a backup for debugging the pipeline) | CC BY-NC 3.0 | `clips`, single-label |
#
# Only a **subset** is fetched (`data.downloads.<dataset>`: classes, files per class, longest clip),
# and never more than `data.downloads.budget_bytes` in total (1 GB): a download that would pass it is
# refused before it starts. Zip archives are read by HTTP range requests, member by member; a
# .tar.gz is streamed and the stream stops once every class has its clips. Whole files are checked
# against their md5, zip members against their CRC-32; `manifest.json` in the cache records what was
# taken. A second run finds everything in the cache and downloads nothing.

# %%
real_data = None
if params.data.dataset != "rendered_notes":
    real_data = real.prepare(params)
    print(real_data.summary())
    for name, table in real_data.tables.items():
        label = "label" if "label" in table else "labels"
        print(f"\n{name}: {len(table)} clips\n", pd.crosstab(table[label], table["split"], margins=True))
    first = next(iter(real_data.tables.values())).iloc[0]
    print("\nlisten:", first["path"])
    display(plots.player(load_audio(first["path"], params.data.sample_rate), params.data.sample_rate))

# %% [markdown]
# ## Single notes
#
# Skipped when a real dataset replaces them. Each note is held for three quarters of the clip and then released, written as a 16-bit FLAC in
# TinySOL's folder layout with a metadata CSV in TinySOL's own columns, so the same loader reads the
# real dataset. Some soundfonts have no sample for some keys (FluidR3's contrabass above MIDI 57):
# such renders are silent, detected, and dropped. Rendering resumes: a second run only renders what
# is missing.

# %%
notes_report = tables.render_notes_dataset(params, plan) if real_data is None else None
if notes_report is not None:
    print(notes_report.summary())
    notes_meta = notes_report.metadata
    counts = notes_meta.pivot_table(index="Instrument (in full)", columns="Soundfont", values="Path", aggfunc="count")
    fig, ax = plt.subplots(figsize=(9, 4))
    counts.plot.barh(ax=ax)
    ax.set(xlabel="notes", ylabel="", title="Rendered notes per instrument and soundfont")
    plots.save_fig(fig, params, "01_notes_per_instrument")
    plt.show()

# %% [markdown]
# Listen to one instrument at the three dynamics. Dynamics change loudness *and* timbre (a soundfont
# may switch samples with velocity): a classifier must not mistake loud for brass.

# %%
if notes_report is not None:
    flute = notes_meta[notes_meta["Instrument (abbr.)"] == "Fl"]
    example = flute[flute["Pitch ID"] == flute["Pitch ID"].iloc[len(flute) // 2]]
    for _, row in example.iterrows():
        wave = load_audio(notes_report.root / row["Path"], mono=True)
        print(row["Instrument (in full)"], row["Pitch"], row["Dynamics"], row["Soundfont"])
        display(plots.player(wave, params.data.sample_rate))

# %% [markdown]
# ## Pieces with stems
#
# A piece is built from procedural MIDI: a chord progression, a bass line on its roots, a drum
# pattern on the General MIDI percussion channel, and melody or accompaniment parts drawn from piano,
# guitar, strings, brass, woodwinds and a voice-like part. A random subset of parts plays in each
# piece. Every part is rendered alone (its **stem**), and the mixture is defined as the exact sum of
# the stems: ground truth for separation that a single-pass render could not give.

# %%
piece_reports = tables.render_pieces_dataset(params, plan)
for report in piece_reports:
    print(report.summary())

# %%
if piece_reports:
    piece = read_pieces(piece_reports[0].root).iloc[0]
    mixture, rate = sf.read(piece["path"], dtype="float32")
    stems = {p.stem: sf.read(p, dtype="float32")[0] for p in sorted(Path(piece["stems_dir"]).glob("*.flac"))}
    error = np.abs(sum(stems.values()) - mixture).max()
    print(f"{piece['sample_key']}: {', '.join(stems)}; max |sum(stems) - mixture| = {error:.2e}")
    assert error < 1e-5, "the mixture must be the exact sum of its stems"
    display(plots.player(mixture[None], rate))
    for name, stem in stems.items():
        print(name)
        display(plots.player(stem[None], rate))

# %% [markdown]
# ## The clip tables and their splits
#
# For rendered notes, `train`, `val` and `test` come from the training soundfonts; all dynamics of
# one instrument's pitch stay in the same split, because a pp and an ff of the same note are
# near-copies. `heldout` holds every clip of the held-out soundfont. `transfer` holds the notes of
# the transfer soundfonts (`data.transfer_soundfonts`), kept only at pitches of the `train` split: no
# model ever sees their labels; notebook 05 lets the teacher label them. A real dataset keeps its own
# official splits (TinySOL's folds, say); see `audiokd_lib/data/` (one module per dataset) for how
# each is mapped.

# %%
clips, pieces = tables.build_clip_tables(params, plan, real_data)
if clips is not None and "label" in clips:
    print(pd.crosstab(clips["label"], clips["split"], margins=True))
elif clips is not None:  # multi-label (OpenMIC): positives per class and split
    positives = clips.assign(label=clips["labels"].str.split("|")).explode("label")
    print(pd.crosstab(positives["label"], positives["split"], margins=True))
print(pieces["split"].value_counts())

# %%
# What must hold before moving on.
if real_data is None:
    train_test = clips[clips["split"].isin(["train", "test"])]
    leaks = train_test.groupby(["label", "pitch_id"])["split"].nunique().max()
    assert leaks == 1, "a pitch of an instrument appears in both train and test"
    assert set(clips.loc[clips["split"] == "heldout", "soundfont"]) <= {plan.heldout[0] if plan.heldout else None}
    transfer = clips[clips["split"] == "transfer"]
    assert not set(transfer["soundfont"]) & {plan.heldout[0] if plan.heldout else None, *plan.train}
    trained = set(clips.loc[clips["split"] == "train", ["label", "pitch_id"]].itertuples(index=False, name=None))
    assert set(transfer[["label", "pitch_id"]].itertuples(index=False, name=None)) <= trained
if clips is not None and "label" in clips:
    assert clips["label"].nunique() == clips.loc[clips["split"] == "train", "label"].nunique(), "a class has no training clips"
if clips is not None:
    assert all(Path(p).is_file() for p in clips["path"]), "a clip of the table is missing on disk"
else:
    print("NOTE: no clip table (clips.csv) for notebooks 02-07")
print("clip tables saved:", tables.data_dir(params))

# %% [markdown]
# ## Real recordings: the `real` column of every table
#
# Everything so far is rendered. To see how far that carries to microphones and rooms, every
# single-label model is also scored on a handful of **real recordings** of TinySOL instruments:
# single notes (TinySOL, sms-tools), one-second excerpts of orchestral parts recorded one instrument
# at a time (PHENICX-Anechoic), and a few solo phrases (Medley-solos-DB, sms-tools, librosa's
# trumpet). `audiokd_lib/data/real_eval.csv` lists each with its public URL at a fixed commit, its
# SHA-256 and its licence; they are fetched once into the cache (or read from the folder named by
# `data.real_eval.dir` or `$AUDIOKD_REAL_EVAL`), checked, and never trained on, tuned on or used to
# pick a checkpoint: with 19 recordings, one more right answer moves accuracy by 5 points, so they
# are a report, not a benchmark. A recording that cannot be had is listed with the reason, and the
# tables say so.

# %%
recordings = real_eval.prepare(params) if params.data.real_eval.enabled else None
if recordings is not None:
    print(real_eval.summary(recordings))
    display(recordings[["file", "label", "openmic_class", "seconds", "licence", "status"]])
    found = recordings[recordings["status"] == "ok"]
    if len(found):
        first = found.iloc[0]
        print("listen:", first["file"], "-", first["label"])
        display(plots.player(load_audio(first["path"], params.data.sample_rate), params.data.sample_rate))
