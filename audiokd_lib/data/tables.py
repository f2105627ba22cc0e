"""The clip tables every later notebook reads: one row per clip (path, labels, split, source).

Tables are saved under outputs/<profile>/data/ (`clips.csv` for notes, `pieces.csv` for pieces, a real
dataset's multi-label tables under their own names), paths inside the profile folder relative to it.
Real datasets keep their own splits (:mod:`~audiokd_lib.data.real`); rendered data is split here:
:func:`split_notes` keeps all dynamics of one (instrument, pitch) in one split, :func:`split_pieces`
splits whole pieces, and every clip of the held-out soundfont goes to `heldout`. :func:`fingerprint`
hashes what a model learns from (files, labels, splits), for caches and runs to key on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from audiokd_lib.core.files import write_csv, write_json
from audiokd_lib.core.params import DataParams, Params
from audiokd_lib.data import synth
from audiokd_lib.data.notes import NotesReport, read_tinysol_metadata, render_notes
from audiokd_lib.data.pieces import PiecesReport, read_pieces, render_pieces
from audiokd_lib.data.real import RealData

FALLBACK_SOUNDFONT = "TimGM6mb"  # ships inside the pretty_midi wheel, so pip alone provides it


@dataclass
class SoundfontPlan:
    """Which soundfont files play which role, and what had to be substituted on this machine."""

    train: dict[str, Path]
    heldout: tuple[str, Path] | None
    notices: list[str] = field(default_factory=list)
    transfer: dict[str, Path] = field(default_factory=dict)  # unlabelled timbres for distillation


def plan_soundfonts(dp: DataParams) -> SoundfontPlan:
    """Find the profile's soundfonts; substitute TimGM6mb for missing ones only if allowed, and say so."""
    notices: list[str] = []

    def find(name: str) -> Path | None:
        path = synth.find_soundfont(name)
        if path is None and not dp.allow_fallback_soundfont:
            synth.require_soundfont(name)  # raises, saying where it looked and what to install
        if path is None:
            notices.append(f"soundfont {name} is not installed: {synth.install_hint(name)}")
        return path

    train = {name: path for name in dp.train_soundfonts if (path := find(name)) is not None}
    if not train:
        train = {FALLBACK_SOUNDFONT: synth.require_soundfont(FALLBACK_SOUNDFONT)}
        notices.append(f"training soundfonts replaced by {FALLBACK_SOUNDFONT} (lower quality)")
    heldout = None
    if dp.heldout_soundfont is not None:
        path = find(dp.heldout_soundfont)
        if path is not None and dp.heldout_soundfont not in train:
            heldout = (dp.heldout_soundfont, path)
        elif path is None and FALLBACK_SOUNDFONT not in train:
            heldout = (FALLBACK_SOUNDFONT, synth.require_soundfont(FALLBACK_SOUNDFONT))
            notices.append(f"held-out soundfont replaced by {FALLBACK_SOUNDFONT}")
        else:
            notices.append("no held-out soundfont left that differs from the training ones: no `heldout` split")
    # A transfer soundfont is never substituted: the fallback may be the held-out or a training timbre.
    transfer = {}
    for name in dp.transfer_soundfonts:
        if (path := synth.find_soundfont(name)) is None:
            notices.append(f"transfer soundfont {name} is not installed ({synth.install_hint(name)}): no transfer set")
        elif heldout is not None and name == heldout[0]:
            notices.append(f"transfer soundfont {name} stands in for the held-out one here: not used for transfer")
        elif name not in train:
            transfer[name] = path
    return SoundfontPlan(train, heldout, notices, transfer)


def data_dir(params: Params) -> Path:
    """Folder holding the profile's rendered or downloaded data."""
    return params.output_dir / "data"


def render_notes_dataset(params: Params, plan: SoundfontPlan, progress: bool = True) -> NotesReport:
    """Render (or resume rendering) the single-note dataset of the profile."""
    dp = params.data
    soundfonts = {**plan.train, **plan.transfer}
    if plan.heldout is not None:
        soundfonts[plan.heldout[0]] = plan.heldout[1]
    return render_notes(
        data_dir(params) / "notes", soundfonts, instruments=dp.notes.instruments, dynamics=dp.notes.dynamics,
        pitch_step=dp.notes.pitch_step, seconds=dp.notes.seconds, sample_rate=dp.sample_rate,
        backend=dp.synth, progress=progress,
    )


