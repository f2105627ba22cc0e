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
# # 08 · Separation: hand over only the stems of the instruments the model hears
#
# The last step puts a classifier to work. A **separator** splits a mixture into stems (drums, bass,
# vocals, other, as in MUSDB18); a multi-label **instrument detector** says which instruments play; and
# only the stems those instruments live in are handed over as WAV files, with a manifest that records
# the scores, the choice, the reason for every stem and what the instrument-to-stem mapping cannot do.
#
# The pieces notebook 01 rendered make this measurable: every piece ships the exact stem of each group,
# so a separator's output can be compared with the truth, sample by sample. In order:
#
# 1. train a small separator of our own, a mask CRNN, within the profile's time budget;
# 2. score it in dB of SDR against two references, the untouched mixture and the ideal ratio mask;
# 3. train the instrument detector: the course's student, multi-label this time, distilled from the
#    AudioSet-pretrained mn04 read zero-shot;
# 4. separate a few held-out pieces, choose stems from the detector's scores, write them, and listen.
#
# The pretrained HTDemucs, far better than anything trained in a few CPU minutes, takes the
# separator's place where its weights can be had (the `full` profile; see the last section).

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import json
from html import escape

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import HTML, Image, Markdown, display

from audiokd_lib.audio.loading import load_audio, resample
from audiokd_lib.core import metrics, plots, tracking
from audiokd_lib.core.params import load_params
from audiokd_lib.data import real_eval, tables, taxonomy
from audiokd_lib.experiment import evaluation, report, results, runs
from audiokd_lib.models import checkpoints, students, teachers
from audiokd_lib.separation import crnn, quality, stem_selection
from audiokd_lib.separation import detector as detection
from audiokd_lib.separation.crnn import MaskCRNN, level
from audiokd_lib.separation.quality import SDR_CLAMP_DB
from audiokd_lib.separation.separator import load_demucs, open_separator

params = load_params(params_file)
torch.set_num_threads(params.threads)
pieces = tables.load_clip_table(params, "pieces")
sp, cp, sample_rate = params.separation, params.separation.crnn, params.data.pieces.sample_rate
print(f"profile {params.profile}: {len(pieces)} pieces of {params.data.pieces.seconds:g} s at {sample_rate} Hz, "
      f"{pieces['split'].value_counts().to_dict()}")

# %% [markdown]
# ## A separator of our own: the mask CRNN
#
# `crnn.MaskCRNN` reads the magnitude of the mixture's STFT and predicts, for every
# time-frequency bin, which share of it belongs to each of the four groups: a softmax over the groups,
# so the four masks add up to one and the four stems add up to the mixture. A convolutional encoder
# halves the frequency axis block by block, a bidirectional GRU reads the whole segment frame by frame
# at the bottom, and a U-Net decoder climbs back with skip connections (`MaskCRNN.masks`).
#
# Given the masks, separating takes three lines: each stem is its mask times the mixture's complex
# STFT, inverted. A mask is a real number per bin, so every stem keeps the mixture's phase; what the
# network decides is only how the mixture's energy is shared out. This is the CRNN's forward pass:

# %%
# lesson code: audiokd_lib.separation.crnn.masked_stems
def masked_stems(model: MaskCRNN, mix: torch.Tensor) -> torch.Tensor:
    """Mixtures (batch, 1, samples) -> stems (batch, sources, 1, samples): each mask times the mixture's STFT."""
    batch, _, samples = mix.shape
    spectrum = model.stft(mix[:, 0])
    stems = model.masks(spectrum) * spectrum[:, None]  # complex: every stem keeps the mixture's phase
    waves = torch.istft(stems.flatten(0, 1), model.n_fft, model.hop, window=model.window, length=samples)
    return waves.reshape(batch, len(model.sources), 1, samples)


# %% [markdown]
# Training examples are made on the fly: two-second crops of the group stems, remixed at random gains,
# half of them from one piece (music that belongs together) and half from different pieces (so the
# network cannot lean on which instruments usually play together).
#
# The loss compares magnitudes, not waveforms: the L1 distance between each masked mixture magnitude
# and the true group's magnitude, bin by bin. Since the phase is the mixture's anyway, a waveform loss
# would mostly punish what the masks cannot change. Each example is divided by its mixture's level
# (`crnn.level`, the RMS magnitude of its STFT), so a quiet crop counts as much as a loud one.

