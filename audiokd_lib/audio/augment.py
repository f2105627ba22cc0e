"""Augmentations: what a deployed classifier meets that says nothing about the instrument.

On waveforms, one (channels, samples) clip at a time, before the log-mel (notebook 02 shows and times them):

- `gain_noise`: a random gain and Gaussian noise at a random SNR (audiomentations)
- `add_reverb`, `synthetic_rir`: a synthetic room impulse response of a given RT60, convolved
- `codec_roundtrip`: an MP3 or Opus encode and decode, through FFmpeg or libsndfile (`codec_engine`)
- `WaveformAugment`: those three with the profile's probabilities, in the order of a recording's signal path

On batches of log-mels (the training loop's `FeatureAugment` calls them):

- `spec_augment`: random masked mel bands and frame spans
- `mixup`: weighted sums of two examples; their labels blended alike, or joined for multi-label data

Randomness comes only from the generator passed in (`np.random.Generator` or `torch.Generator`), so
every augmented view can be rebuilt from a seed. Teacher logits cached for a clean clip are not the
teacher's answer for an augmented view of it (Beyer et al., 2022); the profile's `kd.modes` chooses.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from audiomentations import AddGaussianSNR, Compose, Gain
from scipy.fft import next_fast_len  # scipy comes with audiomentations

from audiokd_lib.core.params import AugmentParams, GainNoiseParams

AnyGenerator = np.random.Generator | torch.Generator


Codec = Literal["mp3", "opus"]


# LAME's encoder delay (576) plus the MP3 decoder's (529), in samples: what a decoder outputs before
# the first real sample when the file carries no gapless (LAME/Info) tag to tell it to skip them.
_LAME_DELAY = 1105


# Range of the direct-to-reverberant energy ratio drawn for each synthetic room: +6 dB is a close
# microphone, -3 dB one far enough back that the room is as loud as the instrument.
_DRR_DB = (-3.0, 6.0)


def _draw_seed(generator: AnyGenerator) -> int:
    """Draw a 32-bit seed from a NumPy or torch generator."""
    if isinstance(generator, torch.Generator):
        return int(torch.randint(2**32, (1,), generator=generator))
    return int(generator.integers(2**32))


def _rms(wave: torch.Tensor) -> float:
    """Return the root mean square over all channels and samples."""
    return float(wave.pow(2).mean().sqrt())


def _peak_safe(wave: torch.Tensor) -> torch.Tensor:
    """Scale the wave down to a peak of 1 if it goes beyond; leave it untouched otherwise."""
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    return wave / peak if peak > 1.0 else wave


@contextlib.contextmanager
def _torch_seeded(generator: AnyGenerator | None) -> Iterator[None]:
    """Run the block on torch's global CPU RNG seeded from `generator`, then restore it."""
    if generator is None:
        yield
        return
    # torchaudio's masking draws from the global RNG and takes no generator: fork it, seed the
    # fork from ours, and the caller's global stream is left exactly as it was.
    seed = _draw_seed(generator)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def spec_augment(
    mel: torch.Tensor,
    freq_mask: int,
    time_mask: int,
    n_masks: int,
    generator: AnyGenerator | None = None,
) -> torch.Tensor:
    """Mask `n_masks` random mel bands and frame spans in each example independently.

    `mel` is (batch, 1, n_mels, frames) or (batch, n_mels, frames); each mask is up to `freq_mask`
    bins or `time_mask` frames wide. Masked cells take the mean of their own example, not 0: a
    log-mel in dB has no natural zero (0 dB would be a loud cell), whereas the mean is a neutral
    value whether or not the input has been normalised (for normalised input it is close to 0).
    Returns a new tensor; the input is not modified.
    """
    with _torch_seeded(generator):
        # Masks are drawn on the CPU so that a seeded generator gives the same masks on any device.
        keep = torch.ones(mel.shape)
        for _ in range(n_masks):
            keep = AF.mask_along_axis_iid(keep, freq_mask, 0.0, axis=keep.dim() - 2)
            keep = AF.mask_along_axis_iid(keep, time_mask, 0.0, axis=keep.dim() - 1)
    fill = mel.mean(dim=tuple(range(1, mel.dim())), keepdim=True)
    return torch.where(keep.to(mel.device).bool(), mel, fill)


def mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    generator: AnyGenerator,
    multilabel: bool = False,
    *,
    label_mode: Literal["union", "interpolate"] | None = None,
    num_classes: int | None = None,
    p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each example with a random partner from the batch; return (x_mixed, y_mixed, lam).

    Each example i gets its own weight lam_i ~ Beta(alpha, alpha) (a per-example weight gives every
    batch a spread of mixing strengths instead of one draw for all) and the partner perm[i] from a
    random permutation of the batch: x_i <- lam_i * x_i + (1 - lam_i) * x_perm[i]. With
    probability 1 - `p` an example is left unmixed (lam_i = 1). `lam` has shape (batch,).

    `generator` is a NumPy or torch generator. Labels: `y` is one-hot, soft, or multi-hot
    (batch, classes), or integer class indices (batch,) with `num_classes`.

    - Single-label ("interpolate", the default): y_i <- lam_i * y_i + (1 - lam_i) * y_perm[i], a
      distribution over classes that still sums to 1.
    - Multi-label ("union", the default when `multilabel`): both sources are audible in the mix,
      so both sets of instruments are present: y_i <- max(y_i, y_perm[i]). "interpolate" (as in
      PANNs and AST) is available too; it treats a partner at weight 0.1 as 10% present, whereas
      union calls it fully present even when it is barely audible.

    Mixing waveforms (before the log-mel) is what a real mixture is; mixing log-mels is cheaper and
    common, but a weighted sum of logs is not the log of a sum. To mix other per-example targets
    the same way (cached teacher probabilities, for distillation), concatenate them to `y` along
    the class axis and split the result.
    """
    # One NumPy stream for every draw: torch's Beta sampler takes no generator.
    rng = (
        generator
        if isinstance(generator, np.random.Generator)
        else np.random.default_rng(_draw_seed(generator))
    )
    mode = label_mode or ("union" if multilabel else "interpolate")
    if mode == "union" and not multilabel:
        raise ValueError(
            "label_mode='union' is for multi-label targets; single-label targets must sum to 1"
        )
    if not torch.is_floating_point(y):
        if num_classes is None:
            raise ValueError("integer class labels need num_classes to be turned into one-hot rows")
        y = torch.nn.functional.one_hot(y.long(), num_classes).float()

    batch = x.shape[0]
    lam_np = np.where(rng.random(batch) < p, rng.beta(alpha, alpha, size=batch), 1.0)
    perm = torch.from_numpy(rng.permutation(batch)).to(x.device)
    lam = torch.as_tensor(lam_np, dtype=x.dtype, device=x.device)

    lam_x = lam.view(-1, *([1] * (x.dim() - 1)))
    x_mixed = lam_x * x + (1 - lam_x) * x[perm]
    lam_y = lam.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    if mode == "union":
        # An unmixed example (lam = 1) must not inherit its partner's labels. With unknown answers (NaN,
        # OpenMIC) a class is present if either source surely has it, unknown if either source's answer is.
        either = torch.maximum(y, y[perm])  # NaN when either answer is unknown
        known_max = torch.fmax(y, y[perm])  # the larger known answer
        union = torch.where(known_max >= 1, known_max, either)
        y_mixed = torch.where(lam_y < 1, union, y)
    else:
        y_mixed = lam_y * y + (1 - lam_y) * y[perm]
    return x_mixed, y_mixed, lam


@contextlib.contextmanager
def _global_rngs_seeded(seed: int) -> Iterator[None]:
    """Seed Python's and NumPy's global RNGs for the block, then restore their previous state."""
    # audiomentations draws from the global `random` and `np.random` modules and takes no
    # generator; seeding them from ours makes its choices reproducible without disturbing anyone
    # else's random stream.
    saved_py, saved_np = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved_py)
        np.random.set_state(saved_np)


def gain_noise_transform(params: GainNoiseParams) -> Compose:
    """Build the audiomentations chain: a random gain, then Gaussian noise at a random SNR."""
    return Compose([
        Gain(min_gain_db=params.min_gain_db, max_gain_db=params.max_gain_db, p=params.gain_p),
        AddGaussianSNR(
            min_snr_db=params.min_snr_db, max_snr_db=params.max_snr_db, p=params.noise_p
        ),
    ])


def apply_audiomentations(
    transform: Callable[..., np.ndarray], wave: torch.Tensor, sample_rate: int, rng: AnyGenerator
) -> torch.Tensor:
    """Run an audiomentations transform on a (channels, samples) tensor, seeded from `rng`."""
    # A copy, so that the result never shares memory with the caller's tensor.
    samples = wave.detach().cpu().numpy().astype(np.float32, copy=True)
    with _global_rngs_seeded(_draw_seed(rng)):
        out = transform(samples=samples, sample_rate=sample_rate)
    return torch.from_numpy(np.ascontiguousarray(out)).to(wave.device)


def gain_noise(
    wave: torch.Tensor, sample_rate: int, params: GainNoiseParams, rng: AnyGenerator
) -> torch.Tensor:
    """Apply a random gain and Gaussian noise, each with its probability from `params`."""
    return apply_audiomentations(gain_noise_transform(params), wave, sample_rate, rng)


def _lowpass_noise(
    n: int, sample_rate: int, cutoff_hz: float, rng: np.random.Generator
) -> np.ndarray:
    """Return unit-variance Gaussian noise shaped by a first-order low-pass response."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    noise = np.fft.irfft(spectrum / np.sqrt(1 + (freqs / cutoff_hz) ** 2), n)
    return noise / max(noise.std(), 1e-12)


