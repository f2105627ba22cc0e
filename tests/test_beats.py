"""Notebook 09's beat tracking: the annotations, causality, streaming and ONNX, the decoders, mir_eval, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import ROOT

from audiokd_lib.beats import decode, stream
from audiokd_lib.beats import model as beatnet
from audiokd_lib.beats.pieces import METRES, beat_times, compose, read_beats, render_beat_pieces
from audiokd_lib.cli import main
from audiokd_lib.core.params import load_params
from audiokd_lib.data.tables import plan_soundfonts
from audiokd_lib.models.reuse import add_scores

FPS = 50.0


@pytest.fixture(scope="module")
def smoke():
    return load_params(ROOT / "params" / "smoke.yaml")


def test_beats_follow_the_tempo_and_its_drift():
    steady = beat_times(120.0, 0.0, 16, 0.0, 0.5, 10.0)
    assert steady[0] == 0.5 and np.allclose(np.diff(steady), 0.5)
    drifting = np.diff(beat_times(120.0, 0.1, 16, 0.0, 0.0, 30.0))
    assert 60 / (120 * 1.1) - 1e-9 <= drifting.min() < 0.49 and 0.51 < drifting.max() <= 60 / (120 * 0.9) + 1e-9


def test_every_metre_counts_its_bars(smoke):
    pp = smoke.beats.pieces.model_copy(update={"seconds": 10.0})
    seen = set()
    for index in range(12):
        score = compose(0, index, pp)
        per_bar = METRES[score.metre][0]
        seen.add(score.metre)
        assert set(score.positions) <= set(range(1, per_bar + 1))
        assert (np.diff(score.positions) % per_bar == 1 % per_bar).all()  # 1, 2, .., per_bar, 1, ...
        assert (np.diff(score.beats) > 0).all() and score.beats[-1] <= pp.seconds
        assert pp.min_bpm * (1 - pp.max_drift) - 1 <= 60 / np.diff(score.beats).max()
    assert seen == {"3/4", "4/4", "6/8"}
    again = compose(0, 3, pp)
    assert np.array_equal(again.beats, compose(0, 3, pp).beats)  # (seed, index) decide everything


def test_rendered_onsets_line_up_with_the_written_beats(smoke, tmp_path):
    # Drums, on the grid: every written beat has an onset in the audio within a frame or two.
    pp = smoke.beats.pieces.model_copy(update={"count": 3, "heldout_count": 0, "seconds": 8.0,
                                               "drums_fraction": 1.0, "humanise_ms": 0.0})
    table = render_beat_pieces(tmp_path, plan_soundfonts(smoke.data), pp, progress=False)
    assert len(table) == 3 and (tmp_path / "beat_pieces.csv").is_file()
    frontend = beatnet.CausalFrontEnd(pp.sample_rate, 1024, 441, 64)
    for row in table.itertuples():
        wave, rate = sf.read(row.path, dtype="float32")
        assert rate == pp.sample_rate and len(wave) == round(pp.seconds * rate)
        flux = frontend(torch.from_numpy(wave)[None])[0, :, 64:].sum(dim=1).numpy()
        onsets = decode.pick_peaks(flux / flux.max(), 0.1, frontend.fps, min_interval=0.05)
        beats, downbeats = read_beats(row.beats_path)
        assert set(downbeats) <= set(beats) and len(beats) >= 4
        gaps = np.abs(beats[:, None] - onsets[None, :]).min(axis=1)
        assert np.mean(gaps <= 0.045) >= 0.9, (row.sample_key, gaps)
    # Rendering again reuses every folder; other settings are refused, not overwritten.
    assert render_beat_pieces(tmp_path, plan_soundfonts(smoke.data), pp, progress=False).equals(table)
    with pytest.raises(ValueError, match="other settings"):
        render_beat_pieces(tmp_path, plan_soundfonts(smoke.data), pp.model_copy(update={"max_bpm": 150.0}),
                           progress=False)


def test_the_student_is_causal_and_the_teacher_is_not(smoke):
    wave = torch.randn(22050 * 2) * 0.1
    changed = wave.clone()
    changed[22050:] = torch.randn(22050) * 0.3  # everything after one second is different
    hop = smoke.beats.hop
    before = 22050 // hop  # frames whose window ends by sample 22050
    for role, causal in (("student", True), ("teacher", False)):
        model = beatnet.build(smoke.beats, role)
        a, b = model.activations(wave), model.activations(changed)
        assert np.allclose(a[:before], b[:before], atol=1e-6) == causal, role
        assert not np.allclose(a[before + 2:], b[before + 2:], atol=1e-6)


def test_streaming_gives_the_whole_file_activations_and_onnx_the_same_steps(smoke, tmp_path):
    model = beatnet.build(smoke.beats, "student")
    wave = torch.randn(22050) * 0.1
    streamed, events, took = stream.stream_file(model, wave)
    whole = model.activations(wave)
    assert streamed.shape[0] >= len(whole) and np.allclose(streamed[:len(whole)], whole, atol=1e-5)
    assert len(took) == len(streamed) and all(kind in ("beat", "downbeat") for _, kind in events)
    path = stream.export_step(model, tmp_path / "step.onnx")
    parity = stream.check_step(model, path, model.frontend(wave[None])[0])
    assert parity["max_abs_diff"] < 1e-5 and parity["mse"] < 1e-10
    with pytest.raises(ValueError, match="causal"):
        stream.BeatStream(beatnet.build(smoke.beats, "teacher"))


def bumps(frames: list[int], length: int, height: float = 0.9) -> np.ndarray:
    act = np.full(length, 0.02)
    for f in frames:
        act[max(0, f - 1):f + 2] = np.maximum(act[max(0, f - 1):f + 2], [0.4 * height, height, 0.4 * height][
            :len(act[max(0, f - 1):f + 2])])
    return act


def test_peak_picking_thresholds_and_spacing():
    act = bumps([10, 40, 70], 100)
    act[42] = 0.5                                            # a second peak too close to 40: dropped
    act[90] = 0.35                                           # a weak one: only at a low threshold
    assert decode.pick_peaks(act, 0.5, FPS).tolist() == [0.2, 0.8, 1.4]
    assert decode.pick_peaks(act, 0.3, FPS).tolist() == [0.2, 0.8, 1.4, 1.8]
    assert decode.pick_peaks(act, 0.95, FPS).size == 0


def test_the_dbn_keeps_a_steady_beat_through_missed_and_spurious_peaks():
    truth = list(range(15, 1000, 30))                        # 100 BPM at 50 frames a second
    act = bumps([f for i, f in enumerate(truth) if i % 7 != 3], 1000)   # every seventh beat missing
    act[[100, 400, 700]] = 0.9                               # and spurious peaks off the beat
    dbn = decode.BeatDBN(FPS, 55, 190)
    found = dbn.decode(act)
    assert decode.evaluate([found], [np.array(truth) / FPS])["F"] == 1.0
    peaks = decode.pick_peaks(act, 0.5, FPS)
    assert decode.evaluate([peaks], [np.array(truth) / FPS])["F"] < 0.95  # what the DBN adds


def test_the_dbn_follows_a_drifting_tempo():
    times = beat_times(90.0, 0.1, 12, 0.0, 0.3, 30.0)
    act = bumps(list(np.round(times * FPS).astype(int)), 1500)
    found = decode.BeatDBN(FPS, 55, 190).decode(act)
    assert decode.evaluate([found], [times[times < 30]])["F"] > 0.97


def test_the_bar_hmm_finds_the_downbeats_of_a_waltz():
    beats = np.arange(0.5, 20, 0.6)
    down = bumps([], 1000)
    for k, b in enumerate(beats):
        if k % 3 == 1 and k != 16:                          # bars of three from the second beat; one missed
            down[int(round(b * FPS))] = 0.8
    found = decode.downbeats(beats, down, FPS, (2, 3, 4))
    assert np.allclose(found, beats[1::3])


def test_evaluate_gives_mir_eval_scores():
    truth = np.arange(0.5, 30, 0.5)
    assert decode.evaluate([truth], [truth]) == {"F": 1.0, "CMLt": 1.0, "AMLt": 1.0}
    half = decode.evaluate([truth[::2]], [truth])               # half tempo: right at another metrical level
    assert half["CMLt"] == 0.0 and half["AMLt"] == 1.0 and 0.6 < half["F"] < 0.7
    assert decode.evaluate([truth], [truth], [truth[::4]], [truth[::4]])["downbeat F"] == 1.0


def click_pieces(bp, count: int = 4) -> list[beatnet.Piece]:
    """Clicks on a grid: a beat every 0.5 s, a downbeat (louder) every 2 s, each piece a little later."""
    pieces, frontend = [], beatnet.build(bp, "student").frontend
    for k in range(count):
        beats = np.arange(0.25 + 0.05 * k, 7.5, 0.5)
        wave = torch.zeros(22050 * 8)
        gen = torch.Generator().manual_seed(k)
        for i, b in enumerate(beats):
            s = int(b * 22050)
            wave[s:s + 400] = torch.randn(400, generator=gen) * (0.9 if i % 4 == 0 else 0.3)
        features = frontend(wave[None])[0]
        pieces.append(beatnet.Piece(f"p{k}", features, beatnet.targets_for(beats, beats[::4], len(features), FPS),
                                    beats, beats[::4]))
    return pieces


def three_epochs(smoke, **update):
    return smoke.beats.model_copy(update={"train": smoke.beats.train.model_copy(update={"epochs": 3}), **update})


def student_for(bp, pieces) -> beatnet.BeatModel:
    model = beatnet.build(bp, "student", seed=0)
    beatnet.set_normalisation(model, pieces)
    return model


def mean_probability(model, pieces) -> float:
    return float(np.mean([a.mean() for a in beatnet.predict(model, pieces)]))


def test_the_distillation_loss_mixes_labels_and_teacher():
    logits, labels = torch.randn(2, 5, 2), (torch.rand(2, 5, 2) > 0.7).float()
    teacher = torch.rand(2, 5, 2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.isclose(beatnet.distill_loss(logits, labels, None, 0.3), bce(logits, labels))
    assert torch.isclose(beatnet.distill_loss(logits, labels, teacher, 0.0), bce(logits, labels))
    assert torch.isclose(beatnet.distill_loss(logits, labels, teacher, 1.0), bce(logits, teacher))
    assert torch.isclose(beatnet.distill_loss(logits, labels, teacher, 0.25),
                         0.75 * bce(logits, labels) + 0.25 * bce(logits, teacher))


def test_training_learns_and_a_distilled_student_moves_toward_its_teacher(smoke):
    bp = three_epochs(smoke, kd_alpha=1.0)
    pieces = click_pieces(bp)
    student = student_for(bp, pieces)
    untrained = mean_probability(student, pieces)
    fit = beatnet.train_beats(student, pieces[:3], pieces[3:], bp, 0, progress=False)
    assert list(fit.history.columns) == ["epoch", "train_loss", "val_beat_f", "val_downbeat_f", "seconds"]
    assert len(fit.history) == 3 and fit.history["train_loss"].iloc[-1] < fit.history["train_loss"].iloc[0]
    best = fit.history.loc[fit.best_epoch - 1]
    assert fit.best == {"val_beat_f": best["val_beat_f"], "val_downbeat_f": best["val_downbeat_f"]}
    assert (best["val_beat_f"] + best["val_downbeat_f"]) == (fit.history["val_beat_f"]
                                                             + fit.history["val_downbeat_f"]).max()
    # A teacher sure of a beat in every frame (0.9), followed alone (kd_alpha 1): the distilled student's
    # probabilities rise toward it, while the labels (beats in one frame of 25) pull the other student down.
    teacher_acts = {p.key: np.full((len(p.features), 2), 0.9, np.float32) for p in pieces}
    distilled = student_for(bp, pieces)
    beatnet.train_beats(distilled, pieces[:3], pieces[3:], bp, 0, teacher_acts=teacher_acts, progress=False)
    labels_only = mean_probability(student, pieces)
    assert labels_only < untrained < mean_probability(distilled, pieces)
    assert beatnet.macs_per_second(student) < beatnet.macs_per_second(beatnet.build(bp, "teacher"))


def test_an_interrupted_training_resumes_from_last_pt_and_ends_the_same(smoke, tmp_path):
    bp = three_epochs(smoke)
    pieces = click_pieces(bp)
    whole = student_for(bp, pieces)
    uninterrupted = beatnet.train_beats(whole, pieces[:3], pieces[3:], bp, 0, tmp_path / "whole", progress=False)

    def stop(row):
        raise KeyboardInterrupt(f"stopped after epoch {row['epoch']}")

    with pytest.raises(KeyboardInterrupt):
        beatnet.train_beats(student_for(bp, pieces), pieces[:3], pieces[3:], bp, 0, tmp_path / "cut", on_epoch=stop,
                            progress=False)
    assert (tmp_path / "cut" / "last.pt").is_file()
    epochs = []
    resumed_model = student_for(bp, pieces)  # a fresh process: weights from last.pt
    resumed = beatnet.train_beats(resumed_model, pieces[:3], pieces[3:], bp, 0, tmp_path / "cut",
                                  on_epoch=lambda row: epochs.append(row["epoch"]), progress=False)
    assert epochs == [2, 3]  # the first epoch was not trained again
    columns = ["epoch", "train_loss", "val_beat_f", "val_downbeat_f"]
    pd.testing.assert_frame_equal(resumed.history[columns], uninterrupted.history[columns])
    assert resumed.best_epoch == uninterrupted.best_epoch
    for name, tensor in whole.net.state_dict().items():
        assert torch.equal(tensor, resumed_model.net.state_dict()[name]), name
    with pytest.raises(ValueError, match="other settings"):  # a last.pt of other settings is refused
        beatnet.train_beats(student_for(bp, pieces), pieces[:3], pieces[3:], three_epochs(smoke, kd_alpha=0.3), 0,
                            tmp_path / "cut", teacher_acts={p.key: np.zeros((len(p.features), 2), np.float32)
                                                            for p in pieces}, progress=False)


def test_a_second_fit_with_the_same_settings_reuses_the_run(smoke_profile, monkeypatch):
    params = load_params(smoke_profile)
    params = params.model_copy(update={"beats": three_epochs(params)})
    pieces = click_pieces(params.beats)
    sets = {"train": pieces[:3], "val": pieces[3:]}
    first_model = beatnet.build(params.beats, "student", seed=0)
    first = beatnet.fit_beats(params, "beats-student-labels", first_model, sets)
    assert not first.reused and len(first.history) == 3 and first.run["role"] == "beats-student"
    assert first.run["best_epoch"] == first.best_epoch and first.run["model"] == "beats-student-labels"
    run_dir = params.output_dir / "models" / "beats-student-labels"
    assert (run_dir / "model.pt").is_file() and not (run_dir / "last.pt").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(beatnet, "train_beats", refuse)
    again_model = beatnet.build(params.beats, "student", seed=0)
    again = beatnet.fit_beats(params, "beats-student-labels", again_model, sets)
    assert again.reused and again.run_id == first.run_id and again.best_epoch == first.best_epoch
    pd.testing.assert_frame_equal(again.history, first.history)
    for name, tensor in first_model.net.state_dict().items():
        assert torch.equal(tensor, again_model.net.state_dict()[name]), name
    # Another teacher is another run: trained, not reused.
    with pytest.raises(AssertionError, match="trained again"):
        beatnet.fit_beats(params, "beats-student-labels", beatnet.build(params.beats, "student", seed=0), sets,
                          teacher=first_model)
    # Scores measured later go to the run once.
    assert add_scores(params, again, {"test_dbn_F": 0.5}) == {"test_dbn_F": 0.5}
    assert add_scores(params, again, {"test_dbn_F": 0.5}) == {}


def test_scores_are_kept_by_the_key_of_the_weights_and_pieces_and_named_for_mlflow(smoke_profile, monkeypatch):
    params = load_params(smoke_profile)
    pieces = click_pieces(params.beats, 2)
    models = {"student": student_for(params.beats, pieces)}
    sets = {"train": pieces, "test": pieces[:1], "heldout": pieces[1:]}
    first = beatnet.score_trackers(params, models, sets)
    decoders = [f"peaks {t:g}" for t in params.beats.thresholds] + ["DBN"]
    assert list(first["split"]) == ["test"] * len(decoders) + ["heldout"] * len(decoders)  # never train
    assert list(first["decoder"]) == decoders * 2 and first[["F", "downbeat F"]].stack().between(0, 1).all()

    def refuse(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(beatnet, "score_pieces", refuse)
    pd.testing.assert_frame_equal(beatnet.score_trackers(params, models, sets), first)  # read back
    with torch.no_grad():
        models["student"].net.out.bias += 1.0
    with pytest.raises(AssertionError, match="scored again"):  # other weights: scored again
        beatnet.score_trackers(params, models, sets)
    scores = beatnet.run_scores(first)["student"]
    dbn = first[(first["split"] == "heldout") & (first["decoder"] == "DBN")].iloc[0]
    assert scores["heldout_dbn_F"] == dbn["F"] and scores["heldout_dbn_downbeat_F"] == dbn["downbeat F"]
    assert len(scores) == 4 * len(first) and "test_peaks0.5_CMLt" in scores


def test_cli_writes_beats_and_clicks_and_handles_bad_input(smoke, tmp_path, capsys):
    model_path = beatnet.save(beatnet.build(smoke.beats, "student"), tmp_path / "model.pt")
    song = tmp_path / "song.wav"
    sf.write(song, np.random.default_rng(0).normal(0, 0.1, 22050 * 3).astype(np.float32), 22050)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    out = tmp_path / "out"
    args = ["beats", str(song), str(tmp_path / "broken.wav"), "--out", str(out), "--model", str(model_path),
            "--profile", "smoke", "--clicks"]
    assert main(args) == 1  # the broken file fails; the good one is still written
    err = capsys.readouterr().err
    assert "broken.wav" in err and "cannot be decoded" in err
    table = pd.read_csv(out / "song.beats.csv")
    assert list(table.columns) == ["time", "downbeat"]
    clicks, rate = sf.read(out / "song.clicks.wav")
    assert rate == 22050 and len(clicks) == 22050 * 3
    assert main(["beats", str(song), "--out", str(out), "--model", str(model_path), "--profile", "smoke"]) == 1
    assert "--overwrite" in capsys.readouterr().err  # never replaced without asking
    assert main(["beats", str(song), "--out", str(out), "--model", str(tmp_path / "none.pt"), "--profile", "smoke",
                 "--overwrite"]) == 1
    assert "no beat tracker here" in capsys.readouterr().err
    (tmp_path / "other.pt").write_bytes(b"")
    torch.save({"spec": {"kind": "crnn"}}, tmp_path / "other.pt")
    assert main(["beats", str(song), "--out", str(out), "--model", str(tmp_path / "other.pt"), "--profile", "smoke",
                 "--overwrite"]) == 1
    assert "not a beat tracker" in capsys.readouterr().err