# %%
# lesson code: audiokd_lib.separation.crnn.magnitude_loss
def magnitude_loss(model: MaskCRNN, mixture: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """L1 distance between masked mixture magnitudes and the sources' magnitudes, at the mixture's level.

    Dividing by the mixture's level makes every example count the same, however loud it is.
    """
    spectrum = model.stft(mixture)
    targets = model.stft(sources.flatten(0, 1)).abs().reshape(*sources.shape[:2], *spectrum.shape[1:])
    estimates = model.masks(spectrum) * spectrum.abs()[:, None]
    return ((estimates - targets).abs() / level(spectrum)[:, None]).mean()


# %% [markdown]
# Training stops after `separation.crnn.epochs`, after `patience` epochs without a lower validation
# loss (on whole validation pieces, not remixed), or when `time_budget_s` is spent, and keeps its best
# epoch: the same epoch loop as the classifiers' (notebook 04), with this step and this loss.
#
# This is one run with nothing beside it, so it gets every core the profile lets training use
# (`workers` processes of `threads` threads each). `runs.train_separator` trains it, measures it and
# logs it to MLflow as a run of role `separator`, with its checkpoint at the root of the run's
# artifacts (where `audiokd separate --separator crnn` finds it). A finished run with the same
# settings and pieces is reused, not trained again.

# %%
torch.set_num_threads(runs.threads_for_one_run(params))
separator_run = runs.train_separator(params, pieces, params_file)
separator = open_separator("crnn", params)
display(Image(filename=str(tracking.artifact_path(separator_run, "separator-crnn_loss.png"))))
print(f"separator-crnn: {int(separator_run['params']):,} parameters, {separator_run['size_mb']:.1f} MB; per second "
      f"of audio {separator_run['macs'] / 1e9:.2f} GMACs and {separator_run['latency_ms']:.0f} ms on "
      f"{int(separator_run['threads'])} thread(s). Best epoch {int(separator_run['best_epoch'])} of "
      f"{int(separator_run['epochs_run'])}, {separator_run['train_seconds']:.0f} s of training, "
      f"stopped by: {separator_run['stopped']}")

# %% [markdown]
# MACs and latency are for **one second** of audio: MACs counted by thop as for every model of the
# course (convolutions, BatchNorm, linear layers and the GRU; the STFT and its inverse are not
# counted), latency the median of a few forward passes on the CPU. The MLflow run holds them as
# `macs` and `latency_ms`, next to the learning curve and the checkpoint.
#
# ## How well does it separate? SDR against the floor and the ceiling
#
# The signal-to-distortion ratio (SDR, BSS Eval v4 with a 512-tap distortion filter, computed by
# fast_bss_eval) compares an estimated stem with the true one; higher is better, in dB. Two references
# are measured the same way:
#
# - **mixture**: the untouched mixture handed over as every stem, the floor. It is far from -inf: a
#   stem that dominates the mix already scores well.
# - **ideal ratio mask**: each group's true magnitude share applied to the mixture's STFT. It needs
#   the true stems, so it is no separator: it is the ceiling of any magnitude mask on this STFT,
#   which is what the CRNN predicts.
#
# Aggregation, stated because SDR tables are hard to compare otherwise: one SDR per **whole track**
# and stem (not museval's median over one-second frames), the **mean over the tracks** in which that
# group plays (a silent group has no SDR), and `average` the mean of the four stem means.
# `gain_over_mixture` is the average minus the mixture's; `rtf` (real-time factor) is seconds spent
# separating per second of audio, here on the threads above. `separation.eval_pieces` caps the pieces
# scored per split (null: all of them).
#
# The SDR itself comes from fast_bss_eval: BSS Eval finds the 512-tap filter that best turns the true
# stem into the estimate, calls what that filter explains the signal and the rest distortion, and
# reports their power ratio in dB. An estimate that equals its reference would score infinity; the
# score is clamped at `SDR_CLAMP_DB`.

# %%
# lesson code: audiokd_lib.separation.quality.sdr
def sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """SDR in dB of one estimate against its reference (BSS Eval v4, 512-tap distortion filter).

    fast_bss_eval's numpy backend in float64 (its torch backend crashed on these machines). One
    reference at a time: given several, fast_bss_eval would pick the best permutation, which flatters.
    """
    import fast_bss_eval

    value = fast_bss_eval.sdr(np.asarray(reference, np.float64)[None], np.asarray(estimate, np.float64)[None],
                              clamp_db=SDR_CLAMP_DB)
    return float(np.asarray(value).reshape(-1)[0])


# %% [markdown]
# `runs.separator_scores` runs `quality.evaluate` (the mixture, the ideal ratio mask and the CRNN, piece by
# piece, with the SDR above) on each split, adds the scores to the separator's MLflow run
# (`test_sdr_average_CRNN`, ...; per-track tables under `sdr/`), and keeps them in its run folder: a second
# run with the same checkpoint, pieces and settings reads them back instead of separating again.

# %%
eval_sets = {split: pieces[pieces["split"] == split].head(sp.eval_pieces) for split in ("test", "heldout")}
sdr_scores = runs.separator_scores(params, separator_run, separator, eval_sets)
sdr_table = pd.concat({split: scores.table() for split, scores in sdr_scores.items()}, names=["split", "method"])
display(sdr_table.round(2))
print(f"{', '.join(f'{len(rows)} {split}' for split, rows in eval_sets.items())} pieces; whole-track SDR in dB, "
      f"mean over tracks; RTF on {torch.get_num_threads()} thread(s)")

# %%
fig, axes = plt.subplots(1, len(sdr_scores), figsize=(5 * len(sdr_scores), 3.2), sharey=True, squeeze=False)
for ax, (split, scores) in zip(axes[0], sdr_scores.items()):
    scores.table().drop(columns=["gain_over_mixture", "rtf"]).T.plot.bar(ax=ax, rot=0, title=f"{split} pieces",
                                                                         legend=False)
    ax.set(ylabel="SDR (dB)")
    ax.axhline(0, color="black", linewidth=0.5)
fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0))
display(Image(filename=str(plots.save_fig(fig, params, "08_sdr"))))
plt.close(fig)
assert (sdr_table.xs("ideal ratio mask", level="method")["average"]
        > sdr_table.xs("mixture", level="method")["average"]).all(), "the ceiling must lie above the floor"
