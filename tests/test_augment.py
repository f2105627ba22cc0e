"""Tests for audiokd_lib.augment: shapes, finiteness, what each augmentation is meant to do."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from audiokd_lib.audio import augment
from audiokd_lib.core.params import AugmentParams, CodecParams, GainNoiseParams, RirParams

SR = 32000


def tone(seconds: float = 2.0) -> torch.Tensor:
    """Return a mono 440 Hz + 880 Hz tone, shaped (1, samples)."""
    t = torch.arange(int(seconds * SR)) / SR
    wave = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 880 * t)
    return wave.unsqueeze(0)


def chirp(seconds: float = 2.0) -> torch.Tensor:
    """Return a mono linear chirp 200 Hz -> 6 kHz: unlike a tone, it aligns at one lag only."""
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    sweep = 200 * t + (5800 / (2 * seconds)) * t**2
    return (0.4 * torch.sin(2 * math.pi * sweep)).float().unsqueeze(0)


def best_lag(reference: torch.Tensor, other: torch.Tensor, max_lag: int = 2000) -> int:
    """Return the lag (samples `other` is late by) that maximises their cross-correlation."""
    a, b = reference[0].double().numpy(), other[0].double().numpy()
    size = len(a) + len(b)
    xcorr = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)
    lags = np.arange(-max_lag, max_lag + 1)
    return int(lags[np.argmax(xcorr[lags % size])])


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


# --------------------------------------------------------------------------- SpecAugment


@pytest.mark.parametrize("shape", [(8, 1, 64, 100), (8, 64, 100)])
def test_spec_augment_masks_with_the_example_mean(shape: tuple[int, ...]) -> None:
    mel = torch.randn(shape) * 10 - 40  # dB-like values, far from 0
    original = mel.clone()
    generator = torch.Generator().manual_seed(0)
    out = augment.spec_augment(mel, freq_mask=16, time_mask=30, n_masks=2, generator=generator)

    assert out.shape == mel.shape and torch.isfinite(out).all()
    assert torch.equal(mel, original), "the input must not be modified"
    means = mel.mean(dim=tuple(range(1, mel.dim())), keepdim=True)
    masked = out == means
    assert masked.any() and not masked.all()
    rows = masked.flatten(0, -3).all(dim=-1)  # a whole mel bin masked
    cols = masked.flatten(0, -3).all(dim=-2)  # a whole frame masked
    assert rows.any() and cols.any()
    assert torch.equal(out[~masked], mel[~masked])


def test_spec_augment_is_reproducible_and_leaves_global_rng_alone() -> None:
    mel = torch.randn(4, 1, 64, 100)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    first = augment.spec_augment(mel, 16, 30, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(1), expected_next)
    second = augment.spec_augment(mel, 16, 30, 2, generator=torch.Generator().manual_seed(7))
    other = augment.spec_augment(mel, 16, 30, 2, generator=torch.Generator().manual_seed(8))
    from_numpy = augment.spec_augment(mel, 16, 30, 2, generator=np.random.default_rng(7))
    again_numpy = augment.spec_augment(mel, 16, 30, 2, generator=np.random.default_rng(7))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(from_numpy, again_numpy)


def test_spec_augment_without_masks_returns_input_values() -> None:
    mel = torch.randn(2, 1, 32, 50)
    assert torch.equal(augment.spec_augment(mel, 16, 30, 0, generator=torch.Generator()), mel)


# --------------------------------------------------------------------------- mixup


def partners(x_mixed: torch.Tensor) -> torch.Tensor:
    """Read each example's mixing partner back from an identity-matrix batch after mixup."""
    off_diagonal = x_mixed.clone().fill_diagonal_(0)
    has_partner = off_diagonal.abs().sum(dim=1) > 0
    return torch.where(has_partner, off_diagonal.abs().argmax(dim=1), torch.arange(len(x_mixed)))


def test_mixup_single_label_interpolates_one_hot_rows() -> None:
    batch, classes = 16, 5
    x = torch.eye(batch)  # row i is e_i, so x_mixed reveals the partner of every example
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    x_mixed, y_mixed, lam = augment.mixup(x, labels, 0.4, rng, num_classes=classes)

    y = torch.nn.functional.one_hot(labels, classes).float()
    perm = partners(x_mixed)
    assert x_mixed.shape == x.shape and y_mixed.shape == y.shape and lam.shape == (batch,)
    assert ((lam >= 0) & (lam <= 1)).all()
    torch.testing.assert_close(x_mixed.sum(dim=1), torch.ones(batch))  # lam + (1 - lam)
    torch.testing.assert_close(y_mixed.sum(dim=1), torch.ones(batch))
    torch.testing.assert_close(y_mixed, lam[:, None] * y + (1 - lam[:, None]) * y[perm])