def render_pieces_dataset(params: Params, plan: SoundfontPlan, progress: bool = True) -> list[PiecesReport]:
    """Render (or resume) the pieces with stems: training soundfonts, then the held-out one."""
    dp, reports = params.data, []
    jobs = [(name, path, dp.pieces.count) for name, path in plan.train.items()]
    if plan.heldout is not None:
        jobs.append((*plan.heldout, dp.pieces.heldout_count))
    first_index = 0
    for name, path, count in jobs:
        if count == 0:
            continue
        # Consecutive indices: every piece, held-out ones included, is a different composition.
        reports.append(render_pieces(
            data_dir(params) / "pieces" / name, name, path, count=count, seconds=dp.pieces.seconds,
            sample_rate=dp.pieces.sample_rate, seed=params.seed, first_index=first_index,
            backend=dp.synth, progress=progress,
        ))
        first_index += count
    return reports


def _start_splits(table: pd.DataFrame, heldout: str | None) -> tuple[pd.DataFrame, pd.Series]:
    table = table.copy()
    is_heldout = table["soundfont"] == heldout
    table["split"] = np.where(is_heldout, "heldout", "train")
    return table, is_heldout


def split_notes(table: pd.DataFrame, val_fraction: float, test_fraction: float, heldout: str | None,
                seed: int, transfer: Iterable[str] = ()) -> pd.DataFrame:
    """Assign train/val/test by (instrument, pitch) groups within each label; heldout by soundfont.

    Notes of the `transfer` soundfonts form the `transfer` split, kept only at (instrument, pitch)
    groups of the train split, so that no validation or test note is heard in any timbre in training.
    """
    rng = np.random.default_rng(seed)
    table, is_heldout = _start_splits(table, heldout)
    is_transfer = table["soundfont"].isin(list(transfer))
    for _, rows in table[~is_heldout & ~is_transfer].groupby("label", sort=True):
        pitches = rng.permutation(np.sort(rows["pitch_id"].unique()))
        n_test = round(len(pitches) * test_fraction)
        n_val = round(len(pitches) * val_fraction)
        test, val = set(pitches[:n_test]), set(pitches[n_test:n_test + n_val])
        table.loc[rows.index[rows["pitch_id"].isin(test)], "split"] = "test"
        table.loc[rows.index[rows["pitch_id"].isin(val)], "split"] = "val"
    if is_transfer.any():
        trained = set(table.loc[table["split"].eq("train") & ~is_heldout & ~is_transfer, ["label", "pitch_id"]]
                      .itertuples(index=False, name=None))
        keys = list(zip(table["label"], table["pitch_id"]))
        at_training_pitch = pd.Series([key in trained for key in keys], index=table.index)
        table.loc[is_transfer, "split"] = "transfer"
        table = table[~is_transfer | at_training_pitch].copy()
    return table


def split_pieces(table: pd.DataFrame, val_fraction: float, test_fraction: float, heldout: str | None,
                 seed: int) -> pd.DataFrame:
    """Assign train/val/test to whole pieces at random; held-out-soundfont pieces to heldout."""
    rng = np.random.default_rng(seed)
    table, is_heldout = _start_splits(table, heldout)
    order = rng.permutation(table.index[~is_heldout].to_numpy().copy())  # pandas may hand out a read-only view
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    table.loc[order[:n_test], "split"] = "test"
    table.loc[order[n_test:n_test + n_val], "split"] = "val"
    return table


def solo_stems(pieces: pd.DataFrame, per_piece: int, seed: int) -> pd.DataFrame:
    """Single instruments of the pieces, as clips of their own: `per_piece` stems of each piece (fewer
    when it has fewer), each labelled with its one instrument and kept in its piece's split.

    A detector trained on full pieces only hears instruments in company, and one that plays in most
    pieces (bass, voice) becomes a safe guess on anything; solo stems show it what one instrument alone
    sounds like. The choice of stems is fixed by `seed`.
    """
    rng, rows = np.random.default_rng(seed), []
    for piece in pieces.itertuples():
        stems = sorted(Path(piece.stems_dir).glob("*.flac"))
        for stem in rng.permutation(len(stems))[:per_piece]:
            label = re.sub(r"_\d+$", "", stems[stem].stem)  # a second part of one instrument is "<class>_2"
            rows.append({"path": str(stems[stem]), "labels": label, "soundfont": piece.soundfont,
                         "source": "solo_stems", "sample_key": f"{piece.sample_key}/{stems[stem].stem}",
                         "split": piece.split})
    return pd.DataFrame(rows, columns=["path", "labels", "soundfont", "source", "sample_key", "split"])