gain = sdr_table.xs("CRNN", level="method")["gain_over_mixture"]
display(Markdown("The CRNN's average SDR gain over the mixture: " + ", ".join(
    f"**{value:+.1f} dB** on {split}" for split, value in gain.items()) +
    f" (the course's target for the quick budget: at least +3 dB; a {cp.time_budget_s:g} s budget here)."))

# %% [markdown]
# Read the columns, not only `average`. In the quick profile's run the CRNN lifts drums and bass 6 to
# 12 dB above the mixture (they have a spectral home of their own: broadband hits, low notes), `other`
# wherever it is not already the bulk of the mix, and has not learned `vocals` within its budget: its
# vocals stem scores below the untouched mixture. The vocals here are General MIDI choirs and synth
# voices singing vowels, sustained tones much like the strings, organs and pads of `other`; telling
# them apart takes timbre, which a few minutes of training do not teach.
# Compare the splits by `gain_over_mixture`, not by raw SDR: the held-out soundfont balances its
# groups differently, so even the floor moves. The gap to the ideal ratio mask is what more training,
# more data or a better network could still win.
#
# ## The instrument detector: the student, multi-label, distilled from a zero-shot teacher
#
# Choosing stems needs to know which instruments play, several at once. The classifiers of notebooks
# 03-07 learned single notes, one instrument per clip; here the same student architecture learns the
# pieces, with a multi-hot target over the 20 OpenMIC-2018 classes (the pieces' instrument names),
# a sigmoid per class and binary cross-entropy. All 20 classes are kept, also those no training piece
# has: the separator's mapping speaks OpenMIC, and `mAP` averages only over the classes present in a
# split, so an absent class does not count against the model.
#
# The detector reads whole pieces: its front end is the course's 32 kHz log-mel with the clip length
# set to the pieces' length. It trains on random crops (`separation.detector.crop_seconds`) and is
# evaluated on whole pieces. Normalisation statistics come from the training pieces. Pieces alone
# teach it instruments in company only: an instrument that plays in most pieces (bass, voice) becomes
# a safe guess on anything. `separation.detector_solo_stems` adds that many stems of each training
# piece as clips of their own, one instrument labelled each (`tables.solo_stems`).

