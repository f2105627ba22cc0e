"""Separation: the CRNN, Demucs from a local folder, SDR references, stem selection and `audiokd separate`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import ROOT, write_profile

from audiokd_lib.audio.features import NormStats
from audiokd_lib.audio.loading import save_audio
from audiokd_lib.cli import main
from audiokd_lib.core import tracking
from audiokd_lib.core.params import CRNNParams, load_params
from audiokd_lib.data.taxonomy import GROUPS, OPENMIC_CLASSES
from audiokd_lib.experiment import runs
from audiokd_lib.models import checkpoints, students
from audiokd_lib.separation import crnn, quality, separator, stem_selection

RATE = 8000
TINY = CRNNParams(n_fft=64, hop=32, channels=[4, 8], hidden=8, epochs=8, time_budget_s=None, patience=8,
                  batch_size=4, crop_seconds=0.5, lr=0.01)


def tiny_crnn(seed: int = 0) -> crnn.MaskCRNN:
    return crnn.build_crnn(TINY, RATE, seed=seed)


def group_signals(rng: np.random.Generator, seconds: float, silent: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Four easily told apart groups: noise bursts, a low sine, a wavering mid sine, a bright buzz."""
    t = np.arange(round(seconds * RATE)) / RATE
    bursts = rng.standard_normal(t.size) * np.exp(-30 * (t % 0.25))
    signals = {
        "drums": 0.2 * bursts,
        "bass": 0.2 * np.sin(2 * np.pi * rng.uniform(55, 110) * t),
        "vocals": 0.15 * np.sin(2 * np.pi * rng.uniform(400, 600) * t + 3 * np.sin(2 * np.pi * 5 * t)),
        "other": 0.05 * np.sign(np.sin(2 * np.pi * rng.uniform(1000, 1500) * t)),
    }
    return {g: np.zeros_like(t) if g in silent else signals[g] for g in GROUPS}


@pytest.fixture
def pieces(tmp_path) -> pd.DataFrame:
    return render_pieces(tmp_path)


def render_pieces(tmp_path) -> pd.DataFrame:
    """Four 2 s pieces in the rendered layout: 24-bit groups whose sum is exactly mixture.wav."""
    rows = []
    for index, split in enumerate(["train", "train", "val", "test"]):
        folder = tmp_path / "pieces" / f"piece-{index:04d}"
        (folder / "groups").mkdir(parents=True)
        (folder / "stems").mkdir()
        silent = ("vocals",) if index == 3 else ()
        ints = {g: np.round(x * 2**23).astype(np.int32) for g, x in
                group_signals(np.random.default_rng(index), 2.0, silent).items()}
        for group, q in ints.items():
            sf.write(folder / "groups" / f"{group}.flac", q << 8, RATE, subtype="PCM_24")
            sf.write(folder / "stems" / f"{group}.flac", q << 8, RATE, subtype="PCM_24")
        sf.write(folder / "mixture.wav", sum(ints.values()) << 8, RATE, subtype="PCM_24")
        rows.append({"path": str(folder / "mixture.wav"), "labels": "bass|drums|voice", "split": split,
                     "sample_key": folder.name, "stems_dir": str(folder / "stems")})
    return pd.DataFrame(rows)


def tiny_demucs_repo(folder):
    """A tiny HTDemucs saved the way demucs saves its own models, plus a bag of it."""
    from demucs.htdemucs import HTDemucs
    from demucs.states import get_state, save_with_checksum

    torch.manual_seed(0)
    model = HTDemucs(sources=list(crnn.FOUR_STEMS), channels=4, depth=2, nfft=256, t_layers=1, t_heads=2,
                     dconv_mode=0, samplerate=RATE, segment=1)
    args, kwargs = model._init_args_kwargs
    # What demucs.states.serialize_model writes, less its OmegaConf training arguments.
    package = {"klass": HTDemucs, "args": args, "kwargs": kwargs, "state": get_state(model, None, half=False),
               "training_args": {}}
    folder.mkdir()
    save_with_checksum(package, folder / "tinysig.th")
    (folder / "tinybag.yaml").write_text("models: [tinysig]\nweights: [[1, 1, 1, 1]]\nsegment: 1\n")
    return folder


