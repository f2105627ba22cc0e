"""Clip tables: soundfont roles, splits without leakage, fingerprints."""

from __future__ import annotations

import pandas as pd
import pytest

from audiokd_lib.core.params import DataParams
from audiokd_lib.data import synth, tables


def notes_table(soundfonts=("FluidR3_GM", "MuseScore_General")) -> pd.DataFrame:
    rows = [
        {"path": f"{sf}/{label}/{pitch}-{dyn}.flac", "label": label, "pitch_id": pitch, "dynamics": dyn, "soundfont": sf}
        for sf in soundfonts for label in ("Flute", "Violin", "Trumpet in C")
        for pitch in range(60, 80) for dyn in ("pp", "mf", "ff")
    ]
    return pd.DataFrame(rows)


def test_note_splits_keep_every_pitch_in_one_split():
    table = tables.split_notes(notes_table(), 0.15, 0.15, "MuseScore_General", seed=0)
    known = table[table["soundfont"] == "FluidR3_GM"]
    assert (known.groupby(["label", "pitch_id"])["split"].nunique() == 1).all()
    assert set(table.loc[table["soundfont"] == "MuseScore_General", "split"]) == {"heldout"}
    fractions = known["split"].value_counts(normalize=True)
    assert fractions["test"] == pytest.approx(0.15, abs=0.03) and fractions["val"] == pytest.approx(0.15, abs=0.03)
    for _, rows in known.groupby("label"):  # stratified: every class in every split
        assert set(rows["split"]) == {"train", "val", "test"}


def test_splits_are_deterministic_and_seeded():
    a = tables.split_notes(notes_table(), 0.15, 0.15, "MuseScore_General", seed=0)
    b = tables.split_notes(notes_table(), 0.15, 0.15, "MuseScore_General", seed=0)
    c = tables.split_notes(notes_table(), 0.15, 0.15, "MuseScore_General", seed=1)
    assert tables.fingerprint(a) == tables.fingerprint(b) != tables.fingerprint(c)


def test_piece_splits():
    pieces = pd.DataFrame({"path": [f"p{i}" for i in range(50)], "labels": "piano",
                           "soundfont": ["FluidR3_GM"] * 40 + ["MuseScore_General"] * 10})
    table = tables.split_pieces(pieces, 0.1, 0.1, "MuseScore_General", seed=0)
    assert table["split"].value_counts().to_dict() == {"train": 32, "heldout": 10, "val": 4, "test": 4}


def test_missing_soundfonts_fall_back_loudly(monkeypatch):
    real = synth.find_soundfont
    monkeypatch.setattr(synth, "find_soundfont", lambda name: real(name) if name == "TimGM6mb" else None)
    plan = tables.plan_soundfonts(DataParams())
    assert list(plan.train) == ["TimGM6mb"]
    assert plan.heldout is None
    assert any("FluidR3_GM is not installed" in n and "apt-get install" in n for n in plan.notices)
    with pytest.raises(synth.SoundfontNotFound, match="FluidR3_GM"):
        tables.plan_soundfonts(DataParams(allow_fallback_soundfont=False))


def test_heldout_soundfont_is_substituted_when_missing(monkeypatch):
    real = synth.find_soundfont
    monkeypatch.setattr(synth, "find_soundfont", lambda name: None if name == "MuseScore_General" else real(name))
    if real("FluidR3_GM") is None:
        pytest.skip("FluidR3_GM is not installed")
    plan = tables.plan_soundfonts(DataParams())
    assert plan.heldout[0] == "TimGM6mb"
    assert any("held-out soundfont replaced" in n for n in plan.notices)


def test_transfer_notes_only_at_training_pitches_and_never_the_heldout_soundfont():
    table = tables.split_notes(notes_table(("FluidR3_GM", "MuseScore_General", "TimGM6mb")), 0.15, 0.15,
                               "MuseScore_General", seed=0, transfer=["TimGM6mb"])
    transfer = table[table["split"] == "transfer"]
    assert set(transfer["soundfont"]) == {"TimGM6mb"} and len(transfer) > 0
    assert set(table.loc[table["soundfont"] == "MuseScore_General", "split"]) == {"heldout"}
    labelled = table[table["soundfont"] == "FluidR3_GM"]
    trained = set(labelled.loc[labelled["split"] == "train", ["label", "pitch_id"]].itertuples(index=False, name=None))
    held_back = set(labelled.loc[labelled["split"] != "train", ["label", "pitch_id"]].itertuples(index=False, name=None))
    assert set(transfer[["label", "pitch_id"]].itertuples(index=False, name=None)) == trained
    assert not held_back & set(table.loc[table["split"] == "transfer", ["label", "pitch_id"]]
                               .itertuples(index=False, name=None))
    # The labelled splits are the same as without a transfer set.
    plain = tables.split_notes(notes_table(), 0.15, 0.15, "MuseScore_General", seed=0)
    assert tables.fingerprint(table[table["split"] != "transfer"]) == tables.fingerprint(plain)


def test_transfer_soundfonts_refuse_the_heldout_and_training_ones():
    with pytest.raises(ValueError, match="held-out soundfont"):
        DataParams(heldout_soundfont="MuseScore_General", transfer_soundfonts=["MuseScore_General"])
    with pytest.raises(ValueError, match="training soundfonts too"):
        DataParams(train_soundfonts=["FluidR3_GM"], transfer_soundfonts=["FluidR3_GM"])
    assert DataParams(transfer_soundfonts=["TimGM6mb"]).transfer_soundfonts == ["TimGM6mb"]


def test_solo_stems_label_each_stem_with_its_one_instrument(tmp_path):
    rows = []
    for i, (stems, split) in enumerate([(["bass", "voice", "synthesizer", "synthesizer_2"], "train"),
                                        (["drums"], "val")]):
        folder = tmp_path / f"piece-{i}" / "stems"
        folder.mkdir(parents=True)
        for name in stems:
            (folder / f"{name}.flac").write_bytes(b"")
        rows.append({"path": str(folder.parent / "mixture.wav"), "labels": "|".join(stems), "soundfont": "sf",
                     "sample_key": f"piece-{i}", "stems_dir": str(folder), "split": split})
    pieces = pd.DataFrame(rows)
    solos = tables.solo_stems(pieces, per_piece=3, seed=0)
    assert solos["split"].tolist() == ["train"] * 3 + ["val"]  # at most 3 of a piece, in the piece's split
    every = tables.solo_stems(pieces, per_piece=4, seed=0)
    assert sorted(every.loc[every["split"] == "train", "labels"]) == ["bass", "synthesizer", "synthesizer", "voice"]
    assert all(path.endswith(".flac") and "|" not in label for path, label in zip(solos["path"], solos["labels"]))
    assert solos.equals(tables.solo_stems(pieces, per_piece=3, seed=0))  # the seed fixes the choice
    assert tables.solo_stems(pieces, per_piece=0, seed=0).empty
