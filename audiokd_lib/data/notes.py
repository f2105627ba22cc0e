"""Single notes like TinySOL, rendered from a General MIDI soundfont (notebooks 01-07).

TinySOL (Zenodo 3685367) holds 2,913 recordings of single notes played "ordinario" by 14 orchestral
instruments at several dynamics. We render the same grid of notes with a soundfont: every instrument,
every pitch of its real playing range, at pp / mf / ff. The files, folders and the metadata CSV copy
TinySOL's own layout and column names, so code written for the rendered notes reads the real dataset
unchanged (:func:`read_tinysol_metadata`). Labels are exact, but a soundfont has one sample set per
instrument: a model can learn that soundfont's timbres instead of the instrument, which is why a second
soundfont (MuseScore General) is kept as an unseen-timbre test set.

The renderer is resumable: files are written atomically (a temporary file, then a rename) and a second
run renders only what is missing or unreadable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from audiokd_lib.core.files import atomic_path, write_csv
from audiokd_lib.data.synth import Backend, NoteEvent, Synth, open_synth

# A render whose peak stays below this is treated as "the soundfont has no sample here".
SILENCE_DBFS = -60.0


_SILENCE_PEAK = 10 ** (SILENCE_DBFS / 20)


def is_silent(audio: np.ndarray) -> bool:
    """Tell whether a render never rises above SILENCE_DBFS."""
    return audio.size == 0 or float(np.max(np.abs(audio))) < _SILENCE_PEAK


def folder_size_mb(paths: Iterable[Path]) -> float:
    """Return the total size of existing files, in MB."""
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


# (a) Single notes, TinySOL-like


@dataclass(frozen=True)
class Instrument:
    """A TinySOL instrument: its names and folders in TinySOL, GM program and playable range."""

    abbr: str
    name: str
    family: str
    folder: str
    program: int
    lowest: int
    highest: int

    def pitches(self, step: int = 1) -> range:
        """Return the MIDI pitches of the playing range, every `step` semitones."""
        return range(self.lowest, self.highest + 1, step)


TINYSOL_INSTRUMENTS: dict[str, Instrument] = {
    i.abbr: i
    for i in (
        Instrument("BTb", "Bass Tuba", "Brass", "Bass_Tuba", 58, 28, 65),
        Instrument("Hn", "French Horn", "Brass", "Horn", 60, 35, 77),
        Instrument("Tbn", "Trombone", "Brass", "Trombone", 57, 40, 74),
        Instrument("TpC", "Trumpet in C", "Brass", "Trumpet_C", 56, 54, 86),
        Instrument("Acc", "Accordion", "Keyboards", "Accordion", 21, 41, 89),
        Instrument("Cb", "Contrabass", "Strings", "Contrabass", 43, 28, 67),
        Instrument("Vn", "Violin", "Strings", "Violin", 40, 55, 96),
        Instrument("Va", "Viola", "Strings", "Viola", 41, 48, 84),
        Instrument("Vc", "Violoncello", "Strings", "Violoncello", 42, 36, 76),
        Instrument("Bn", "Bassoon", "Winds", "Bassoon", 70, 34, 75),
        Instrument("ClBb", "Clarinet in Bb", "Winds", "Clarinet_Bb", 71, 50, 91),
        Instrument("Fl", "Flute", "Winds", "Flute", 73, 60, 96),
        Instrument("Ob", "Oboe", "Winds", "Oboe", 68, 58, 91),
        Instrument("ASax", "Alto Saxophone", "Winds", "Sax_Alto", 65, 49, 81),
    )
}


@dataclass(frozen=True)
class Dynamic:
    """A dynamic marking, the MIDI velocity we play it at, and TinySOL's Dynamics ID."""

    name: str
    velocity: int
    tinysol_id: int


# TinySOL numbers its dynamics pp=0, p=1, mf=2, f=3, ff=4; we render three of the five.
DYNAMICS: dict[str, Dynamic] = {
    d.name: d for d in (Dynamic("pp", 40, 0), Dynamic("mf", 80, 2), Dynamic("ff", 120, 4))
}


