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
# # 09 · Real-time beat and downbeat tracking: a causal student distilled from a larger tracker
#
# The course's lesson, applied to another music system. Offline beat trackers (madmom's, the
# All-In-One model's) read a whole recording, the past *and the future* of every frame, with large
# bidirectional networks, then decode beats with a dynamic Bayesian network. A tracker that drives
# lights, a looper or a drum machine on stage has neither: it hears the past only, and must answer
# within a few milliseconds on a small board. This notebook builds both:
#
# 1. **data with exact beats**: procedural pieces in 3/4, 4/4 and 6/8, at 60-180 BPM, some drifting
#    in tempo, with or without drums, rendered with the training soundfonts (train, val, test) and
#    with the held-out soundfont (`heldout`: unseen timbres, the unseen test set);
# 2. a **non-causal teacher** (a two-layer bidirectional GRU) and a **causal student** (one small
#    unidirectional GRU), trained on labels alone, and the same student **distilled** from the
#    teacher's activations;
# 3. **post-processing**: peak picking at a sweep of thresholds, and a DBN (Viterbi over beat period
#    and phase) followed by a bar HMM for the downbeats;
# 4. **evaluation with mir_eval**: beat F-measure, CMLt, AMLt, downbeat F-measure, logged to MLflow;
# 5. **real time, measured**: the student on a stream, hop by hop, with per-hop latency, the
#    real-time factor, and an ONNX export of its step checked against PyTorch;
# 6. **listening**: a piece with clicks on the beats the student found.
#
# The command line does the same for any audio file: `audiokd beats FILE... --out DIR [--clicks]`.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.beats import decode, stream, track
from audiokd_lib.beats import model as beatnet
from audiokd_lib.beats.pieces import render_beat_pieces
from audiokd_lib.core import plots
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables

params = load_params(params_file)
bp = params.beats
torch.set_num_threads(params.threads)

# %% [markdown]
# ## 1 · Pieces with exact beats
#
# The score is the annotation: every beat time is known to the sample, and `beats.csv` beside each
# mixture lists them with their position in the bar (1: the downbeat). The players are placed a few
# milliseconds off the grid, as real ones are.

# %%
plan = tables.plan_soundfonts(params.data)
pieces = render_beat_pieces(tables.data_dir(params) / "beats", plan, bp.pieces, seed=params.seed,
                            backend=params.data.synth)
display(pieces.groupby(["split", "metre"]).size().unstack(fill_value=0))
display(pieces.groupby("split")[["tempo", "drift", "drums"]].agg(["min", "mean", "max"]).round(2))

# %% [markdown]
# ## 2 · Features: a causal spectrogram
#
# 50 frames a second (a 20 ms hop). Each frame is the log mel spectrum of the `n_fft` samples that end
# at that hop, plus its rise over the previous frame (the spectral flux, where onsets show). No frame
# reads a sample after its own hop, so streaming gives the same frames as reading the whole file.

# %%
teacher = beatnet.build(bp, "teacher", seed=params.seed)
fps = teacher.frontend.fps
sets = {split: beatnet.load_pieces(pieces[pieces["split"] == split], teacher.frontend)
        for split in ("train", "val", "test", "heldout") if (pieces["split"] == split).any()}
print({split: len(s) for split, s in sets.items()}, f"pieces; {fps:g} frames a second")

# %% [markdown]
# ### Real recordings, for testing only
#
# With `beats.real_dataset: candombe` (the full profile), `beats.real_recordings` performances of the
# Candombe dataset (Afro-Uruguayan drumming, studio recordings, every beat and downbeat annotated by
# an expert; Zenodo, CC BY 4.0) are downloaded under `data.downloads`' rules (budget, cache, mirror)
# and scored like the test splits, as `real`. No model trains or is selected on them.

# %%
if bp.real_dataset == "candombe":
    from audiokd_lib.data.candombe import download_candombe, load_candombe
    from audiokd_lib.data.sources import Downloads

    downloads = Downloads.from_params(params.data.downloads)
    download_candombe(downloads, bp.real_recordings)
    sets["real"] = beatnet.load_pieces(load_candombe(downloads.folder("candombe")), teacher.frontend)
    print(f"real: {len(sets['real'])} Candombe performances, "
          f"{sum(len(p.features) for p in sets['real']) / fps / 60:.1f} minutes")

# %% [markdown]
# ## 3 · The teacher (non-causal) and the students (causal)
#
# Same front end, same outputs (a beat and a downbeat probability per frame). The teacher's GRU is
# bidirectional and two layers deep; the student's is one small layer that reads forward only. Both
# learn from random 4 s excerpts, against targets one frame wide and half as strong on the frames
# beside. The distilled student is trained on `(1 - kd_alpha) x labels + kd_alpha x teacher`, where
# the teacher's activations were computed on the whole piece.