def synthetic_rir(
    sample_rate: int,
    rt60: float,
    rng: np.random.Generator,
    seconds: float | None = None,
    air_absorption: bool = True,
) -> torch.Tensor:
    """Make a synthetic room impulse response with the given RT60, shaped (1, samples), unit energy.

    Direct sound at sample 0 (so reverb does not delay the clip), 3-8 sparse early reflections in
    the first 40 ms, then Gaussian noise under the envelope exp(-6.9 t / rt60) (6.9 = ln(1000):
    amplitude down 60 dB at t = rt60). With `air_absorption` the tail fades from white noise into
    low-passed noise over the first rt60 seconds, because walls and air absorb high frequencies
    faster; the fade keeps the tail's power, so the broadband RT60 is unchanged. The length
    defaults to 1.5 * rt60, where the tail is 90 dB down.
    """
    n = max(int(round((seconds if seconds is not None else 1.5 * rt60) * sample_rate)), 1)
    t = np.arange(n) / sample_rate
    envelope = np.exp(-6.9 * t / rt60)

    tail = rng.standard_normal(n)
    if air_absorption:
        dark = _lowpass_noise(n, sample_rate, cutoff_hz=2000.0, rng=rng)
        # cos/sin weights of two independent unit-power noises keep the sum at unit power.
        theta = 0.5 * np.pi * np.minimum(t / rt60, 1.0)
        tail = np.cos(theta) * tail + np.sin(theta) * dark

    # The diffuse tail starts once the first reflection has arrived.
    delays = np.sort(rng.uniform(0.001, 0.040, size=rng.integers(3, 9)))
    delay_idx = np.minimum((delays * sample_rate).astype(int), n - 1)
    tail[: delay_idx[0]] = 0.0
    tail *= envelope

    drr_db = rng.uniform(*_DRR_DB)
    tail *= math.sqrt(10 ** (-drr_db / 10) / max(float(np.sum(tail**2)), 1e-12))
    reflections = np.zeros(n)
    signs = rng.choice([-1.0, 1.0], size=len(delay_idx))
    gains = signs * rng.uniform(0.2, 0.6, size=len(delay_idx)) * envelope[delay_idx]
    np.add.at(reflections, delay_idx, gains)  # add.at: two reflections may share a sample

    ir = tail + reflections
    ir[0] = 1.0  # the direct path
    ir /= np.sqrt(np.sum(ir**2))
    return torch.from_numpy(ir.astype(np.float32)).unsqueeze(0)