def test_mixup_multilabel_union_and_interpolate() -> None:
    batch, classes = 16, 6
    x = torch.eye(batch)
    y = (torch.rand(batch, classes, generator=torch.Generator().manual_seed(1)) > 0.6).float()

    generator = torch.Generator().manual_seed(3)
    x_mixed, y_union, lam = augment.mixup(x, y, 0.4, generator, multilabel=True)
    perm = partners(x_mixed)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert torch.equal(y_union, torch.maximum(y, y[perm])), "both sources audible: label union"

    same_generator = torch.Generator().manual_seed(3)
    _, y_interp, lam = augment.mixup(x, y, 0.4, same_generator, True, label_mode="interpolate")
    torch.testing.assert_close(y_interp, lam[:, None] * y + (1 - lam[:, None]) * y[perm])


def test_mixup_with_p_zero_changes_nothing() -> None:
    x, y = torch.randn(8, 1, 16, 20), torch.eye(8)
    rng = np.random.default_rng(0)
    x_mixed, y_mixed, lam = augment.mixup(x, y, 0.4, rng, multilabel=True, p=0.0)
    assert torch.equal(x_mixed, x) and torch.equal(y_mixed, y) and torch.equal(lam, torch.ones(8))


def test_mixup_rejects_union_for_single_label() -> None:
    with pytest.raises(ValueError, match="multi-label"):
        augment.mixup(torch.randn(4, 3), torch.eye(4), 0.4, np.random.default_rng(0),
                      label_mode="union")


# --------------------------------------------------------------------------- gain and noise


def test_gain_noise_shape_reproducibility_and_global_state() -> None:
    wave = tone()
    params = GainNoiseParams(gain_p=1.0, noise_p=1.0)
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.random())
    random.seed(5)
    np.random.seed(5)

    out = augment.gain_noise(wave, SR, params, np.random.default_rng(0))
    assert (random.random(), np.random.random()) == expected, "global RNGs must be left alone"
    assert out.shape == wave.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out, wave)
    assert torch.equal(out, augment.gain_noise(wave, SR, params, np.random.default_rng(0)))
    off = GainNoiseParams(gain_p=0.0, noise_p=0.0)
    assert torch.equal(augment.gain_noise(wave, SR, off, np.random.default_rng(0)), wave)


# --------------------------------------------------------------------------- reverb


def schroeder_rt60(ir: np.ndarray, sample_rate: int) -> float:
    """Measure RT60 from the Schroeder backward integral: T30 fit between -5 and -35 dB, times 2."""
    energy = np.cumsum(ir[::-1] ** 2)[::-1]
    edc_db = 10 * np.log10(energy / energy[0])
    fit = (edc_db <= -5) & (edc_db >= -35)
    slope, _ = np.polyfit(np.flatnonzero(fit) / sample_rate, edc_db[fit], 1)
    return -60 / slope