# --------------------------------------------------------------------------- the CRNN


def test_crnn_shapes_masks_and_stems_that_add_up():
    model = tiny_crnn().eval()
    mix = torch.randn(2, 1, 1000)
    with torch.no_grad():
        masks = model.masks(model.stft(mix[:, 0]))
        stems = model(mix)
    assert masks.shape[:3] == (2, 4, TINY.n_fft // 2 + 1)
    assert torch.allclose(masks.sum(dim=1), torch.ones(()), atol=1e-5)
    assert stems.shape == (2, 4, 1, 1000)
    assert torch.allclose(stems.sum(dim=1), mix, atol=1e-4)  # masks sum to one: nothing is lost or invented
    with torch.no_grad():
        assert model(torch.randn(1, 1, 10)).shape == (1, 4, 1, 10)  # shorter than one STFT frame


def test_training_lowers_the_loss_resumes_and_round_trips(pieces, tmp_path):
    model = tiny_crnn()
    val = [crnn.load_piece(m, model.sources, RATE) for m in pieces.loc[pieces.split == "val", "path"]]
    before = crnn.validation_loss(model, val)
    rows = []
    result = crnn.train_crnn(model, pieces[pieces.split == "train"], pieces[pieces.split == "val"], TINY,
                                 tmp_path / "run", on_epoch=rows.append, progress=False)
    assert len(rows) == TINY.epochs and result.stopped == "epochs"
    assert result.best_val_loss < 0.9 * before
    assert crnn.validation_loss(model, val) == pytest.approx(result.best_val_loss, rel=1e-5)

    loaded = crnn.load_crnn(result.checkpoint)
    mix = torch.randn(1, 1, 4000)
    with torch.no_grad():
        assert torch.allclose(loaded(mix), model.eval()(mix), atol=1e-6)
    # A longer schedule resumes from last.pt instead of starting over.
    more = TINY.model_copy(update={"epochs": TINY.epochs + 1})
    resumed = crnn.train_crnn(tiny_crnn(), pieces[pieces.split == "train"], pieces[pieces.split == "val"], more,
                                  tmp_path / "run", progress=False)
    assert len(resumed.history) == TINY.epochs + 1
    with pytest.raises(ValueError, match="other settings"):
        crnn.train_crnn(crnn.build_crnn(TINY.model_copy(update={"hidden": 4}), RATE),
                            pieces[pieces.split == "train"], pieces[pieces.split == "val"], more, tmp_path / "run")


def test_time_budget_stops_training(pieces, tmp_path):
    budget = TINY.model_copy(update={"time_budget_s": 1e-3})
    result = crnn.train_crnn(tiny_crnn(), pieces[pieces.split == "train"], pieces[pieces.split == "val"],
                                 budget, tmp_path / "run", progress=False)
    assert result.stopped == "time budget" and result.history["steps"].tolist() == [1]
    assert crnn.load_crnn(result.checkpoint).spec == tiny_crnn().spec


def test_the_separator_run_is_logged_found_by_the_cli_and_reused(pieces, tmp_path, capsys, monkeypatch):
    crnn_settings = ", ".join(f"{key}: {value}" for key, value in
                              TINY.model_copy(update={"epochs": 2}).model_dump().items() if value is not None)
    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'outputs'}\n"
                                      f"data: {{pieces: {{sample_rate: {RATE}}}}}\n"
                                      f"separation: {{crnn: {{{crnn_settings}}}}}\n", "sep")
    params = load_params(profile)
    row = runs.train_separator(params, pieces, progress=False)
    assert row["role"] == "separator" and row["model"] == "separator-crnn" and row["epochs_run"] == 2
    assert row["stopped"] == "epochs" and row["macs"] > 0 and row["latency_ms"] > 0
    assert tracking.artifact_path(row, "separator-crnn_loss.png").is_file()
    assert not (runs.model_dir(params, "separator-crnn") / "last.pt").exists()
    found = separator.open_separator("crnn", params)  # what `audiokd separate --separator crnn` loads
    assert found.spec == crnn.load_crnn(runs.checkpoint_path(params, "separator-crnn")).spec
    capsys.readouterr()
    again = runs.train_separator(params, pieces, progress=False)
    assert again.name == row.name  # reused, not trained again
    assert "reusing it" in capsys.readouterr().out

    # Its SDRs: measured once, added to its run; a second call reads them back (the same numbers, no separating)
    test = {"test": pieces[pieces["split"] == "test"]}
    scores = runs.separator_scores(params, again, found, test)
    logged = tracking.runs_frame(params, "separator").iloc[0]
    assert logged["test_sdr_average_CRNN"] == pytest.approx(scores["test"].table().loc["CRNN", "average"])
    assert tracking.artifact_path(logged, "sdr/sdr_test.csv").is_file()
    with monkeypatch.context() as patch:
        patch.setattr(quality, "evaluate", lambda *args, **kwargs: pytest.fail("separated again"))
        pd.testing.assert_frame_equal(runs.separator_scores(params, logged, found, test)["test"].per_track,
                                      scores["test"].per_track)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such separator checkpoint"):
        crnn.load_crnn(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not an audiokd separator"):
        crnn.load_crnn(bad)


# --------------------------------------------------------------------------- scores


def test_sdr_floor_and_ceiling(pieces):
    mixture, references = crnn.load_piece(pieces.path[3], GROUPS, RATE)
    assert torch.equal(references.sum(dim=0), mixture)  # the mixture is the exact sum of its groups
    drums = references[0].numpy()
    assert quality.sdr(drums, drums) > 60
    irm = quality.ideal_ratio_mask(mixture, references, TINY.n_fft, TINY.hop)
    assert quality.sdr(drums, irm[0].numpy()) > quality.sdr(drums, mixture.numpy())

    scores = quality.evaluate(pieces[pieces.split == "test"], {"crnn": tiny_crnn()}, TINY.n_fft, TINY.hop, RATE,
                               progress=False)
    table = scores.table()
    assert list(table.index) == ["mixture", "ideal ratio mask", "crnn"]
    assert "vocals" not in set(scores.per_track["stem"])  # silent in that piece: no SDR
    assert table.loc["ideal ratio mask", "average"] > table.loc["mixture", "average"] + 5
    assert table.loc["crnn", "rtf"] > 0 and np.isnan(table.loc["mixture", "rtf"])


# --------------------------------------------------------------------------- instruments -> stems


def test_mapping_for_four_and_six_stems():
    table = stem_selection.mapping_table().set_index("class")
    assert list(table.index) == list(OPENMIC_CLASSES)
    assert table.loc["voice"].tolist() == ["vocals", "vocals"] and table.loc["cymbals"].tolist() == ["drums", "drums"]
    assert table.loc["guitar"].tolist() == ["other", "guitar"] and table.loc["piano"].tolist() == ["other", "piano"]
    assert table.loc["flute"].tolist() == ["other", "other"]
    four = stem_selection.mapping_limits(stem_selection.stem_mapping(crnn.FOUR_STEMS), crnn.FOUR_STEMS)
    six = stem_selection.mapping_limits(stem_selection.stem_mapping(separator.SIX_STEMS), separator.SIX_STEMS)
    assert any("guitar is inside 'other'" in line for line in four)
    assert not any("guitar is inside" in line for line in six)
    assert any("several instruments share 'other'" in line for line in four + six)


def test_select_stems_with_reasons():
    scores = {"voice": 0.9, "guitar": 0.7, "flute": 0.6, "drums": 0.2, "bass": 0.1}
    four = stem_selection.select_stems(scores, 0.5, crnn.FOUR_STEMS)
    assert four.chosen == ["other", "vocals"]
    assert "guitar 0.70" in four.reasons["other"] and "flute 0.60" in four.reasons["other"]
    assert "best: drums 0.20" in four.reasons["drums"]
    six = stem_selection.select_stems(scores, 0.5, separator.SIX_STEMS)
    assert six.chosen == ["other", "vocals", "guitar"]
    assert stem_selection.select_stems(scores, 0.5, crnn.FOUR_STEMS, all_stems=True).chosen == list(crnn.FOUR_STEMS)
    unclassified = stem_selection.select_stems(None, 0.5, crnn.FOUR_STEMS)
    assert unclassified.chosen == list(crnn.FOUR_STEMS) and unclassified.threshold is None
    assert stem_selection.select_stems({}, 0.5, crnn.FOUR_STEMS).chosen == []  # classified, nothing heard


def test_write_selection_manifest_and_no_silent_overwrite(tmp_path):
    stems = {s: torch.randn(2, 800) * 0.1 for s in crnn.FOUR_STEMS}
    separation = separator.Separation(stems, RATE)
    selection = stem_selection.select_stems({"voice": 0.9, "drums": 0.6}, 0.5, crnn.FOUR_STEMS)
    folder = stem_selection.write_selection(tmp_path, "song", separation, selection, {"input": "song.wav"})
    assert sorted(p.name for p in folder.iterdir()) == ["drums.wav", "manifest.json", "vocals.wav"]
    audio, rate = sf.read(folder / "vocals.wav", always_2d=True)
    assert rate == RATE and np.allclose(audio.T, stems["vocals"].numpy(), atol=1e-7)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["chosen"] == ["drums", "vocals"] and manifest["scores"] == {"voice": 0.9, "drums": 0.6}
    assert manifest["mapping"]["guitar"] == "other" and manifest["input"] == "song.wav"
    assert any("guitar is inside 'other'" in line for line in manifest["limits"])
    assert set(manifest["reasons"]) == set(crnn.FOUR_STEMS)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        stem_selection.write_selection(tmp_path, "song", separation, selection)
    fewer = stem_selection.select_stems({"voice": 0.9}, 0.5, crnn.FOUR_STEMS)
    stem_selection.write_selection(tmp_path, "song", separation, fewer, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "vocals.wav"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


# --------------------------------------------------------------------------- Demucs


def test_demucs_from_a_local_folder(tmp_path):
    repo = tiny_demucs_repo(tmp_path / "demucs")
    model = separator.load_demucs("tinysig", repo)
    bag = separator.load_demucs("tinybag", repo)
    assert separator.max_segment(model) == 1 and separator.max_segment(bag) == 1
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[-1]))
    wave = 0.1 * torch.randn(1, round(3.5 * 16000))  # mono, another rate, 3.5 segments long
    result = separator.separate(model, wave, 16000, segment_seconds=5.0)  # more than HTDemucs allows: capped
    assert list(result.stems) == list(crnn.FOUR_STEMS) and result.sample_rate == RATE
    assert all(stem.shape == (2, round(3.5 * RATE)) for stem in result.stems.values())
    assert len(calls) > 3 and max(calls) <= RATE  # segment by segment, never the whole file
    assert separator.separate(bag, wave, 16000).stems["vocals"].shape == (2, round(3.5 * RATE))

    with pytest.raises(ValueError, match=r"tinysig-.*\.th"):
        separator.load_demucs("missing", repo)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        separator.load_demucs("tinysig", tmp_path / "nowhere")


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def profile(tmp_path):
    repo = tiny_demucs_repo(tmp_path / "demucs")
    return write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'outputs'}\n"
                                   f"separation: {{demucs_name: tinysig, demucs_repo: {repo}}}\n", "sep")