# %%
torch.set_num_threads(params.threads)
detector_params = detection.detector_params(params)  # whole pieces as clips; mn04 as the teacher, always
classes = list(taxonomy.OPENMIC_CLASSES)
stats = detection.norm_stats(detector_params, pieces)
# Solo stems of the training pieces join them (`separation.detector_solo_stems` a piece): one instrument alone
solos = tables.solo_stems(pieces[pieces["split"] == "train"], sp.detector_solo_stems, params.seed)
sets = evaluation.feature_sets(detector_params, pd.concat([pieces, solos], ignore_index=True),
                         students.build_student(detector_params, classes, stats, multilabel=True))
print({split: tuple(s.features.shape) for split, s in sets.items()}, f"({len(solos)} solo stems in train)")
print(f"instruments per training piece: {sets['train'].targets.sum(1).mean():.1f} on average; "
      f"classes without a training piece: {[c for c, n in zip(classes, sets['train'].targets.sum(0)) if n == 0]}")

# %% [markdown]
# ### The teacher: mn04 on AudioSet, read as an OpenMIC classifier
#
# OpenMIC-2018's 20 classes were defined from the AudioSet ontology, so the AudioSet-pretrained mn04
# already has an output for each (`teachers.OPENMIC_TO_AUDIOSET`: bass is "Bass guitar", drums "Drum
# kit", voice "Singing", ...). Keeping those 20 of its 527 logits makes it an instrument detector
# without any training: a **zero-shot** teacher.
#
# Its ranking is good, its probabilities are not: they follow AudioSet's priors and recordings, and on
# these pieces almost every instrument that plays gets less than 0.5, so its micro-F1 at 0.5 is near
# zero. Distilling those probabilities would teach the student to say "absent" to everything. Two
# numbers per class, a scale and a shift fitted on the **training** pieces' labels (Platt scaling,
# `teachers.fit_calibration`), move the logits to this data; with a positive scale no class's ranking
# changes, so mAP stays as it was.

# %%
audioset = teachers.pretrained_audioset(detector_params)
zero_shot = detection.zero_shot_logits(detector_params, audioset, sets, classes)  # a second run reads them back
scale, shift = teachers.fit_calibration(zero_shot["train"], sets["train"].targets)
teacher_logits = {split: scale * logits + shift for split, logits in zero_shot.items()}
teacher_table = pd.DataFrame({
    (split, version): metrics.classification_metrics(sets[split].targets.numpy(), logits[split].numpy(), classes, True)
    for split in ("test", "heldout") if split in sets  # the real solos: per recording, with the detectors below
    for version, logits in (("zero-shot", zero_shot), ("calibrated", teacher_logits))}).T
display(teacher_table.round(3))

# %% [markdown]
# ### Two detectors: labels alone, and distilled
#
# As in notebooks 04 and 05, the same student with the same recipe (`separation.detector`) learns
# once from the labels alone and once with Hinton's loss against the calibrated teacher's cached
# logits (`kd.temperature`, `kd.alpha`; for multi-label data every class is its own yes/no question).
# Both runs train side by side and are logged with role `detector`. The detector used below is the one
# with the better **validation** mAP; test and heldout scores are only reported.
#
# Expect no miracle from distillation here: the teacher's mAP on the training pieces is well below
# what the exact labels give, so its soft targets add information only where the labels say nothing
# (classes absent from the pieces) and noise elsewhere.