def fingerprint(table: pd.DataFrame) -> str:
    """Short hash of what a model learns from: each clip's file, labels and split."""
    label_column = "label" if "label" in table else "labels"
    rows = table.sort_values("path")[["path", label_column, "split"]].astype(str)
    blob = "\n".join("\t".join(row) for row in rows.itertuples(index=False))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _relative(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Paths inside the profile folder made relative to it; others (the download cache) stay absolute."""
    table, root = table.copy(), root.resolve()
    for column in ("path", "stems_dir"):
        if column in table:
            paths = [Path(p).resolve() for p in table[column]]
            table[column] = [str(p.relative_to(root) if p.is_relative_to(root) else p) for p in paths]
    return table


def save_clip_table(params: Params, table: pd.DataFrame, name: str) -> Path:
    """Save a clip table under outputs/<profile>/data/, paths relative to the profile folder where they lie in it."""
    return write_csv(data_dir(params) / f"{name}.csv", _relative(table, params.output_dir))


def load_clip_table(params: Params, name: str = "clips") -> pd.DataFrame:
    """Read a clip table saved by notebook 01 ('clips' for notes, 'pieces' for pieces)."""
    path = data_dir(params) / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no clip table yet; run notebook 01_data for profile {params.profile} first")
    table = pd.read_csv(path, keep_default_na=False)
    for column in ("path", "stems_dir"):
        if column in table:
            table[column] = [str(params.output_dir / p) for p in table[column]]
    return table


def build_clip_tables(params: Params, plan: SoundfontPlan, real: RealData | None = None
                      ) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """Save clips.csv (the rendered notes, split here, or `real`'s single-label table), pieces.csv and a manifest.

    A real dataset's multi-label tables are saved under their own names (e.g. openmic.csv). Returns
    the clips table (None when the real dataset has no single-label table) and the pieces table.
    """
    dp, heldout = params.data, plan.heldout[0] if plan.heldout else None
    extra = {} if real is None else {name: t for name, t in real.tables.items() if name != "clips"}
    if real is None:
        notes = read_tinysol_metadata(data_dir(params) / "notes")
        notes = split_notes(notes, dp.notes.val_fraction, dp.notes.test_fraction, heldout, params.seed,
                            transfer=plan.transfer)
    else:
        notes = real.tables.get("clips")
    pieces_root = data_dir(params) / "pieces"
    piece_tables = [read_pieces(folder) for folder in sorted(pieces_root.glob("*")) if folder.is_dir()]
    pieces = pd.concat(piece_tables, ignore_index=True) if piece_tables else pd.DataFrame(
        columns=["path", "labels", "soundfont", "source", "sample_key", "stems_dir"])
    pieces = split_pieces(pieces, dp.pieces.val_fraction, dp.pieces.test_fraction, heldout, params.seed)
    if notes is not None:
        save_clip_table(params, notes, "clips")
    else:  # a clips.csv of an earlier run would be trained on by mistake
        (data_dir(params) / "clips.csv").unlink(missing_ok=True)
    for name, table in extra.items():
        save_clip_table(params, table, name)
    save_clip_table(params, pieces, "pieces")
    write_json(data_dir(params) / "manifest.json", {
        "profile": params.profile,
        "dataset": dp.dataset,
        "download": None if real is None else {key: real.manifest[key] for key in (
            "title", "licence", "record", "request", "classes", "archives", "fetched_bytes", "too_long")},
        "tables": {name: {"rows": len(t), "fingerprint": fingerprint(t) if len(t) else None,
                          "splits": t["split"].value_counts().to_dict()} for name, t in extra.items()},
        "train_soundfonts": {name: str(path) for name, path in plan.train.items()},
        "heldout_soundfont": heldout,
        "transfer_soundfonts": {name: str(path) for name, path in plan.transfer.items()},
        "notices": plan.notices,
        "clips": None if notes is None else {"rows": len(notes), "fingerprint": fingerprint(notes),
                                             "splits": notes["split"].value_counts().to_dict()},
        "pieces": {"rows": len(pieces), "fingerprint": fingerprint(pieces) if len(pieces) else None,
                   "splits": pieces["split"].value_counts().to_dict()},
    })
    return notes, pieces
