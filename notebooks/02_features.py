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
# # 02 · Features: from audio files to log-mel spectrograms, and augmentation
#
# A MobileNet does not hear audio: it sees an image. This notebook builds that image, step by step:
#
# 1. **load** any file (wav, flac, ogg, mp3) as a float tensor;
# 2. **resample** to one rate and **downmix** to mono, so every clip looks alike;
# 3. cut or pad to a fixed length and compute a **log-mel spectrogram**;
# 4. **augment**: change what should not matter (level, noise, room, codec, masked bands, mixtures)
#    so the model learns what does (the instrument);
# 5. measure **normalisation statistics** on the training split only;
# 6. **time** the pipeline, because a data loader slower than the model wastes the machine.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from audiokd_lib import training
from audiokd_lib.audio import augment
from audiokd_lib.audio.features import (
    LogMel,
    NormStats,
    SkippedFiles,
    compute_norm_stats,
    frames_per_clip,
    iter_logmels,
)
from audiokd_lib.audio.loading import audio_backend, load_audio, load_clip, resample, save_audio
from audiokd_lib.core import plots
from audiokd_lib.core.params import GainNoiseParams, load_params
from audiokd_lib.data import tables

params = load_params(params_file)
torch.set_num_threads(params.threads)
fp = params.features
clips = tables.load_clip_table(params, "clips")
multilabel = training.is_multilabel(clips)  # OpenMIC: several instruments a clip
# For the pictures below, one caption a clip: its label, or everything a multi-label clip plays.
named = clips.assign(label=clips["labels"].replace("", "(none)")) if multilabel else clips
features_dir = params.output_dir / "features"
features_dir.mkdir(parents=True, exist_ok=True)
print(f"profile {params.profile}: {len(clips)} clips; decoding with {audio_backend()}")

# %% [markdown]
# ## Loading, resampling, channels
#
# `load_audio` decodes with torchaudio (FFmpeg, through torchcodec) when FFmpeg is installed and with
# soundfile otherwise; both give a `(channels, samples)` float tensor. To see resampling and
# downmixing at work we write one of our notes as a **stereo 48 kHz** file and read it back at the
# features' rate as mono.

# %%
example = clips[clips["split"] == "train"].iloc[0]
note = load_audio(example["path"], mono=False)
stereo_48k = resample(torch.cat([note, 0.5 * note]), params.data.sample_rate, 48000)
stereo_path = save_audio(features_dir / "example_stereo_48k.wav", stereo_48k, 48000)
loaded = load_audio(stereo_path, sample_rate=fp.sample_rate, mono=True)
print(f"{stereo_path.name}: {tuple(stereo_48k.shape)} at 48 kHz -> {tuple(loaded.shape)} at {fp.sample_rate} Hz")
assert loaded.shape[0] == 1 and abs(loaded.shape[1] - note.shape[1]) <= 2

# %% [markdown]
# ## Log-mel spectrograms
#
# A mel spectrogram pools the STFT's linear frequency bins into bands spaced like pitch perception
# (narrow at low frequencies, wide at high ones); the logarithm compresses the huge dynamic range of
# audio so quiet harmonics still count. Settings come from the profile's `features` section.

# %%
logmel = LogMel(fp)
hop_seconds = fp.hop_length / fp.sample_rate
labels = named.loc[named["split"] == "train", "label"].drop_duplicates().head(4)
fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3), sharey=True)
for ax, (index, label) in zip(np.atleast_1d(axes), labels.items()):
    wave = load_clip(clips.loc[index, "path"], fp.sample_rate, fp.clip_seconds)
    plots.show_logmel(ax, logmel(wave)[0], hop_seconds, label)
plots.save_fig(fig, params, "02_logmels")
plt.show()
print("log-mel of one clip:", tuple(logmel(wave).shape), "(batch, channel, mel bins, frames)")
assert logmel(wave).shape[-2:] == (fp.n_mels, frames_per_clip(fp))

# %% [markdown]
# ## Waveform augmentations
#
# Each one simulates something a real recording does to an instrument without changing which
# instrument it is: **gain** (level), **noise** (a noisy room or preamp), **reverb** (a room: a
# synthetic impulse response convolved with the clip), and **codec** degradation (MP3 or Opus at a low
# bitrate, through FFmpeg). Listen, and compare the spectrograms.