# %%
seed = sp.detector.seeds[0]
teacher_name = f"{teachers.teacher_identity(audioset)}, zero-shot, calibrated"
jobs = [
    runs.RunJob("detector", "detector-labels",
                students.build_student(detector_params, classes, stats, multilabel=True, seed=seed), seed,
                tags={"variant": "labels"}),
    runs.RunJob("detector", "detector-kd",
                students.build_student(detector_params, classes, stats, multilabel=True, seed=seed), seed,
                tags={"variant": "kd", "teacher": teacher_name}, teacher_logits=teacher_logits["train"], kd=params.kd),
]
detector_runs = runs.train_many(detector_params, jobs, sets, tp=sp.detector, params_file=params_file)
chosen_run = results.best_run(params, "detector")
detector = next(job.model for job in jobs if job.name == chosen_run["model"])
print(f"detector used below: {chosen_run['model']} (val mAP {chosen_run['val_mAP']:.3f})")

# %% [markdown]
# ### The detectors on real solo recordings
#
# The pieces are rendered; the real recordings of notebook 01 are not. Those with an OpenMIC class
# (solo flute, violin, cello, clarinet, trumpet, saxophone, double bass) each have exactly one right
# answer, so every other class a detector names on them is a false alarm. **Precision** is the share
# of the instruments a detector names (probability at least `separation.threshold`, windows combined
# by their maximum as `audiokd classify` does) that are right; **recall** the share of recordings
# whose instrument it names. Every run measured them when it was logged (`real_precision`,
# `real_recall`, at p >= 0.5, and `real_mAP`: the table below); nothing is tuned on them. The table
# just below shows what each detector names on each recording.

# %%
recordings = real_eval.load_table(params)
if recordings is None:
    print("no real recordings (see notebook 01): no real precision or recall")
else:
    solos = recordings[recordings["openmic_class"].isin(classes)]
    detectors = {job.name: runs.checkpoint_path(params, job.name) for job in jobs}
    display(detection.named_on_solos(params, detectors, solos, sp.threshold))
detector_table = results.results_table(params, ["detector"])
display(detector_table)
for _, row in detector_table.iterrows():  # the course's target: at least half of what it names is right
    if "real precision" in row and pd.notna(row["real precision"]):
        print(f"{row['model']}: real precision {row['real precision']:.2f}, recall {row['real recall']:.2f} "
              f"(target precision at least 0.5: {'met' if row['real precision'] >= 0.5 else 'not met'})")
    elif "real recall" in row and pd.notna(row["real recall"]):
        print(f"{row['model']}: names nothing on the real solos (recall {row['real recall']:.2f})")

# %% [markdown]
# Compare the rows with the teacher's table above. In the quick profile's run the detector trained on
# labels alone is the better one, and the calibrated zero-shot teacher still ranks better than either
# student: 160 short pieces are little to learn 20 instruments from. Distillation earns its keep where
# the teacher knows more than the labels say, which the rendered pieces, labelled exactly, leave little
# room for. The detector is the weak link of the chain: bass and drums it hears well, the rarer
# instruments of `other` seldom reach the threshold, and where an instrument is common in training
# (voice) it tends to say so whatever it hears. Read the manifests below with that in mind.

# %% [markdown]
# ### With OpenMIC: the course's own final student is the detector
#
# With `data.dataset: openmic` notebooks 02-07 trained, distilled, pruned and re-distilled multi-label
# students on OpenMIC-2018's real recordings. The final one (the structured-pruned, re-distilled
# student of notebook 07) then chooses the stems instead of the detector above: the compressed model
# of the course doing the job it was compressed for.

# %%
if params.data.dataset == "openmic":
    chosen_run = report.final_student(params)
    detector = checkpoints.load_checkpoint(runs.checkpoint_path(params, chosen_run["model"]))
    print(f"detector used below: {chosen_run['model']}, the final multi-label student of notebook 07 "
          f"(test mAP {chosen_run['test_mAP']:.3f}; classes {', '.join(detector.classes)})")

