"""Tests for the soundfont synthesiser and the two rendered datasets (notes and pieces)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audiokd_lib.data import notes, pieces, synth, taxonomy
from audiokd_lib.data.notes import TINYSOL_INSTRUMENTS, read_tinysol_metadata, render_notes
from audiokd_lib.data.pieces import read_pieces, render_pieces

FLUIDR3 = synth.find_soundfont("FluidR3_GM")
TIMGM = synth.find_soundfont("TimGM6mb")
HAS_FLUIDSYNTH = synth.fluidsynth_available()
HAS_TINYSOUNDFONT = importlib.util.find_spec("tinysoundfont") is not None

needs_fluidr3 = pytest.mark.skipif(
    FLUIDR3 is None or not HAS_FLUIDSYNTH,
    reason="needs FluidSynth (apt-get install fluidsynth; pip install pyfluidsynth) and FluidR3_GM "
    "(apt-get install fluid-soundfont-gm)",
)

BACKENDS = [
    pytest.param("fluidsynth", FLUIDR3, marks=needs_fluidr3, id="fluidsynth-FluidR3"),
    pytest.param(
        "tinysoundfont",
        TIMGM,
        marks=pytest.mark.skipif(
            TIMGM is None or not HAS_TINYSOUNDFONT,
            reason="needs tinysoundfont (pip install --no-deps tinysoundfont) and TimGM6mb (in pretty_midi)",
        ),
        id="tinysoundfont-TimGM6mb",
    ),
]

# Written out here, not imported, so the test checks render.py against TinySOL itself.
TINYSOL_HEADER = [
    "Path",
    "Fold",
    "Family",
    "Instrument (abbr.)",
    "Instrument (in full)",
    "Technique (abbr.)",
    "Technique (in full)",
    "Pitch",
    "Pitch ID",
    "Dynamics",
    "Dynamics ID",
    "Instance ID",
    "String ID (if applicable)",
    "Needed digital retuning",
]
CLIP_COLUMNS = ["path", "label", "instrument", "pitch_id", "dynamics", "fold", "soundfont", "source"]
SMALL = {"seconds": 1.0, "sample_rate": 16000, "progress": False}
TUBA = "Brass/Bass_Tuba/ordinario/BTb-ord-A#0-ff-N-N.wav"
VIOLIN = "Strings/Violin/ordinario/Vn-ord-G3-pp-4c-N.wav"
OPENMIC = (
    "accordion banjo bass cello clarinet cymbals drums flute guitar mallet_percussion mandolin organ piano "
    "saxophone synthesizer trombone trumpet ukulele violin voice"
).split()


def yin_f0(audio: np.ndarray, sample_rate: int, fmin: float = 50.0, fmax: float = 2000.0) -> float:
    """Estimate the fundamental frequency with YIN (de Cheveigné & Kawahara 2002), median of frames."""
    window, threshold = 2048, 0.15
    max_lag, min_lag = int(sample_rate / fmin), int(sample_rate / fmax)
    starts = np.linspace(int(0.25 * sample_rate), int(1.1 * sample_rate) - window - max_lag, 6).astype(int)
    estimates = []
    for start in starts:
        frame = audio[start : start + window + max_lag].astype(np.float64)
        head = frame[:window]
        diff = np.array([np.sum((head - frame[lag : lag + window]) ** 2) for lag in range(max_lag + 1)])
        cmnd = np.ones_like(diff)
        cmnd[1:] = diff[1:] * np.arange(1, max_lag + 1) / np.maximum(np.cumsum(diff[1:]), 1e-12)
        below = np.nonzero(cmnd[min_lag:max_lag] < threshold)[0]
        if below.size == 0:
            continue
        lag = min_lag + int(below[0])
        while lag + 1 < max_lag and cmnd[lag + 1] < cmnd[lag]:
            lag += 1
        a, b, c = cmnd[lag - 1], cmnd[lag], cmnd[lag + 1]
        curvature = a - 2 * b + c
        estimates.append(sample_rate / (lag + (0.5 * (a - c) / curvature if curvature else 0.0)))
    assert estimates, "no periodic frame found"
    return float(np.median(estimates))


def cents(frequency: float, midi: int) -> float:
    return 1200 * np.log2(frequency / (440.0 * 2 ** ((midi - 69) / 12)))


# ---------------------------------------------------------------- synthesiser


def test_unknown_soundfont_lists_known_names():
    with pytest.raises(synth.SoundfontNotFound, match="FluidR3_GM"):
        synth.require_soundfont("NoSuchFont")


def test_missing_soundfont_says_how_to_install(monkeypatch, tmp_path):
    info = synth.SOUNDFONTS["FluidR3_GM"]
    nowhere = (tmp_path / "nothing.sf2",)
    missing = synth.SoundfontInfo(info.name, nowhere, info.debian_package, info.install_hint)
    monkeypatch.setitem(synth.SOUNDFONTS, "FluidR3_GM", missing)
    with pytest.raises(synth.SoundfontNotFound, match=r"apt-get install fluid-soundfont-gm") as error:
        synth.require_soundfont("FluidR3_GM")
    assert str(tmp_path / "nothing.sf2") in str(error.value)
    assert synth.install_hint("FluidR3_GM") == "sudo apt-get install fluid-soundfont-gm"


@pytest.mark.parametrize(("backend", "soundfont"), BACKENDS)
def test_notes_sound_at_their_pitch(backend, soundfont):
    played = [("Fl", 72), ("Vn", 69), ("ClBb", 67), ("TpC", 72)]
    with synth.open_synth(soundfont, 32000, backend) as player:
        assert player.backend == backend
        for abbr, midi in played:
            note = synth.NoteEvent(0.0, 1.5, midi, 80, TINYSOL_INSTRUMENTS[abbr].program)
            audio = player.render([note], 2.0)
            assert audio.dtype == np.float32 and audio.shape == (64000,)
            error = cents(yin_f0(audio, 32000), midi)
            assert abs(error) < 50, f"{abbr} MIDI {midi} is {error:.0f} cents off with {backend}"


@pytest.mark.parametrize(("backend", "soundfont"), BACKENDS)
def test_render_is_deterministic_and_leaves_no_tail(backend, soundfont):
    chord = [synth.NoteEvent(0.1 * i, 1.0 + 0.1 * i, 48 + 4 * i, 90, p) for i, p in enumerate((0, 19, 48))]
    drums = [synth.NoteEvent(0.25 * i, 0.25 * i + 0.1, 36 + i, 100, 0, is_drum=True) for i in range(6)]
    with synth.open_synth(soundfont, 22050, backend) as player:
        first = player.render(chord, 1.3)
        player.render(drums, 1.7)
        assert np.abs(player.render([], 0.5)).max() == 0.0
        again = player.render(chord, 1.3)
    assert first.shape == (round(1.3 * 22050),)
    assert np.array_equal(first, again)


# ---------------------------------------------------------------- single notes


@needs_fluidr3
def test_silent_notes_are_dropped_and_remembered(tmp_path):
    kwargs = {"instruments": ["Cb"], "dynamics": ("mf",), **SMALL}
    report = render_notes(tmp_path, {"FluidR3_GM": FLUIDR3}, **kwargs)
    silent = pd.read_csv(tmp_path / "silent.csv")
    # FluidR3's contrabass has no samples above MIDI 57.
    assert 64 in set(silent["Pitch ID"])
    assert set(silent["Pitch ID"]) == set(range(58, 68))
    assert report.silent == 10 and report.rendered == 30
    assert report.metadata["Pitch ID"].max() == 57
    assert not (tmp_path / notes.note_path("FluidR3_GM", TINYSOL_INSTRUMENTS["Cb"], 64, "mf")).exists()

    table = pd.read_csv(tmp_path / "TinySOL_metadata.csv")
    assert list(table.columns[: len(TINYSOL_HEADER)]) == TINYSOL_HEADER
    assert list(table.columns[len(TINYSOL_HEADER) :]) == ["Soundfont", "Velocity"]
    assert set(table["Fold"]) == set(range(5))
    assert table.groupby("Fold").size().max() - table.groupby("Fold").size().min() <= 1

    again = render_notes(tmp_path, {"FluidR3_GM": FLUIDR3}, **kwargs)
    assert (again.rendered, again.silent, again.reused) == (0, 10, 30)
    assert again.backend == "none needed"


@needs_fluidr3
def test_resume_renders_nothing_new_and_repairs_a_truncated_file(tmp_path):
    kwargs = {"instruments": ["Fl"], "dynamics": ("mf",), "pitch_step": 6, "backend": "fluidsynth", **SMALL}
    first = render_notes(tmp_path, {"FluidR3_GM": FLUIDR3}, **kwargs)
    assert first.rendered == 7 and first.reused == 0
    second = render_notes(tmp_path, {"FluidR3_GM": FLUIDR3}, **kwargs)
    assert (second.rendered, second.reused, second.repaired) == (0, 7, 0)

    damaged = tmp_path / first.metadata["Path"].iloc[3]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    third = render_notes(tmp_path, {"FluidR3_GM": FLUIDR3}, **kwargs)
    assert (third.rendered, third.reused, third.repaired) == (0, 6, 1)
    audio, rate = sf.read(damaged, dtype="float32")
    assert rate == 16000 and len(audio) == 16000
    assert "7 notes" in third.summary()


@needs_fluidr3
def test_file_names_match_the_pitch_played(tmp_path):
    report = render_notes(
        tmp_path,
        {"FluidR3_GM": FLUIDR3},
        instruments=["Ob"],
        dynamics=("ff",),
        pitch_step=12,
        seconds=2.0,
        sample_rate=16000,
        progress=False,
    )
    row = report.metadata.set_index("Pitch ID").loc[70]
    assert row["Pitch"] == "A#4" and Path(row["Path"]).name == "Ob-ord-A#4-ff-N-N.flac"
    audio, rate = sf.read(tmp_path / row["Path"], dtype="float32")
    assert abs(cents(yin_f0(audio, rate), 70)) < 50


@needs_fluidr3
def test_real_and_rendered_tinysol_read_to_the_same_table(tmp_path):
    rendered_root = tmp_path / "rendered"
    fluidr3 = {"FluidR3_GM": FLUIDR3}
    render_notes(rendered_root, fluidr3, instruments=["Vn"], dynamics=("pp",), pitch_step=20, **SMALL)
    real_root = tmp_path / "TinySOL"
    real_root.mkdir()
    # Two rows in the real dataset's layout (its booleans are spelled TRUE/FALSE, audio is .wav).
    (real_root / "TinySOL_metadata.csv").write_text(
        ",".join(TINYSOL_HEADER)
        + "\n"
        + f"{TUBA},2,Brass,BTb,Bass Tuba,ord,ordinario,A#0,22,ff,4,0,,FALSE\n"
        + f"{VIOLIN},0,Strings,Vn,Violin,ord,ordinario,G3,55,pp,0,0,4,TRUE\n"
    )
    real = read_tinysol_metadata(real_root)
    ours = read_tinysol_metadata(rendered_root)
    assert list(real.columns) == list(ours.columns) == CLIP_COLUMNS
    assert real["source"].eq("tinysol").all() and real["soundfont"].eq("TinySOL").all()
    assert ours["source"].eq("rendered_notes").all() and ours["soundfont"].eq("FluidR3_GM").all()
    assert real["path"].iloc[0] == str((real_root / TUBA).resolve())
    assert list(real["label"]) == ["Bass Tuba", "Violin"] and list(real["pitch_id"]) == [22, 55]
    assert ours["label"].eq("Violin").all() and all(Path(p).is_file() for p in ours["path"])
    assert real.dtypes.equals(ours.dtypes)


def test_tinysol_metadata_errors_name_the_file_and_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="TinySOL_metadata.csv"):
        read_tinysol_metadata(tmp_path)
    (tmp_path / "TinySOL_metadata.csv").write_text("Path,Fold\na.wav,0\n")
    with pytest.raises(ValueError, match=r"TinySOL_metadata\.csv.*'Instrument \(abbr\.\)'"):
        read_tinysol_metadata(tmp_path)


# ---------------------------------------------------------------- pieces with stems


def _read(path: Path) -> np.ndarray:
    return sf.read(path, dtype="float32")[0]


@needs_fluidr3
def test_pieces_have_exact_stems_groups_and_labels(tmp_path):
    kwargs = {"count": 3, "seconds": 3.0, "sample_rate": 16000, "progress": False}
    report = render_pieces(tmp_path / "a", "FluidR3_GM", FLUIDR3, seed=0, **kwargs)
    assert report.rendered == 3
    table = pd.read_csv(tmp_path / "a" / "pieces.csv")
    assert list(table.columns) == ["sample_key", "soundfont", "mixture", "instruments", *OPENMIC]
    assert len(OPENMIC) == 20 and set(taxonomy.OPENMIC_CLASSES) == set(OPENMIC)

    for row in table.itertuples():
        folder = tmp_path / "a" / row.sample_key
        stems = {p.stem: p for p in (folder / "stems").glob("*.flac")}
        assert sorted(stems) == sorted(row.instruments.split("|"))
        assert all(sf.info(p).subtype == "PCM_16" for p in stems.values())
        assert sf.info(folder / "mixture.wav").subtype == "PCM_24"
        mixture = _read(folder / "mixture.wav")
        assert len(mixture) == 48000 and np.abs(mixture).max() < 1.0
        assert np.abs(sum(_read(p) for p in stems.values()) - mixture).max() < 1e-6
        groups = {g: _read(folder / "groups" / f"{g}.flac") for g in ("drums", "bass", "vocals", "other")}
        assert np.abs(sum(groups.values()) - mixture).max() < 1e-6
        if "drums" in stems:
            assert np.array_equal(groups["drums"], _read(stems["drums"]))
        else:
            assert not groups["drums"].any()
        classes = {name.split("_")[0] if name.split("_")[-1].isdigit() else name for name in stems}
        present = {c for c in taxonomy.OPENMIC_CLASSES if getattr(row, c) == 1}
        assert classes == present

    clips = read_pieces(report.root)
    assert list(clips.columns) == ["path", "labels", "soundfont", "source", "sample_key", "stems_dir"]
    assert all(Path(p).is_file() for p in clips["path"]) and clips["source"].eq("rendered_pieces").all()

    same = render_pieces(tmp_path / "b", "FluidR3_GM", FLUIDR3, seed=0, **kwargs)
    other = render_pieces(tmp_path / "c", "FluidR3_GM", FLUIDR3, seed=1, **kwargs)
    assert list(same.metadata["instruments"]) == list(report.metadata["instruments"])
    for key in table["sample_key"]:
        mixture = (tmp_path / "a" / key / "mixture.wav").read_bytes()
        assert (tmp_path / "b" / key / "mixture.wav").read_bytes() == mixture
        assert (tmp_path / "c" / key / "mixture.wav").read_bytes() != mixture
    assert other.rendered == 3

    resumed = render_pieces(tmp_path / "a", "FluidR3_GM", FLUIDR3, seed=0, **kwargs)
    assert (resumed.rendered, resumed.reused) == (0, 3)
    with pytest.raises(ValueError, match="other settings"):
        render_pieces(tmp_path / "a", "FluidR3_GM", FLUIDR3, seed=5, **kwargs)


def test_pieces_are_composed_from_seed_and_index_alone():
    first = pieces.compose_piece(0, 7, 10.0)
    assert pieces.compose_piece(0, 7, 10.0) == first
    assert pieces.compose_piece(0, 8, 10.0) != first
    for index in range(40):
        piece = pieces.compose_piece(3, index, 10.0)
        assert piece.parts, "a piece is never empty"
        assert len({p.stem for p in piece.parts}) == len(piece.parts)
        for part in piece.parts:
            assert part.events and all(0 <= e.start < 10.0 and e.end > e.start for e in part.events)
            assert all(e.is_drum == part.instrument.is_drum for e in part.events)