# %%
wave = load_clip(example["path"], fp.sample_rate, fp.clip_seconds)
rng = np.random.default_rng(params.seed)
fixed_gain_noise = GainNoiseParams(min_gain_db=-9, max_gain_db=-9, gain_p=1, min_snr_db=15, max_snr_db=15, noise_p=1)
variants = {
    "clean": wave,
    "gain -9 dB + noise 15 dB SNR": augment.gain_noise(wave, fp.sample_rate, fixed_gain_noise, rng),
    "reverb RT60 0.8 s": augment.add_reverb(wave, fp.sample_rate, 0.8, rng),
    "MP3 32 kb/s": augment.codec_roundtrip(wave, fp.sample_rate, "mp3", 32),
    "Opus 12 kb/s": augment.codec_roundtrip(wave, fp.sample_rate, "opus", 12),
}
fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 3), sharey=True)
for ax, (name, variant) in zip(axes, variants.items()):
    assert variant.shape == wave.shape and torch.isfinite(variant).all()
    plots.show_logmel(ax, logmel(variant)[0], hop_seconds, name)
plots.save_fig(fig, params, "02_waveform_augmentations")
plt.show()
for name, variant in variants.items():
    print(name)
    display(plots.player(variant, fp.sample_rate))

# %% [markdown]
# The whole waveform chain, with the profile's probabilities, is one object. Each call draws which
# augmentations to apply and how strongly, from its own seeded generator:

# %%
waveform_augment = augment.WaveformAugment(params.augment, fp.sample_rate, seed=params.seed)
for _ in range(3):
    waveform_augment(wave)
    print(waveform_augment.describe())

# %% [markdown]
# ## Spectrogram augmentations: SpecAugment and mixup
#
# **SpecAugment** hides random bands of frequency and time, so the model cannot lean on one harmonic
# or one instant. **Mixup** blends two clips and their labels. For single-label data the label is the
# same blend; for multi-label data (pieces where several instruments play) both instruments are
# audible in the mix, so the label is their union.

# %%
batch_paths = named[named["split"] == "train"].groupby("label").head(1).head(4)
batch = torch.cat([logmel(load_clip(p, fp.sample_rate, fp.clip_seconds)) for p in batch_paths["path"]])
generator = torch.Generator().manual_seed(params.seed)
spec = params.augment.specaugment
masked = augment.spec_augment(batch, spec.freq_mask, spec.time_mask, spec.n_masks, generator=generator)
classes = training.class_names(clips)
targets = torch.tensor([[float(c in names.split("|")) for c in classes] for names in batch_paths["label"]])
mixed, mixed_labels, lam = augment.mixup(batch, targets, params.augment.mixup.alpha, generator, multilabel=multilabel)

fig, axes = plt.subplots(2, len(batch), figsize=(3.6 * len(batch), 5.5), sharey=True)
for i in range(len(batch)):
    plots.show_logmel(axes[0, i], masked[i], hop_seconds, f"SpecAugment: {batch_paths['label'].iloc[i]}")
    top = mixed_labels[i].topk(2)
    plots.show_logmel(axes[1, i], mixed[i], hop_seconds,
                      "\n+ ".join(f"{classes[j]} {w:.2f}" for w, j in zip(top.values.tolist(), top.indices.tolist())))
fig.tight_layout()
plots.save_fig(fig, params, "02_specaugment_mixup")
plt.show()
assert multilabel or torch.allclose(mixed_labels.sum(dim=1), torch.ones(len(batch)))  # a blend still sums to 1

# %% [markdown]
# ### A room and a microphone, on the log-mels
#
# Training runs on cached log-mels, so the waveform reverb above would mean recomputing features at
# every step. Two cheap stand-ins act on the log-mels directly, as training options (`train.augment`:
# `reverb`, `eq`): a **room** convolves each mel band's power along time with an exponential decay of
# random RT60 (`augment.rir`), which is what a reverberant room does to a power spectrogram to a good
# approximation; an **equaliser** adds a random tilt and a few bell curves in dB over the mel bins
# (`augment.eq`), as another microphone or room colours the sound. The README's "Real recordings"
# section reports whether they help on real recordings (measured with `scripts/real_ablation.py`).