# %% [markdown]
# ## From instruments to stems
#
# A stem is handed over when an instrument it carries scores at least `separation.threshold`. The
# mapping (`stem_selection.stem_mapping`) gives each OpenMIC class its own stem when the separator has one
# (voice to `vocals`, drums and cymbals to `drums`, bass to `bass`, guitar and piano to their own stems
# in a 6-stem model) and `other` for everything else. Here it is for a 4-stem separator (the CRNN,
# htdemucs) and a 6-stem one (htdemucs_6s):

# %%
display(stem_selection.mapping_table().set_index("class").T)
mapping = stem_selection.stem_mapping(separator.sources)
display(Markdown("What this mapping cannot do, for the CRNN's stems:\n\n" +
                 "\n".join(f"- {limit}" for limit in stem_selection.mapping_limits(mapping, separator.sources))))

# %% [markdown]
# Now the whole path on a few held-out pieces, as `audiokd separate` runs it on any file: separate the
# mixture in overlapping segments, run the detector on the whole mixture (the maximum over its windows
# for each class: an instrument is present if it plays anywhere), choose, and write the chosen stems as
# 32-bit float WAV files with `manifest.json` to `outputs/<profile>/separated/<piece>/`. The manifests
# are stored with the separator's MLflow run as well.

# %%
separated_dir = params.output_dir / "separated"
examples = pieces[pieces["split"] == "heldout"].head(4)
rows = []
for piece in examples.itertuples():
    info = {"input": piece.path, "true_instruments": piece.labels.split("|"),
            "separator": {"choice": "crnn", "run_id": separator_run["run_id"]},
            "classifier": {"model": chosen_run["model"], "run_id": chosen_run["run_id"], "classes": detector.classes}}
    # Kept from an earlier run when made by the same separator, detector and settings; else made (again).
    manifest = stem_selection.separate_and_choose(separator, detector, piece.path, separated_dir, piece.sample_key,
                                                  sp, info)
    heard = sorted((p, c) for c, p in manifest["scores"].items() if p >= sp.threshold)[::-1]
    rows.append({"piece": piece.sample_key, "plays": piece.labels.replace("|", ", "),
                 "heard": ", ".join(c for _, c in heard), "stems handed over": ", ".join(manifest["chosen"]),
                 "folder": str((separated_dir / piece.sample_key).relative_to(params.output_dir))})
    assert sorted(p.stem for p in (separated_dir / piece.sample_key).glob("*.wav")) == sorted(manifest["chosen"])
display(pd.DataFrame(rows))
for piece in examples.itertuples():
    runs.add_artifacts(params, separator_run["run_id"], [separated_dir / piece.sample_key / "manifest.json"],
                       folder=f"selection/{piece.sample_key}")

# %%
first = examples["sample_key"].iloc[0]
manifest = json.loads((separated_dir / first / "manifest.json").read_text())
print(json.dumps({key: manifest[key] for key in ("track", "files", "threshold", "chosen", "reasons", "limits")},
                 indent=1))

# %% [markdown]
# ## Listening
#
# Pick a piece: the instruments it plays and the ones the detector hears, then the mixture and every
# stem handed over beside the true group stem it should match, with their log-mel spectrograms.

# %%
hop_seconds = detector.spec["features"]["hop_length"] / detector.sample_rate


def logmel(wave: torch.Tensor) -> torch.Tensor:
    return detector.features(resample(wave, sample_rate, detector.sample_rate))