@pytest.fixture
def crnn_checkpoint(tmp_path):
    return crnn.save_crnn(tiny_crnn(), tmp_path / "crnn.pt")


@pytest.fixture
def classifier(profile, tmp_path):
    stats = NormStats(torch.full((128,), -6.0), torch.full((128,), 3.0), 1, [], "f", "d")
    model = students.build_student(load_params(profile), list(OPENMIC_CLASSES), stats, multilabel=True)
    return checkpoints.save_checkpoint(model.eval(), tmp_path / "tagger.pt")


def test_cli_selects_stems_and_never_overwrites_silently(profile, crnn_checkpoint, classifier, tmp_path, capsys):
    song = save_audio(tmp_path / "song.wav", 0.1 * torch.randn(2, 44100), 44100)  # 1 s, stereo, another rate
    out = tmp_path / "out"
    command = ["separate", str(song), "--out", str(out), "--separator", str(crnn_checkpoint), "--model",
               str(classifier), "--profile", str(profile)]
    assert main([*command, "--threshold", "0"]) == 0
    assert sorted(p.name for p in (out / "song").iterdir()) == ["bass.wav", "drums.wav", "manifest.json",
                                                                "other.wav", "vocals.wav"]
    manifest = json.loads((out / "song" / "manifest.json").read_text())
    assert set(manifest["scores"]) == set(OPENMIC_CLASSES) and manifest["seconds"] == 1.0
    assert sf.info(out / "song" / "drums.wav").frames == RATE and sf.info(out / "song" / "drums.wav").channels == 2

    assert main([*command, "--threshold", "1"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*command, "--threshold", "1", "--overwrite"]) == 0
    assert [p.name for p in (out / "song").iterdir()] == ["manifest.json"]  # nothing heard: nothing handed over
    assert "no stems" in capsys.readouterr().out