# %%
beatnet.set_normalisation(teacher, sets["train"])
started = time.perf_counter()
teacher_fit = beatnet.train_beats(teacher, sets["train"], sets["val"], bp, params.seed)
print(f"teacher: best epoch {teacher_fit.best_epoch}, {time.perf_counter() - started:.0f} s")
teacher_acts = dict(zip([p.key for p in sets["train"]], beatnet.predict(teacher, sets["train"])))

students = {}
for variant, soft in (("labels", None), ("kd", teacher_acts)):
    student = beatnet.build(bp, "student", seed=params.seed)
    beatnet.set_normalisation(student, sets["train"])
    started = time.perf_counter()
    fit = beatnet.train_beats(student, sets["train"], sets["val"], bp, params.seed, teacher_acts=soft)
    print(f"student ({variant}): best epoch {fit.best_epoch}, {time.perf_counter() - started:.0f} s")
    students[variant] = (student, fit)
models = {"teacher": (teacher, teacher_fit), "student-labels": students["labels"], "student-kd": students["kd"]}
pd.DataFrame({name: {"params": sum(p.numel() for p in m.net.parameters()), "causal": m.causal,
                     "MACs per second": beatnet.macs_per_second(m)} for name, (m, _) in models.items()}).T

# %% [markdown]
# ## 4 · From activations to beats, and how good they are
#
# Peak picking at each threshold of `beats.thresholds`, and the DBN (which needs no threshold) with
# the bar HMM for the downbeats. mir_eval scores every piece of `test` (unseen pieces), `heldout`
# (unseen pieces in an unseen soundfont) and, when downloaded, `real`, skipping the first 5 s as MIREX
# does.

# %%
dbn = decode.dbn_for(bp, fps)
rows, scores = [], {name: {} for name in models}
for name, (model, _) in models.items():
    for split in ("test", "heldout", "real"):
        if split not in sets:
            continue
        data = sets[split]
        acts = beatnet.predict(model, data)
        truth, truth_down = [p.beats for p in data], [p.downbeats for p in data]
        for threshold in bp.thresholds:
            found = decode.evaluate([decode.pick_peaks(a[:, 0], threshold, fps) for a in acts], truth,
                                    [decode.pick_peaks(a[:, 1], threshold, fps) for a in acts], truth_down)
            rows.append({"model": name, "split": split, "decoder": f"peaks {threshold:g}", **found})
            scores[name].update({f"{split}_peaks{threshold:g}_{k.replace(' ', '_')}": v for k, v in found.items()})
        found = decode.evaluate_dbn(acts, truth, truth_down, dbn, bp.bar_lengths)
        rows.append({"model": name, "split": split, "decoder": "DBN", **found})
        scores[name].update({f"{split}_dbn_{k.replace(' ', '_')}": v for k, v in found.items()})
results = pd.DataFrame(rows)
display(results.pivot_table(index=["model", "decoder"], columns="split", values=["F", "downbeat F"],
                            sort=False).round(3))
display(results[results["decoder"] == "DBN"].set_index(["model", "split"]).round(3))

# %% [markdown]
# How to read it. Peak picking depends on its threshold, and each output wants a different one; the
# DBN needs none, and where a peak is missed or doubled it keeps the beat going. On these rendered
# pieces the *beat* is easy for every model once the DBN decodes it. The *downbeat* is where having no
# future costs: the teacher hears the next bar line, the causal student must count the beats since
# the last one and keep count through a missed beat.
#
# And distillation? It gives the student the teacher's activations as extra targets. But the
# teacher's confidence about a downbeat comes partly from what follows it, which the student never
# sees; on the quick profile's run it did not raise the student's downbeat F (the line below says by
# how much, on one seed). The lesson of notebook 05 (a teacher's soft labels help a small student)
# holds when the student can in principle compute what the teacher knows.

# %%
dbn_table = results[results["decoder"] == "DBN"].set_index(["model", "split"])
split = "heldout" if "heldout" in sets else "test"
best = dbn_table.loc["student-kd", split]
teacher_row = dbn_table.loc["teacher", split]
display(Markdown(
    f"**Targets ({split}, DBN):** distilled causal student beat F {best['F']:.3f} (target at least 0.85: "
    f"{'met' if best['F'] >= 0.85 else 'not met'}), downbeat F {best['downbeat F']:.3f} (target at least 0.6: "
    f"{'met' if best['downbeat F'] >= 0.6 else 'not met'}), {100 * (best['F'] - teacher_row['F']):+.1f} beat-F points "
    f"against the teacher's {teacher_row['F']:.3f} (target no more than 5 below: "
    f"{'met' if teacher_row['F'] - best['F'] <= 0.05 else 'not met'}). Distillation against labels alone: "
    f"{100 * (best['F'] - dbn_table.loc['student-labels', split]['F']):+.1f} beat-F points, "
    f"{100 * (best['downbeat F'] - dbn_table.loc['student-labels', split]['downbeat F']):+.1f} downbeat-F points."))

# %% [markdown]
# ### What the networks hear
#
# One held-out piece: the activations of the teacher and the distilled student, the true beats
# (grey) and downbeats (black), and the beats the DBN found from the student's (red ticks).