TINYSOL_COLUMNS = [
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


RENDERED_NOTE_COLUMNS = [*TINYSOL_COLUMNS, "Soundfont", "Velocity"]


TINYSOL_FOLDS = 5


# The note is held for this fraction of the clip, then released, so the clip contains the release.
HOLD_FRACTION = 0.75


_SILENT_COLUMNS = ["Soundfont", "Path", "Instrument (abbr.)", "Pitch ID", "Dynamics", "Velocity", "Peak dBFS"]


PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def pitch_name(midi: int) -> str:
    """Name a MIDI pitch the way TinySOL does: sharps, middle C (60) is C4."""
    return f"{PITCH_CLASSES[midi % 12]}{midi // 12 - 1}"


def note_path(soundfont: str, instrument: Instrument, midi: int, dynamic: str) -> str:
    """Return a rendered note's path relative to the dataset root, in TinySOL's layout."""
    name = f"{instrument.abbr}-ord-{pitch_name(midi)}-{dynamic}-N-N.flac"
    return f"{soundfont}/{instrument.family}/{instrument.folder}/ordinario/{name}"


@dataclass
class NotesReport:
    """What render_notes did: the metadata table, counts, audio length, time and disk use."""

    metadata: pd.DataFrame
    root: Path
    rendered: int
    reused: int
    silent: int
    repaired: int
    audio_seconds: float
    wall_seconds: float
    size_mb: float
    backend: str

    def summary(self) -> str:
        """Describe the run in one line."""
        return (
            f"{len(self.metadata)} notes, {self.audio_seconds / 60:.1f} min audio, {self.size_mb:.1f} MB: "
            f"{self.rendered} rendered, {self.reused} reused, {self.repaired} repaired, "
            f"{self.silent} silent dropped; {self.wall_seconds:.1f} s with {self.backend}"
        )


def _choose_instruments(instruments: str | Sequence[str]) -> list[Instrument]:
    """Resolve "all" or a list of TinySOL abbreviations, naming any unknown one."""
    if instruments == "all":
        return list(TINYSOL_INSTRUMENTS.values())
    if isinstance(instruments, str):
        instruments = [instruments]
    unknown = [a for a in instruments if a not in TINYSOL_INSTRUMENTS]
    if unknown:
        raise ValueError(f"Unknown TinySOL instruments {unknown}; known: {', '.join(TINYSOL_INSTRUMENTS)}")
    return [TINYSOL_INSTRUMENTS[a] for a in instruments]


def _readable(path: Path, frames: int, sample_rate: int) -> bool:
    """Tell whether an audio file decodes completely with the expected length and rate."""
    try:
        # A truncated FLAC keeps its header, so only a full decode finds the damage.
        audio, rate = sf.read(path, dtype="float32")
    except (sf.SoundFileError, OSError):
        return False
    return rate == sample_rate and len(audio) == frames


def quantise(audio: np.ndarray) -> np.ndarray:
    """Convert float audio to int16 the way soundfile reads it back (x = q / 32768)."""
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def _write_audio(path: Path, audio: np.ndarray, sample_rate: int, subtype: str) -> None:
    """Write one audio file atomically."""
    with atomic_path(path) as tmp:
        sf.write(tmp, audio, sample_rate, subtype=subtype)


def _read_silent(path: Path) -> pd.DataFrame:
    """Read the list of notes found silent by earlier runs (empty if none)."""
    if not path.is_file():
        return pd.DataFrame(columns=_SILENT_COLUMNS)
    return pd.read_csv(path)


def _assign_folds(frame: pd.DataFrame) -> pd.Series:
    """Give each note a fold 0-4, balanced within each instrument.

    All notes of one instrument and pitch (every dynamic, every soundfont) share a fold, so a test
    fold never holds a near-copy of a training note; consecutive pitches go round the folds.
    """
    folds = pd.Series(0, index=frame.index, dtype="int64")
    for _, group in frame.groupby("Instrument (abbr.)", sort=False):
        pitches = sorted(group["Pitch ID"].unique())
        rank = {p: i % TINYSOL_FOLDS for i, p in enumerate(pitches)}
        folds.loc[group.index] = group["Pitch ID"].map(rank).astype("int64")
    return folds


class OnDemandSynth:
    """Open a soundfont's synthesiser the first time a render needs it, one soundfont at a time.

    A dataset that is already complete then costs no soundfont loading (MuseScore General: seconds).
    """

    def __init__(self, sample_rate: int, backend: Backend) -> None:
        self.sample_rate = sample_rate
        self.backend = backend
        self.backends: set[str] = set()
        self._name: str | None = None
        self._synth: Synth | None = None

    def get(self, name: str, path: str | Path) -> Synth:
        """Return the synthesiser for a soundfont, closing the previous soundfont's."""
        if self._synth is None or self._name != name:
            self.close()
            self._synth = open_synth(Path(path), self.sample_rate, self.backend)
            self._name = name
            self.backends.add(self._synth.backend)
        return self._synth

    def used(self) -> str:
        """Name the backends that rendered anything."""
        return ", ".join(sorted(self.backends)) or "none needed"

    def close(self) -> None:
        """Free the open synthesiser, if any."""
        if self._synth is not None:
            self._synth.close()
            self._synth = None


def _silent_row(row: dict, audio: np.ndarray) -> dict:
    """Build the silent.csv row of a note that rendered silent."""
    peak = float(np.max(np.abs(audio)))
    return {
        "Soundfont": row["Soundfont"],
        "Path": row["Path"],
        "Instrument (abbr.)": row["Instrument (abbr.)"],
        "Pitch ID": row["Pitch ID"],
        "Dynamics": row["Dynamics"],
        "Velocity": row["Velocity"],
        "Peak dBFS": round(20 * math.log10(peak), 1) if peak > 0 else float("-inf"),
    }


def _metadata_row(soundfont: str, instrument: Instrument, midi: int, dynamic: Dynamic) -> dict:
    """Build one TinySOL-layout metadata row for a rendered note."""
    return {
        "Path": note_path(soundfont, instrument, midi, dynamic.name),
        "Fold": 0,
        "Family": instrument.family,
        "Instrument (abbr.)": instrument.abbr,
        "Instrument (in full)": instrument.name,
        "Technique (abbr.)": "ord",
        "Technique (in full)": "ordinario",
        "Pitch": pitch_name(midi),
        "Pitch ID": midi,
        "Dynamics": dynamic.name,
        "Dynamics ID": dynamic.tinysol_id,
        "Instance ID": 0,
        "String ID (if applicable)": "",
        # TinySOL spells its booleans the spreadsheet way.
        "Needed digital retuning": "FALSE",
        "Soundfont": soundfont,
        "Velocity": dynamic.velocity,
    }


def render_notes(
    out_dir: str | Path,
    soundfonts: dict[str, Path],
    *,
    instruments: str | Sequence[str] = "all",
    dynamics: Sequence[str] = ("pp", "mf", "ff"),
    pitch_step: int = 1,
    seconds: float = 2.0,
    sample_rate: int = 32000,
    backend: Backend = "auto",
    progress: bool = True,
) -> NotesReport:
    """Render TinySOL-like single notes for each soundfont and write TinySOL_metadata.csv.

    The CSV lists exactly the notes asked for in this call (pass every soundfont in one call to
    get one table). Notes already on disk and readable are reused; damaged ones are re-rendered
    ("repaired"); notes the soundfont cannot play are dropped and remembered in silent.csv.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = _choose_instruments(instruments)
    unknown = [d for d in dynamics if d not in DYNAMICS]
    if unknown:
        raise ValueError(f"Unknown dynamics {unknown}; known: {', '.join(DYNAMICS)}")
    if pitch_step < 1:
        raise ValueError(f"pitch_step must be at least 1, not {pitch_step}")
    jobs = [
        (soundfont, instrument, midi, DYNAMICS[d])
        for soundfont in soundfonts
        for instrument in chosen
        for midi in instrument.pitches(pitch_step)
        for d in dynamics
    ]
    frames = round(seconds * sample_rate)
    silent_csv = out_dir / "silent.csv"
    silent_table = _read_silent(silent_csv)
    known_silent = set(zip(silent_table["Soundfont"], silent_table["Path"]))
    found_silent: list[dict] = []
    rows: list[dict] = []
    counts = dict.fromkeys(("rendered", "reused", "silent", "repaired"), 0)
    synths = OnDemandSynth(sample_rate, backend)
    try:
        for soundfont, instrument, midi, dynamic in tqdm(jobs, "notes", unit="note", disable=not progress):
            row = _metadata_row(soundfont, instrument, midi, dynamic)
            if (soundfont, row["Path"]) in known_silent:
                counts["silent"] += 1
                continue
            target = out_dir / row["Path"]
            existed = target.exists()
            if existed and _readable(target, frames, sample_rate):
                counts["reused"] += 1
                rows.append(row)
                continue
            event = NoteEvent(0.0, HOLD_FRACTION * seconds, midi, dynamic.velocity, instrument.program)
            audio = synths.get(soundfont, soundfonts[soundfont]).render([event], seconds)
            if is_silent(audio):
                target.unlink(missing_ok=True)
                found_silent.append(_silent_row(row, audio))
                counts["silent"] += 1
                continue
            _write_audio(target, quantise(audio), sample_rate, "PCM_16")
            counts["repaired" if existed else "rendered"] += 1
            rows.append(row)
    finally:
        synths.close()
        if found_silent:
            found = pd.DataFrame(found_silent, columns=_SILENT_COLUMNS)
            if not silent_table.empty:
                found = pd.concat([silent_table, found], ignore_index=True)
            write_csv(silent_csv, found)

    metadata = pd.DataFrame(rows, columns=RENDERED_NOTE_COLUMNS)
    metadata["Fold"] = _assign_folds(metadata)
    write_csv(out_dir / "TinySOL_metadata.csv", metadata)
    return NotesReport(
        metadata=metadata,
        root=out_dir,
        audio_seconds=len(metadata) * seconds,
        wall_seconds=time.perf_counter() - started,
        size_mb=folder_size_mb(out_dir / p for p in metadata["Path"]),
        backend=synths.used(),
        **counts,
    )


_TINYSOL_REQUIRED = ["Path", "Fold", "Instrument (abbr.)", "Instrument (in full)", "Pitch ID", "Dynamics"]


def read_tinysol_metadata(root: str | Path, audio_root: str | Path | None = None) -> pd.DataFrame:
    """Read TinySOL_metadata.csv (the real TinySOL's or ours) into a clip table.

    `root` is the CSV itself or its folder; audio paths are resolved against `audio_root`, by
    default the CSV's folder. Columns: path, label, instrument, pitch_id, dynamics, fold,
    soundfont ("TinySOL" for the real recordings), source ("tinysol" or "rendered_notes").
    """
    root = Path(root)
    csv_path = root if root.is_file() else root / "TinySOL_metadata.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"No TinySOL metadata at {csv_path}")
    table = pd.read_csv(csv_path)
    for column in _TINYSOL_REQUIRED:
        if column not in table.columns:
            raise ValueError(
                f"{csv_path} has no column {column!r} (TinySOL's columns: {', '.join(TINYSOL_COLUMNS)})"
            )
    audio_root = Path(audio_root) if audio_root is not None else csv_path.parent
    rendered = "Soundfont" in table.columns
    return pd.DataFrame(
        {
            "path": [str((audio_root / p).resolve()) for p in table["Path"]],
            "label": table["Instrument (in full)"].astype(str),
            "instrument": table["Instrument (abbr.)"].astype(str),
            "pitch_id": table["Pitch ID"].astype("int64"),
            "dynamics": table["Dynamics"].astype(str),
            "fold": table["Fold"].astype("int64"),
            "soundfont": table["Soundfont"].astype(str) if rendered else "TinySOL",
            "source": "rendered_notes" if rendered else "tinysol",
        }
    )