def test_a_hand_over_made_before_with_the_same_inputs_is_kept(profile, crnn_checkpoint, classifier, tmp_path,
                                                               monkeypatch):
    song = save_audio(tmp_path / "song.wav", 0.1 * torch.randn(1, RATE), RATE)
    sep, tagger = crnn.load_crnn(crnn_checkpoint), checkpoints.load_checkpoint(classifier)
    sp = load_params(profile).separation.model_copy(update={"threshold": 0.0})
    info = {"input": str(song), "classifier": {"run_id": "a"}}
    made = stem_selection.separate_and_choose(sep, tagger, song, tmp_path / "out", "song", sp, info)
    assert made["chosen"] == list(sep.sources) and made["classifier"] == {"run_id": "a"}
    with monkeypatch.context() as patch:
        patch.setattr(stem_selection, "separate", lambda *args, **kwargs: pytest.fail("separated again"))
        assert stem_selection.separate_and_choose(sep, tagger, song, tmp_path / "out", "song", sp, info) == made
    other = stem_selection.separate_and_choose(sep, tagger, song, tmp_path / "out", "song", sp,
                                               {**info, "classifier": {"run_id": "b"}})  # another detector
    assert other["classifier"] == {"run_id": "b"}


def test_cli_bad_silent_and_long_inputs(profile, crnn_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    command = ["--out", str(out), "--separator", str(crnn_checkpoint), "--profile", str(profile)]
    silent = save_audio(tmp_path / "silent.wav", torch.zeros(1, RATE), RATE)
    missing = tmp_path / "missing.wav"
    assert main(["separate", str(silent), str(missing), *command]) == 1
    captured = capsys.readouterr()
    assert "silent" in captured.out and "no such audio file" in captured.err and not out.exists()

    # Ten minutes go through in 10 s segments: the network never holds the whole file.
    seconds, lengths = 600, []
    forward = crnn.MaskCRNN.forward
    monkeypatch.setattr(crnn.MaskCRNN, "forward", lambda self, mix: lengths.append(mix.shape[-1]) or
                        forward(self, mix))
    long = save_audio(tmp_path / "long.wav", 0.1 * torch.randn(1, seconds * RATE), RATE)
    assert main(["separate", str(long), *command]) == 0
    assert max(lengths) <= separator.CRNN_SEGMENT_SECONDS * RATE and len(lengths) > seconds / 10
    assert sf.info(out / "long" / "vocals.wav").frames == seconds * RATE
    manifest = json.loads((out / "long" / "manifest.json").read_text())
    assert manifest["threshold"] is None and manifest["classifier"] is None


def test_cli_with_demucs_from_the_profile_folder(profile, tmp_path, capsys):
    song = save_audio(tmp_path / "short.flac", 0.1 * torch.randn(1, 8000), 8000)
    assert main(["separate", str(song), "--out", str(tmp_path / "out"), "--separator", "demucs", "--all-stems",
                 "--profile", str(profile)]) == 0
    assert len(list((tmp_path / "out" / "short").glob("*.wav"))) == 4
    assert main(["separate", str(song), str(song), "--out", str(tmp_path / "x"), "--separator", "demucs",
                 "--profile", str(profile)]) == 1
    assert "collide" in capsys.readouterr().err