# %%
piece = sets[split][0]
fig, axes = plt.subplots(2, 1, figsize=(10, 4), sharex=True)
seconds = np.arange(len(piece.features)) / fps
for ax, name in zip(axes, ("teacher", "student-kd")):
    acts = beatnet.predict(models[name][0], [piece])[0]
    ax.plot(seconds, acts[:, 0], label="beat", lw=1)
    ax.plot(seconds, acts[:, 1], label="downbeat", lw=1)
    ax.vlines(piece.beats, 0, 1, color="0.7", lw=0.8)
    ax.vlines(piece.downbeats, 0, 1, color="k", lw=1.2)
    if name == "student-kd":
        found = decode.track(acts, dbn, bp.bar_lengths)[0]
        ax.plot(found, np.full(len(found), 1.05), "|", color="red", ms=8, label="DBN beats")
    ax.set(ylabel=name, ylim=(0, 1.12))
axes[0].legend(loc="upper right", fontsize=8, ncol=2)
axes[1].set(xlabel="seconds", xlim=(0, 8))
fig.suptitle(f"{piece.key}: {pieces.set_index('sample_key').loc[piece.key, 'metre']}, "
             f"{pieces.set_index('sample_key').loc[piece.key, 'tempo']:.0f} BPM")
fig.tight_layout()
plots.save_fig(fig, params, "09_activations")
plt.show()

# %% [markdown]
# ## 5 · MLflow
#
# Each model is a run (roles `beats-teacher` and `beats-student`), with its learning curve, every
# score above (`heldout_dbn_F`, `heldout_peaks0.5_downbeat_F`, ...), its parameters and MACs per
# second, and its weights.

# %%
roles = {"teacher": "beats-teacher", "student-labels": "beats-student", "student-kd": "beats-student"}
for name, (model, fit) in models.items():
    run_id = beatnet.log_run(params, roles[name], f"beats-{name}", model, fit, scores[name], params_file)
    print(f"beats-{name}: MLflow run {run_id[:8]}")

# %% [markdown]
# ## 6 · Real time
#
# The distilled student on a stream: one hop of audio (20 ms) in, one frame of features, one GRU
# step, and a beat out as soon as the activation rises through the threshold (no DBN: it needs the
# future to pick its path; an online tracker decides now). Per-hop time on one thread, and the
# real-time factor (processing time over audio time). The streamed activations must equal the
# whole-file ones: the front end and the student are causal.

# %%
student = models["student-kd"][0]
row = pieces[pieces["sample_key"] == piece.key].iloc[0]
wave = load_audio(row["path"], bp.pieces.sample_rate)[0]
streamed, events, took = stream.stream_file(student, wave)
whole = student.activations(wave)
print(f"streamed vs whole file: largest difference {np.abs(streamed[:len(whole)] - whole).max():.1e}")
hop_ms = 1000 * bp.hop / bp.pieces.sample_rate
print(f"{len(took)} hops of {hop_ms:.0f} ms: median {1000 * np.median(took):.3f} ms, "
      f"99th percentile {1000 * np.percentile(took, 99):.3f} ms a hop (target under 5 ms); "
      f"real-time factor {took.sum() / (len(wave) / bp.pieces.sample_rate):.4f}")
online = np.array([t for t, _ in events])
print(f"online beats: {len(online)}; mir_eval F against the truth: "
      f"{decode.evaluate([online], [piece.beats])['F']:.3f} (the DBN on the whole file: "
      f"{decode.evaluate([decode.track(whole, dbn)[0]], [piece.beats])['F']:.3f})")

# %% [markdown]
# ### The step as ONNX
#
# For an embedded board: the step (normalise, project, GRU cell, outputs) with the GRU state as input
# and output, opset 17, checked against PyTorch over a whole piece, step by step, and timed with
# ONNX Runtime on one thread.

# %%
onnx_path = stream.export_step(student, params.output_dir / "models" / "beats-student-kd" / "step.onnx")
parity = stream.check_step(student, onnx_path, piece.features)
print(f"{onnx_path.name}: largest difference {parity['max_abs_diff']:.1e}, MSE {parity['mse']:.1e}; "
      f"a step takes {parity['pytorch_ms']:.3f} ms in PyTorch, {parity['onnxruntime_ms']:.3f} ms in ONNX Runtime")

# %% [markdown]
# ## 7 · Listening
#
# The piece with a click on every beat the streaming student emitted (a higher click on downbeats).

# %%
downs = np.array([t for t, kind in events if kind == "downbeat"])
clicks = track.click_track(online, downs, len(wave), bp.pieces.sample_rate)
display(plots.player((0.8 * wave.numpy() + clicks)[None], bp.pieces.sample_rate))

# %% [markdown]
# The same from the command line, for any recording (the DBN on the whole file, then CSV and clicks):
#
# ```bash
# audiokd beats song.mp3 --out beats/ --clicks          # beats/song.beats.csv, beats/song.clicks.wav
# ```