@pytest.mark.parametrize("rt60", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("air_absorption", [True, False])
def test_synthetic_rir_has_requested_rt60(rt60: float, air_absorption: bool) -> None:
    rng = np.random.default_rng(int(rt60 * 10))
    ir = augment.synthetic_rir(SR, rt60, rng, air_absorption=air_absorption)
    assert ir.shape == (1, int(round(1.5 * rt60 * SR))) and torch.isfinite(ir).all()
    assert float(ir.pow(2).sum()) == pytest.approx(1.0, rel=1e-4)
    assert int(ir.abs().argmax()) == 0, "the direct path comes first and is the strongest"
    assert schroeder_rt60(ir[0].double().numpy(), SR) == pytest.approx(rt60, rel=0.2)


def test_add_reverb_keeps_length_and_level() -> None:
    wave = tone()
    out = augment.add_reverb(wave, SR, 0.6, np.random.default_rng(0))
    assert out.shape == wave.shape and torch.isfinite(out).all() and out.abs().max() <= 1.0
    assert augment._rms(out) == pytest.approx(augment._rms(wave), rel=0.01)
    assert not torch.allclose(out, wave, atol=1e-3)


# --------------------------------------------------------------------------- codecs


@pytest.fixture(params=["ffmpeg", "soundfile"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through ffmpeg, then again with ffmpeg hidden so libsndfile takes over."""
    if request.param == "ffmpeg" and shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    if request.param == "soundfile":
        monkeypatch.setenv("PATH", "")
    assert augment.codec_engine() == request.param
    return request.param


@pytest.mark.parametrize("codec", ["mp3", "opus"])
def test_codec_roundtrip_degrades_but_keeps_the_signal(engine: str, codec: str) -> None:
    wave = tone()
    out = augment.codec_roundtrip(wave, SR, codec, 64)
    assert out.shape == wave.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert correlation(out, wave) > 0.9
    error = (out - wave).abs().max()
    assert 1e-3 < error < 0.1, "lossy, so changed, but nowhere garbled (the clip's end included)"


@pytest.mark.parametrize("kbps", [24, 64])
@pytest.mark.parametrize("codec", ["mp3", "opus"])
def test_codec_roundtrip_is_time_aligned(engine: str, codec: str, kbps: int) -> None:
    wave = chirp()
    out = augment.codec_roundtrip(wave, SR, codec, kbps)
    assert out.shape == wave.shape
    assert best_lag(wave, out) == 0


def test_codec_engine_explains_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(sf, "available_formats", dict)
    with pytest.raises(RuntimeError, match="apt-get install ffmpeg"):
        augment.codec_roundtrip(tone(0.1), SR, "mp3", 64)


# --------------------------------------------------------------------------- WaveformAugment


def all_on() -> AugmentParams:
    return AugmentParams(
        gain_noise=GainNoiseParams(gain_p=1.0, noise_p=1.0),
        rir=RirParams(p=1.0),
        codec=CodecParams(p=1.0),
    )


def test_waveform_augment_applies_everything_deterministically() -> None:
    wave = tone()
    first = augment.WaveformAugment(all_on(), SR, seed=3)
    second = augment.WaveformAugment(all_on(), SR, seed=3)

    out = first(wave)
    assert out.shape == wave.shape and torch.isfinite(out).all() and out.abs().max() <= 1.0
    kinds = [entry.split()[0] for entry in first.last_applied]
    assert {"reverb", "gain", "noise"} <= set(kinds) and ({"mp3", "opus"} & set(kinds))
    assert first.describe().startswith("reverb RT60")
    assert torch.equal(out, second(wave))
    assert not torch.equal(first(wave), out), "successive calls draw new augmentations"


def test_waveform_augment_with_nothing_enabled_returns_input() -> None:
    params = AugmentParams(
        gain_noise=GainNoiseParams(gain_p=0.0, noise_p=0.0),
        rir=RirParams(p=0.0),
        codec=CodecParams(p=0.0),
    )
    aug = augment.WaveformAugment(params, SR, seed=0)
    wave = tone()
    assert torch.equal(aug(wave), wave)
    assert aug.last_applied == [] and aug.describe() == "nothing"


def test_waveform_augment_keeps_loud_input_within_range() -> None:
    params = AugmentParams(
        gain_noise=GainNoiseParams(min_gain_db=6.0, max_gain_db=6.0, gain_p=1.0, noise_p=0.0),
        rir=RirParams(p=0.0),
        codec=CodecParams(p=0.0),
    )
    aug = augment.WaveformAugment(params, SR, seed=0)
    out = aug(tone() * 1.8)
    assert float(out.abs().max()) == pytest.approx(1.0) and "scaled" in aug.describe()


def test_mel_equalizer_colours_within_its_limits_and_p_zero_is_identity() -> None:
    logmel = torch.randn(8, 1, 64, 50)
    eq = augment.mel_equalizer(logmel, max_db=9.0, bumps=3, rng=np.random.default_rng(0))
    shift_db = (eq - logmel) * 10 / math.log(10)
    assert torch.allclose(shift_db, shift_db[..., :1].expand_as(shift_db), atol=1e-4)  # one curve per clip, all frames
    assert shift_db.abs().max() <= 9.0 + 1e-4 and shift_db.abs().amax(dim=(1, 2, 3)).min() > 0.5
    assert not torch.allclose(shift_db[0], shift_db[1])  # each clip its own equaliser
    assert torch.equal(augment.mel_equalizer(logmel, 9.0, 3, np.random.default_rng(0), p=0.0), logmel)


def test_mel_reverb_adds_a_tail_after_the_sound_only_and_keeps_its_power() -> None:
    frames, frame_seconds = 200, 0.01
    power = torch.full((2, 1, 4, frames), 1e-8)
    power[..., 20] = 1.0  # a click at frame 20
    logmel = power.log()
    short = augment.mel_reverb(logmel, frame_seconds, 0.2, 0.2, np.random.default_rng(0)).exp()
    long = augment.mel_reverb(logmel, frame_seconds, 0.8, 0.8, np.random.default_rng(0)).exp()
    for wet in (short, long):
        assert torch.allclose(wet[..., :20], power[..., :20], rtol=1e-3)  # nothing before the click
        assert torch.allclose(wet.sum(-1), power.sum(-1), rtol=1e-4)     # power kept
    tail = 20 + 30  # 0.3 s after the click: 0.2 s rooms have decayed by ~90 dB, 0.8 s ones by ~20 dB
    assert (long[..., tail] > 100 * short[..., tail]).all() and (long[..., tail] > 1e-5).all()
    assert torch.equal(augment.mel_reverb(logmel, frame_seconds, 0.2, 0.8, np.random.default_rng(0), p=0.0), logmel)