def mel_equalizer(logmel: torch.Tensor, max_db: float, bumps: int, rng: np.random.Generator,
                  p: float = 1.0) -> torch.Tensor:
    """A random equaliser on log-mel power (batch, 1, bins, frames): what another microphone or room colours.

    Each chosen example gets a spectral tilt and `bumps` bell-shaped boosts or cuts over the mel bins,
    every gain within +-max_db dB; a filter is a product in power, so a sum in the log domain. `p`:
    share of the batch that is equalised.
    """
    batch, _, bins, _ = logmel.shape
    position = np.linspace(0.0, 1.0, bins)
    curves = np.zeros((batch, bins))
    for i in np.flatnonzero(rng.random(batch) < p):
        curve = rng.uniform(-max_db, max_db) * (position - 0.5)  # tilt: +-max_db/2 at the ends
        for _ in range(bumps):
            centre, width = rng.uniform(0.0, 1.0), rng.uniform(0.03, 0.2)
            curve += rng.uniform(-max_db, max_db) * np.exp(-0.5 * ((position - centre) / width) ** 2)
        curves[i] = np.clip(curve, -max_db, max_db)
    shift = torch.from_numpy(curves * math.log(10) / 10).to(logmel).view(batch, 1, bins, 1)
    return logmel + shift


def mel_reverb(logmel: torch.Tensor, frame_seconds: float, min_rt60: float, max_rt60: float,
               rng: np.random.Generator, p: float = 1.0) -> torch.Tensor:
    """Reverberation on log-mel power (batch, 1, bins, frames), without going back to the waveform.

    Power spectrograms of a reverberant room are, to a good approximation, the dry power convolved
    along time with the room's energy decay, exp(-13.8 t / RT60) (60 dB of power in RT60 seconds).
    The direct-to-reverberant ratio is drawn as for :func:`synthetic_rir`. The tail that would ring
    past the end of the clip is cut, and each example keeps its total power.
    """
    batch, _, bins, frames = logmel.shape
    chosen = np.flatnonzero(rng.random(batch) < p)
    if not len(chosen):
        return logmel
    power = logmel.exp()
    out = power.clone()
    for i in chosen:
        rt60 = rng.uniform(min_rt60, max_rt60)
        taps = max(2, min(frames, int(round(1.5 * rt60 / frame_seconds))))
        decay = torch.exp(-13.8 * torch.arange(1, taps, dtype=power.dtype) * frame_seconds / rt60)
        decay = decay * 10 ** (-rng.uniform(*_DRR_DB) / 10) / decay.sum()  # reverberant energy against direct 1
        kernel = torch.cat([torch.ones(1, dtype=power.dtype), decay]).flip(0).view(1, 1, -1)
        wet = F.conv1d(F.pad(power[i].reshape(bins, 1, frames), (taps - 1, 0)), kernel).view(1, bins, frames)
        out[i] = wet * (power[i].sum() / wet.sum().clamp_min(1e-12))
    return out.clamp_min(1e-12).log()


def add_reverb(
    wave: torch.Tensor, sample_rate: int, rt60: float, rng: np.random.Generator
) -> torch.Tensor:
    """Convolve with a fresh synthetic RIR; keep the length, the RMS, and peaks within [-1, 1]."""
    ir = synthetic_rir(sample_rate, rt60, rng).to(wave)
    n = wave.shape[-1]
    # fftconvolve transforms at exactly len(wave) + len(ir) - 1, often a length with large prime
    # factors; trailing zeros that round it up to a fast FFT length change no output sample we
    # keep and make it ~5x faster.
    padding = next_fast_len(n + ir.shape[-1] - 1, real=True) - (n + ir.shape[-1] - 1)
    # The tail that would ring past the end of the clip is cut, as when a recording stops.
    wet = AF.fftconvolve(torch.nn.functional.pad(wave, (0, padding)), ir)[..., :n]
    # A unit-energy IR keeps the power of white noise only; tones can grow or shrink, so match RMS.
    wet = wet * (_rms(wave) / max(_rms(wet), 1e-12))
    return _peak_safe(wet)


def codec_engine() -> Literal["ffmpeg", "soundfile"]:
    """Name the engine `codec_roundtrip` will use: the ffmpeg binary, else libsndfile."""
    if shutil.which("ffmpeg"):
        return "ffmpeg"
    if "MP3" in sf.available_formats() and "OPUS" in sf.available_subtypes("OGG"):
        return "soundfile"
    raise RuntimeError(
        "codec augmentation needs FFmpeg (`apt-get install ffmpeg`) or a libsndfile with MP3 and "
        "Ogg/Opus support; without either, set `augment.codec.p: 0` in the profile"
    )