def show_track(key: str) -> None:
    """Predicted instruments, players and spectrograms of one separated piece: each stem beside the truth."""
    manifest = json.loads((separated_dir / key / "manifest.json").read_text())
    mixture, groups = crnn.load_piece(manifest["input"], taxonomy.GROUPS, sample_rate)
    heard = [f"{c} {p:.2f}" for c, p in manifest["scores"].items() if p >= manifest["threshold"]]
    display(Markdown(f"**{key}** plays {', '.join(manifest['true_instruments'])}; the detector hears "
                     f"{', '.join(heard) or 'nothing'}; stems handed over: {', '.join(manifest['chosen']) or 'none'}"))
    rows = [("mixture", mixture[None], None)]
    for stem in manifest["chosen"]:
        truth = groups[taxonomy.GROUPS.index(stem if stem in taxonomy.GROUPS else "other")]
        rows.append((stem, load_audio(separated_dir / key / manifest["files"][stem], sample_rate), truth[None]))
    cells = "".join(f"<tr><td>{escape(name)}</td><td>{plots.player(wave, sample_rate)._repr_html_()}</td>"
                    f"<td>{'' if truth is None else plots.player(truth, sample_rate)._repr_html_()}</td></tr>"
                    for name, wave, truth in rows)
    display(HTML(f"<table><tr><th></th><th>separated</th><th>true group</th></tr>{cells}</table>"))
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 1.6 * len(rows)), squeeze=False)
    with torch.inference_mode():
        for (name, wave, truth), (left, right) in zip(rows, axes):
            plots.show_logmel(left, logmel(wave), hop_seconds, f"{name} (separated)" if truth is not None else name)
            if truth is None:
                right.axis("off")
            else:
                plots.show_logmel(right, logmel(truth), hop_seconds, f"{name} (true group)")
    fig.tight_layout()
    display(Image(filename=str(plots.save_fig(fig, params, f"08_listen_{key}"))))
    plt.close(fig)


tracks = widgets.Dropdown(options=list(examples["sample_key"]), description="piece")
view = widgets.Output()


def on_pick(change: dict) -> None:
    view.clear_output(wait=True)
    with view:
        show_track(change["new"])


tracks.observe(on_pick, names="value")
display(widgets.VBox([tracks, view]))

# %% [markdown]
# The first piece, drawn straight into the notebook so that an executed copy shows it too (a widget's
# output lives only in a running Jupyter); choose the others above.

# %%
show_track(tracks.value)

# %% [markdown]
# ## Licences and responsible use
#
# Separating copyrighted music is for **research and personal use only**: do not publish or
# redistribute separated stems of music you do not hold the rights to. This project redistributes
# nothing it separates. Stems are written only to your own output folder, and the course's examples
# separate pieces the project renders itself from General MIDI soundfonts.
#
# Demucs (code and released pretrained weights) is MIT-licensed (Meta Platforms, Alexandre Défossez).
# Its pretrained models were trained on MUSDB18-HQ, whose audio is licensed for non-commercial
# research, plus additional songs: check the terms of the weights you download before any use beyond
# research. fast_bss_eval, which computes the SDRs, is MIT-licensed; the mn04 weights are MIT
# (EfficientAT) and the AudioSet labels CC BY 4.0.
#
# ## The pretrained separator: HTDemucs
#
# HTDemucs (Défossez et al.) is a waveform and spectrogram U-Net with a transformer, trained on
# MUSDB18-HQ and 800 more songs: `htdemucs` gives drums, bass, other and vocals, and `htdemucs_6s`
# adds guitar and piano. demucs downloads its weights on first use; offline, put them in a folder and
# set `separation.demucs_repo`. The same separation and selection from the command line, for any file:
#
# ```bash
# .venv/bin/audiokd separate song.mp3 --out outputs/stems --separator demucs \
#     --model outputs/<profile>/models/detector-labels/model.pt --profile <profile>
# ```
#
# The cell below runs only where the profile chooses Demucs (`separation.separator: demucs`, the `full`
# profile): these machines cannot download the weights, so on quick and smoke it says so and skips.
# There it scores HTDemucs on the same pieces as the CRNN, with the same SDR and RTF.

# %%
if sp.separator == "demucs":
    demucs = load_demucs(sp.demucs_name, sp.demucs_repo)
    demucs_sdr = {split: quality.evaluate(rows, {sp.demucs_name: demucs}, cp.n_fft, cp.hop, sample_rate,
                                           sp.segment_seconds, sp.overlap) for split, rows in eval_sets.items()}
    display(pd.concat({split: scores.table() for split, scores in demucs_sdr.items()}, names=["split", "method"])
            .round(2))
else:
    print(f"profile {params.profile} uses separation.separator: {sp.separator}; Demucs is not loaded "
          "(its weights cannot be downloaded on this machine). Set separation.separator: demucs to run it.")
