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
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.beats import decode, stream, track
from audiokd_lib.beats import model as beatnet
from audiokd_lib.beats.model import BeatModel
from audiokd_lib.beats.pieces import render_beat_pieces
from audiokd_lib.core import plots
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables
from audiokd_lib.models.reuse import add_scores

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
# beside.
#
# ### The distillation loss, in code
#
# Each output is a yes/no question per frame (is there a beat here? a downbeat?), so the loss is a
# binary cross-entropy, as for notebook 05's multi-label clips. The distilled student answers to two
# targets: the labels, and the teacher's probabilities of the same frames, computed on the whole piece
# (what the future told the teacher). `alpha` (`beats.kd_alpha`) weighs the teacher. This is the function
# the training loop calls (`audiokd_lib/beats/model.py`; a test checks the two copies are the same code).

# %%
# lesson code: audiokd_lib.beats.model.distill_loss
def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
                 alpha: float) -> torch.Tensor:
    """Binary cross-entropy against the labels and, for a distilled student, against the teacher's
    probabilities of the same frames: (1 - alpha) x BCE(labels) + alpha x BCE(teacher). Hinton's
    distillation with one sigmoid per output (beat, downbeat) and frame, at temperature 1."""
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    if teacher is None:
        return loss
    return (1 - alpha) * loss + alpha * F.binary_cross_entropy_with_logits(logits, teacher)


# %% [markdown]
# Each model is one MLflow run (roles `beats-teacher` and `beats-student`). A run that already finished
# with the same settings (model, training settings, seed, the pieces, the teacher) is reused, not trained
# again; one that was interrupted resumes from its last epoch.

# %%
models, fits = {"teacher": teacher}, {}
fits["teacher"] = beatnet.fit_beats(params, "beats-teacher", teacher, sets, params_file=params_file)
for variant, distilled_from in (("labels", None), ("kd", teacher)):
    models[f"student-{variant}"] = beatnet.build(bp, "student", seed=params.seed)
    fits[f"student-{variant}"] = beatnet.fit_beats(params, f"beats-student-{variant}", models[f"student-{variant}"],
                                                   sets, teacher=distilled_from, params_file=params_file)
pd.DataFrame({name: {"params": sum(p.numel() for p in m.net.parameters()), "causal": m.causal,
                     "MACs per second": beatnet.macs_per_second(m), "best epoch": fits[name].best_epoch,
                     "epochs": len(fits[name].history), "training s": round(fits[name].history["seconds"].sum()),
                     "MLflow run": fits[name].run_id[:8] + (" (reused)" if fits[name].reused else "")}
              for name, m in models.items()}).T

# %% [markdown]
# ## 4 · From activations to beats, and how good they are
#
# Peak picking at each threshold of `beats.thresholds`, and the DBN (which needs no threshold) with
# the bar HMM for the downbeats. mir_eval scores every piece of `test` (unseen pieces), `heldout`
# (unseen pieces in an unseen soundfont) and, when downloaded, `real`, skipping the first 5 s as MIREX
# does. Each model's scores are kept beside the key of what made them (its weights, the pieces, the
# decoders' settings) and read back while that key is the same.

# %%
results = beatnet.score_trackers(params, models, sets)
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
dbn = decode.dbn_for(bp, fps)
fig, axes = plt.subplots(2, 1, figsize=(10, 4), sharex=True)
seconds = np.arange(len(piece.features)) / fps
for ax, name in zip(axes, ("teacher", "student-kd")):
    acts = beatnet.predict(models[name], [piece])[0]
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
# Each model's run (roles `beats-teacher` and `beats-student`) holds its learning curve, its parameters,
# MACs per second and weights since training; every score above (`heldout_dbn_F`,
# `heldout_peaks0.5_downbeat_F`, ...) is added to it now (a score it already holds is not written again).

# %%
scores = beatnet.run_scores(results)  # the scores of section 4, by MLflow name: heldout_dbn_F, ...
for name, fit in fits.items():
    added = add_scores(params, fit, scores[name])
    print(f"beats-{name}: MLflow run {fit.run_id[:8]}, {len(added)} scores added")

# %% [markdown]
# ## 6 · Real time
#
# The distilled student on a stream: one hop of audio (20 ms) in, one frame of features, one GRU
# step, and a beat out as soon as the activation rises through the threshold (no DBN: it needs the
# future to pick its path; an online tracker decides now).
#
# ### The streaming step, in code
#
# What runs every 20 ms, as the library has it (`audiokd_lib/beats/stream.py`, the step `BeatStream.push`
# takes for each hop). The stream keeps three things between hops: the last `n_fft` samples (the
# window that ends now), the previous frame's log mel (for the rise) and the GRU's hidden state.
# Carrying the state is what lets a recurrent network run forever on a stream at a constant cost a
# frame; a bidirectional teacher has no such step, since its backward half starts from the end.

# %%
# lesson code: audiokd_lib.beats.stream.stream_step
def stream_step(model: BeatModel, window: torch.Tensor, previous: torch.Tensor, state: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One hop of a live stream: the last n_fft samples, the previous frame's log mel and the GRU's state in;
    this frame's (beat, downbeat) probabilities, its log mel and the new state out.

    Nothing here waits for the future: one spectrum of the window that ends now, its rise over the
    previous frame, one GRU step from the carried state. The same numbers as the whole-file model's
    for this frame, because the front end and the student are causal."""
    features, mel = model.frontend.step(window, previous)
    logits, state = model.net.step(features[None], state)
    return torch.sigmoid(logits[0, 0]), mel, state


# %% [markdown]
# A whole piece through the stream, hop by hop: per-hop time on one thread, and the real-time factor
# (processing time over audio time). The streamed activations must equal the whole-file ones.

# %%
student = models["student-kd"]
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
# ONNX Runtime on one thread. Exported again only when the student changed.

# %%
onnx_path = params.output_dir / "models" / "beats-student-kd" / "step.onnx"
parity = stream.export_checked_step(student, onnx_path, piece)
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