def _run_ffmpeg(args: list[str], stdin: bytes | None = None) -> bytes:
    """Run the ffmpeg binary quietly; return its stdout or raise with its error message."""
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    result = subprocess.run(command, input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace")
        raise RuntimeError(f"ffmpeg failed ({' '.join(command)}): {message}")
    return result.stdout


def _ffmpeg_roundtrip(wave: np.ndarray, sample_rate: int, codec: Codec, kbps: int) -> np.ndarray:
    """Encode and decode (channels, samples) float32 audio with the ffmpeg binary."""
    channels = wave.shape[0]
    raw = ["-f", "f32le", "-ar", str(sample_rate), "-ac", str(channels)]
    if codec == "mp3":
        encoder, suffix = ["-c:a", "libmp3lame", "-b:a", f"{kbps}k"], ".mp3"
    else:
        # Opus only runs at 8/12/16/24/48 kHz: resample to 48 kHz here, back on decoding.
        encoder, suffix = ["-c:a", "libopus", "-b:a", f"{kbps}k", "-ar", "48000"], ".opus"
    # A real (seekable) file, not a pipe: only then can the muxer go back and write the LAME/Info
    # header carrying the encoder delay and padding, which the decoder uses to trim them exactly.
    with tempfile.TemporaryDirectory() as folder:
        encoded = str(Path(folder) / f"clip{suffix}")
        _run_ffmpeg([*raw, "-i", "pipe:0", *encoder, encoded], stdin=wave.T.tobytes())
        decoded = _run_ffmpeg(["-i", encoded, *raw, "pipe:1"])
    return np.frombuffer(decoded, dtype=np.float32).reshape(-1, channels).T


def _soundfile_roundtrip(wave: np.ndarray, sample_rate: int, codec: Codec, kbps: int) -> np.ndarray:
    """Encode and decode (channels, samples) float32 audio in memory with libsndfile."""
    channels = wave.shape[0]
    buffer = BytesIO()
    if codec == "mp3":
        # libsndfile maps compression_level linearly onto the CBR bitrates LAME allows at this rate.
        if sample_rate >= 32000:
            low, high = 32, 320  # MPEG-1
        elif sample_rate >= 16000:
            low, high = 8, 160  # MPEG-2
        else:
            low, high = 8, 64  # MPEG-2.5
        # It rejects exactly 1.0; 0.995 still gives the lowest bitrate.
        level = min((high - min(max(kbps, low), high)) / (high - low), 0.995)
        sf.write(buffer, wave.T, sample_rate, format="MP3", subtype="MPEG_LAYER_III",
                 compression_level=level, bitrate_mode="CONSTANT")
        buffer.seek(0)
        decoded, _ = sf.read(buffer, dtype="float32", always_2d=True)
        return decoded.T
    # libsndfile's Opus takes only 8/12/16/24/48 kHz and has no resampler; bitrate per channel is
    # 6 + 250 * (1 - compression_level) kbps.
    at_48k = AF.resample(torch.from_numpy(wave), sample_rate, 48000).numpy()
    # libsndfile does not flush the encoder's look-ahead: the last ~6 ms come back garbled. One
    # 20 ms frame of trailing silence takes the damage; codec_roundtrip cuts it off again.
    at_48k = np.pad(at_48k, ((0, 0), (0, 960)))
    level = float(np.clip(1 - (kbps * 1000 / channels - 6000) / 250000, 0.0, 1.0))
    sf.write(buffer, at_48k.T, 48000, format="OGG", subtype="OPUS", compression_level=level)
    buffer.seek(0)
    decoded, decoded_rate = sf.read(buffer, dtype="float32", always_2d=True)
    return AF.resample(torch.from_numpy(decoded.T.copy()), decoded_rate, sample_rate).numpy()


def codec_roundtrip(
    wave: torch.Tensor,
    sample_rate: int,
    codec: Codec,
    kbps: int,
    engine: Literal["ffmpeg", "soundfile"] | None = None,
) -> torch.Tensor:
    """Encode a (channels, samples) wave as MP3 or Opus at `kbps` and decode it, time-aligned.

    Uses the ffmpeg binary (libmp3lame, libopus) when it is installed and libsndfile otherwise (see
    `codec_engine`); `engine` forces one. The result has the input's shape and sample rate and is
    aligned to it sample for sample: the encoder delay is removed, the end trimmed or zero-padded.
    MPEG-1 Layer III (32 kHz and up) cannot go below 32 kbps; lower requests get 32 kbps.
    """
    engine = engine or codec_engine()
    roundtrip = _ffmpeg_roundtrip if engine == "ffmpeg" else _soundfile_roundtrip
    n = wave.shape[-1]
    decoded = roundtrip(wave.detach().cpu().numpy().astype(np.float32), sample_rate, codec, kbps)
    # A decoder that finds no gapless tag outputs LAME's delay first; drop it. libsndfile writes
    # no tag when a frame is too small to hold one (32 kbps at 32 kHz, 48 kbps at 22.05 kHz).
    if codec == "mp3" and decoded.shape[-1] >= n + _LAME_DELAY:
        decoded = decoded[:, _LAME_DELAY:]
    decoded = decoded[:, :n]
    out = np.zeros(wave.shape, dtype=np.float32)
    out[:, : decoded.shape[-1]] = decoded
    return torch.from_numpy(out).to(wave.device)


def _limit_peak(wave: torch.Tensor, applied: list[str]) -> torch.Tensor:
    """Scale the wave down to a peak of 1 if needed, noting it in `applied`."""
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if peak > 1.0:
        applied.append(f"scaled {-20 * math.log10(peak):.1f} dB to keep peaks within [-1, 1]")
    return _peak_safe(wave)


class WaveformAugment:
    """Apply reverb, gain, noise and codec to a (channels, samples) wave, each with its probability.

    The order follows the signal path of a recording: the room (reverb), the microphone level
    (gain) and its noise, then the file format (codec). The output has the input's shape and is
    kept within [-1, 1] by scaling down, never by clipping. Each call draws a child generator from
    the one seeded here, so a sequence of calls is reproducible from `seed`, and what one call
    draws does not shift the next. `last_applied` (and `describe()`) tells what the last call did.

    The codec step is the slow one (~0.2 s a call through ffmpeg, two process starts; ~30-50 ms
    through libsndfile): `codec_engine` picks which one `codec_roundtrip` uses, None meaning the
    `codec_engine()` default.

    In a torch DataLoader with workers, every worker gets a copy of this object with the same seed:
    build it inside the worker, or seed it from the worker id, or the workers repeat each other.
    """

    def __init__(
        self,
        params: AugmentParams,
        sample_rate: int,
        seed: int,
        codec_engine: Literal["ffmpeg", "soundfile"] | None = None,
    ) -> None:
        self.params = params
        self.sample_rate = sample_rate
        self.codec_engine = codec_engine
        self._rng = np.random.default_rng(seed)
        self._gain_noise = gain_noise_transform(params.gain_noise)
        self.last_applied: list[str] = []

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """Return an augmented copy of `wave`."""
        rng = self._rng.spawn(1)[0]
        applied: list[str] = []
        rir, codec = self.params.rir, self.params.codec

        if rng.random() < rir.p:
            rt60 = float(rng.uniform(rir.min_rt60, rir.max_rt60))
            wave = add_reverb(wave, self.sample_rate, rt60, rng)
            applied.append(f"reverb RT60 {rt60:.2f} s")

        level = _rms(wave)
        wave = apply_audiomentations(self._gain_noise, wave, self.sample_rate, rng)
        gain, noise = self._gain_noise.transforms
        if gain.parameters["should_apply"]:
            ratio = gain.parameters["amplitude_ratio"]
            level *= ratio
            applied.append(f"gain {20 * math.log10(ratio):+.1f} dB")
        if noise.parameters["should_apply"]:
            snr_db = 20 * math.log10(max(level, 1e-12) / max(noise.parameters["noise_std"], 1e-12))
            applied.append(f"noise SNR {snr_db:.1f} dB")

        # The encoders expect input within [-1, 1]; a +6 dB gain can go beyond it.
        wave = _limit_peak(wave, applied)
        if rng.random() < codec.p:
            name = codec.formats[int(rng.integers(len(codec.formats)))]
            kbps = int(rng.integers(codec.min_kbps, codec.max_kbps + 1))
            wave = codec_roundtrip(wave, self.sample_rate, name, kbps, engine=self.codec_engine)
            applied.append(f"{name} {kbps} kbps")
            wave = _limit_peak(wave, applied)
        self.last_applied = applied
        return wave

    def describe(self) -> str:
        """Summarise in one line what the last call applied."""
        return ", ".join(self.last_applied) or "nothing"