# %%
rng_mel = np.random.default_rng(params.seed)
one = batch[:1]
roomy = augment.mel_reverb(one, hop_seconds, 0.8, 0.8, rng_mel)
coloured = augment.mel_equalizer(one, params.augment.eq.max_db, params.augment.eq.bumps, rng_mel)
fig, axes = plt.subplots(1, 3, figsize=(12, 3), sharey=True)
for ax, (title, mel) in zip(axes, [("dry", one), ("room, RT60 0.8 s", roomy), ("random equaliser", coloured)]):
    plots.show_logmel(ax, mel[0], hop_seconds, title)
fig.tight_layout()
plots.save_fig(fig, params, "02_mel_room_eq")
plt.show()
assert torch.allclose(roomy.exp().sum(), one.exp().sum(), rtol=1e-3)  # the room moves energy in time, adds none

# %% [markdown]
# ## Normalisation statistics (training split only)
#
# Networks train best on inputs near zero mean and unit variance. We measure each mel bin's mean and
# standard deviation over the **training** clips only, save them with the fingerprints of the data and
# the front end, and reuse them while both are unchanged. An unreadable file is reported and skipped,
# never fatal to the whole run.

# %%
stats_path = features_dir / "norm_stats.json"
data_fingerprint, features_fingerprint = tables.fingerprint(clips), params.fingerprint("features")
try:
    stats = NormStats.load(stats_path, features_fingerprint, data_fingerprint)
    print(f"reusing {stats_path}")
except (FileNotFoundError, ValueError) as reason:
    print(f"computing statistics ({reason.__class__.__name__})")
    stats = compute_norm_stats(clips, fp, features_fingerprint, data_fingerprint)
    stats.save(stats_path)
print(f"{stats.clips} training clips, {len(stats.skipped)} skipped; "
      f"mean {stats.mean.mean():.2f}, std {stats.std.mean():.2f} (averaged over mel bins)")

fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(stats.mean, label="mean")
ax.fill_between(range(fp.n_mels), stats.mean - stats.std, stats.mean + stats.std, alpha=0.3, label="± std")
ax.set(xlabel="mel bin", ylabel="log power", title="Training-split log-mel statistics")
ax.legend()
plots.save_fig(fig, params, "02_norm_stats")
plt.show()
normalised = stats.normalise(batch)
print(f"normalised batch: mean {normalised.mean():.2f}, std {normalised.std():.2f}")

# %% [markdown]
# What happens to a file that cannot be read: it is named, counted and skipped.

# %%
broken = features_dir / "example_broken.wav"
broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
skipped = SkippedFiles()
read = [path for path, _ in iter_logmels([example["path"], broken], fp, skipped=skipped, progress=False)]
print(f"read {len(read)}, skipped {len(skipped)}:", *skipped.errors, sep="\n  ")
assert len(read) == 1 and len(skipped) == 1

# %% [markdown]
# ## How fast is the pipeline?
#
# Milliseconds per clip for each stage, on this machine's CPU with the profile's thread count. A
# training epoch decodes and transforms every clip, so these figures bound how fast the data can
# flow to a model (a worker process per core multiplies them).

# %%
def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, 1000 * (time.perf_counter() - started)


train = clips[clips["split"] == "train"]
rows = []
for path in train.sample(min(20, len(train)), random_state=params.seed)["path"]:
    wave, load_ms = timed(load_clip, path, fp.sample_rate, fp.clip_seconds)
    mel, mel_ms = timed(logmel, wave)
    rows.append({
        "decode + resample + mono": load_ms,
        "log-mel": mel_ms,
        "gain + noise": timed(augment.gain_noise, wave, fp.sample_rate, fixed_gain_noise, rng)[1],
        "reverb": timed(augment.add_reverb, wave, fp.sample_rate, 0.5, rng)[1],
        # FFmpeg pays for two process starts per clip; soundfile (libsndfile) encodes in-process.
        **{f"codec (MP3 32 kb/s, {engine})": timed(augment.codec_roundtrip, wave, fp.sample_rate, "mp3", 32, engine)[1]
           for engine in sorted({augment.codec_engine(), "soundfile"})},
        "SpecAugment": timed(augment.spec_augment, mel, spec.freq_mask, spec.time_mask, spec.n_masks)[1],
    })
timing_table = pd.DataFrame(rows).median().round(2).to_frame("median ms per clip")
timing_table.to_csv(features_dir / "pipeline_timing.csv")
timing_table
