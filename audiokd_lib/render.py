"""The two embedded datasets, rendered from General MIDI soundfonts so that no download is needed.

Single notes, TinySOL-like (notebooks 01-07)
    TinySOL (Zenodo 3685367) holds 2,913 recordings of single notes played "ordinario" by 14
    orchestral instruments at several dynamics. We render the same grid of notes with a soundfont:
    every instrument, every pitch of its real playing range, at pp / mf / ff. The files, folders
    and the metadata CSV copy TinySOL's own layout and column names, so code written for the
    rendered notes reads the real dataset unchanged (`read_tinysol_metadata`). Labels are exact,
    but a soundfont has one sample set per instrument: a model can learn that soundfont's timbres
    instead of the instrument, which is why a second soundfont (MuseScore General) is kept as an
    unseen-timbre test set.

Pieces with stems, Slakh/MUSDB-like (notebook 08)
    Slakh2100 renders MIDI songs instrument by instrument; MUSDB18 ships every song as drums, bass,
    vocals and other. We write short procedural songs (chords, a bass line, drums, a melody and
    accompaniment drawn from an instrument pool), render each instrument on its own, and save
    the stems, the four MUSDB-style groups and the mixture. The mixture is the exact sum of the
    stem files, so separation scores measured against the stems are exact. Each instrument is
    named by its OpenMIC-2018 class, and `pieces.csv` has one 0/1 column per class, like OpenMIC.

Both renderers are resumable: files are written atomically (a temporary file, then a rename), a
second run renders only what is missing or unreadable, and the random choices for a piece depend
only on (seed, piece index), so an interrupted run resumes to the same dataset.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from .files import atomic_path, write_csv, write_json
from .synth import Backend, NoteEvent, Synth, open_synth

# A render whose peak stays below this is treated as "the soundfont has no sample here".
SILENCE_DBFS = -60.0
_SILENCE_PEAK = 10 ** (SILENCE_DBFS / 20)


def _is_silent(audio: np.ndarray) -> bool:
    """Tell whether a render never rises above SILENCE_DBFS."""
    return audio.size == 0 or float(np.max(np.abs(audio))) < _SILENCE_PEAK


def _folder_size_mb(paths: Iterable[Path]) -> float:
    """Return the total size of existing files, in MB."""
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


# --------------------------------------------------------------------------------------------
# (a) Single notes, TinySOL-like
# --------------------------------------------------------------------------------------------


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
_PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


def pitch_name(midi: int) -> str:
    """Name a MIDI pitch the way TinySOL does: sharps, middle C (60) is C4."""
    return f"{_PITCH_CLASSES[midi % 12]}{midi // 12 - 1}"


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


def _quantise(audio: np.ndarray) -> np.ndarray:
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


class _OnDemandSynth:
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
    synths = _OnDemandSynth(sample_rate, backend)
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
            if _is_silent(audio):
                target.unlink(missing_ok=True)
                found_silent.append(_silent_row(row, audio))
                counts["silent"] += 1
                continue
            _write_audio(target, _quantise(audio), sample_rate, "PCM_16")
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
        size_mb=_folder_size_mb(out_dir / p for p in metadata["Path"]),
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


# --------------------------------------------------------------------------------------------
# (b) Pieces with stems, Slakh/MUSDB-like
# --------------------------------------------------------------------------------------------

OPENMIC_CLASSES = (
    "accordion",
    "banjo",
    "bass",
    "cello",
    "clarinet",
    "cymbals",
    "drums",
    "flute",
    "guitar",
    "mallet_percussion",
    "mandolin",
    "organ",
    "piano",
    "saxophone",
    "synthesizer",
    "trombone",
    "trumpet",
    "ukulele",
    "violin",
    "voice",
)
GROUPS = ("drums", "bass", "vocals", "other")


@dataclass(frozen=True)
class PoolInstrument:
    """An instrument a piece may use: OpenMIC class, MUSDB group, GM programs, roles, register."""

    label: str
    group: str
    programs: tuple[int, ...]
    roles: tuple[str, ...]
    low: int
    high: int
    is_drum: bool = False


# Roles: melody (a tune), chords (block chords), arpeggio (broken chords), pad (held chords),
# line (held single chord tones), bass, drums.
DRUMS = PoolInstrument("drums", "drums", (0,), ("drums",), 35, 81, is_drum=True)
BASS = PoolInstrument("bass", "bass", (32, 33, 34), ("bass",), 28, 52)
VOICE = PoolInstrument("voice", "vocals", (52, 53, 54), ("melody",), 55, 79)
OTHER_POOL: tuple[PoolInstrument, ...] = (
    PoolInstrument("piano", "other", (0, 1), ("chords", "arpeggio", "melody"), 45, 84),
    PoolInstrument("guitar", "other", (24, 25, 27), ("chords", "arpeggio"), 40, 76),
    PoolInstrument("violin", "other", (40,), ("melody", "line"), 55, 91),
    PoolInstrument("cello", "other", (42,), ("line", "melody"), 36, 67),
    PoolInstrument("flute", "other", (73,), ("melody",), 60, 93),
    PoolInstrument("clarinet", "other", (71,), ("melody", "line"), 50, 84),
    PoolInstrument("saxophone", "other", (65, 66), ("melody",), 49, 80),
    PoolInstrument("trumpet", "other", (56,), ("melody",), 55, 82),
    PoolInstrument("trombone", "other", (57,), ("melody", "line"), 40, 70),
    PoolInstrument("organ", "other", (16, 17, 18, 19), ("chords", "pad"), 48, 79),
    PoolInstrument("synthesizer", "other", (80, 81), ("melody",), 55, 88),
    PoolInstrument("synthesizer", "other", (88, 89), ("pad",), 48, 79),
    PoolInstrument("accordion", "other", (21,), ("chords", "melody"), 53, 81),
    PoolInstrument("mallet_percussion", "other", (11, 12), ("arpeggio", "melody"), 53, 89),
)

_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Chord progressions as scale degrees (0 = tonic), one chord per bar, repeated as needed.
_PROGRESSIONS = (
    (0, 4, 5, 3),
    (0, 5, 3, 4),
    (5, 3, 0, 4),
    (0, 3, 4, 3),
    (0, 3, 0, 4),
    (1, 4, 0, 0),
    (0, 6, 5, 4),
)
# GM percussion keys.
_KICK, _SNARE, _CLOSED_HAT, _OPEN_HAT, _CRASH, _RIDE = 36, 38, 42, 46, 49, 51
_TOMS = (50, 48, 47, 45, 43, 41)
_MIXTURE_PEAK = 0.9
_Voice = tuple[int, bool]  # (GM program, is_drum)


@dataclass(frozen=True)
class Part:
    """One instrument of a piece: what it is, the role it plays and its notes."""

    stem: str
    instrument: PoolInstrument
    program: int
    role: str
    events: tuple[NoteEvent, ...]


@dataclass(frozen=True)
class PieceScore:
    """A generated piece: tempo, key, chords and parts (before rendering)."""

    tempo: float
    tonic: int
    mode: str
    chords: tuple[tuple[int, ...], ...]
    parts: tuple[Part, ...]


class _Composer:
    """Write one piece's notes from a random generator (all randomness goes through `rng`)."""

    def __init__(self, rng: np.random.Generator, seconds: float) -> None:
        self.rng = rng
        self.seconds = seconds
        self.tempo = float(rng.uniform(80, 140))
        self.beat = 60.0 / self.tempo
        self.tonic = int(rng.integers(12))
        self.mode = str(rng.choice(list(_SCALES)))
        self.scale = _SCALES[self.mode]
        progression = _PROGRESSIONS[int(rng.integers(len(_PROGRESSIONS)))]
        self.bars = math.ceil(seconds / (4 * self.beat))
        self.chords = tuple(self._triad(progression[b % len(progression)]) for b in range(self.bars))

    def _triad(self, degree: int) -> tuple[int, int, int]:
        """Return the pitch classes of the diatonic triad on a scale degree (root first)."""
        return tuple((self.tonic + self.scale[(degree + step) % 7]) % 12 for step in (0, 2, 4))

    def _scale_pitches(self, low: int, high: int) -> list[int]:
        """Return the MIDI pitches of the piece's scale within a register."""
        classes = {(self.tonic + s) % 12 for s in self.scale}
        return [p for p in range(low, high + 1) if p % 12 in classes]

    @staticmethod
    def _nearest(pitch_class: int, target: float, low: int, high: int) -> int:
        """Return the pitch of a pitch class nearest to `target` inside [low, high]."""
        candidates = [p for p in range(low, high + 1) if p % 12 == pitch_class]
        return min(candidates, key=lambda p: abs(p - target))

    def _velocity(self, base: int, spread: int = 8) -> int:
        """Vary a velocity by up to +-spread, as a player would."""
        return int(np.clip(base + self.rng.integers(-spread, spread + 1), 1, 127))

    def _note(self, start: float, length: float, key: int, velocity: int, voice: _Voice) -> NoteEvent:
        """Make a note from a start and length in beats, for a (program, is_drum) voice."""
        program, is_drum = voice
        return NoteEvent(start * self.beat, (start + length) * self.beat, key, velocity, program, is_drum)

    def drums(self, program: int) -> list[NoteEvent]:
        """Kick, snare and hi-hat in one of a few grooves, a crash on bar 1 and fills every 4 bars."""
        voice = (program, True)
        base = int(self.rng.integers(80, 110))
        kicks = ((0, 2), (0, 1.5, 2), (0, 2.5), (0, 0.75, 2, 2.5))[int(self.rng.integers(4))]
        hat_step = (0.5, 0.25, 1.0)[int(self.rng.integers(3))]
        hat = _RIDE if self.rng.random() < 0.2 else _CLOSED_HAT
        events = [self._note(0, 1, _CRASH, self._velocity(base + 10), voice)]
        for bar in range(self.bars):
            start = 4 * bar
            fill = bar % 4 == 3
            for k in kicks:
                events.append(self._note(start + k, 0.25, _KICK, self._velocity(base + 10), voice))
            for s in (1, 3):
                if not (fill and s == 3):
                    events.append(self._note(start + s, 0.25, _SNARE, self._velocity(base), voice))
            for h in np.arange(0, 3 if fill else 4, hat_step):
                accent = 10 if h % 1 == 0 else 0
                key = _OPEN_HAT if (h == 3.5 and self.rng.random() < 0.3) else hat
                velocity = self._velocity(base - 20 + accent)
                events.append(self._note(start + float(h), hat_step, key, velocity, voice))
            if fill:
                toms = self.rng.permutation(_TOMS)[:4]
                for i, t in enumerate(np.arange(3, 4, 0.25)):
                    key = _SNARE if self.rng.random() < 0.3 else int(toms[i])
                    events.append(self._note(start + float(t), 0.25, key, self._velocity(base + 5), voice))
        return events

    def bass(self, instrument: PoolInstrument, program: int) -> list[NoteEvent]:
        """Play the chord roots: held halves, driving eighths, or root-fifth quarters."""
        voice = (program, False)
        base = int(self.rng.integers(85, 110))
        style = ("halves", "eighths", "root_fifth")[int(self.rng.integers(3))]
        events = []
        for bar, chord in enumerate(self.chords):
            root = self._nearest(chord[0], 40, instrument.low, instrument.high)
            fifth = self._nearest(chord[2], root + 7, instrument.low, instrument.high)
            if style == "halves":
                hits = [(0, 2, root), (2, 2, root)]
            elif style == "eighths":
                hits = [(b, 0.5, root) for b in np.arange(0, 4, 0.5)]
            else:
                hits = [(0, 1, root), (1, 1, fifth), (2, 1, root), (3, 1, fifth)]
            for beat, length, key in hits:
                start = 4 * bar + float(beat)
                events.append(self._note(start, 0.9 * length, key, self._velocity(base), voice))
        return events

    def melody(self, instrument: PoolInstrument, program: int) -> list[NoteEvent]:
        """Walk the scale in short steps, landing on chord tones on the beat, with some rests."""
        voice = (program, False)
        base = int(self.rng.integers(75, 110))
        pitches = self._scale_pitches(instrument.low, instrument.high)
        centre = (instrument.low + instrument.high) / 2
        index = min(range(len(pitches)), key=lambda i: abs(pitches[i] - centre))
        events, beat, total = [], 0.0, 4 * self.bars
        while beat < total:
            length = float(self.rng.choice([0.5, 1.0, 1.0, 1.5, 2.0]))
            if self.rng.random() < 0.15:
                beat += length
                continue
            step = int(self.rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]))
            index = min(max(index + step, 0), len(pitches) - 1)
            chord = self.chords[min(int(beat // 4), self.bars - 1)]
            if beat % 1 == 0 and pitches[index] % 12 not in chord:
                # On the beat, move to the nearest chord tone so the tune fits the harmony.
                index = min(
                    (i for i in range(len(pitches)) if pitches[i] % 12 in chord),
                    key=lambda i: abs(i - index),
                )
            events.append(self._note(beat, 0.95 * length, pitches[index], self._velocity(base), voice))
            beat += length
        return events

    def _voicing(self, chord: tuple[int, ...], instrument: PoolInstrument) -> list[int]:
        """Voice a triad closely around the middle of the instrument's register."""
        centre = (instrument.low + instrument.high) / 2
        root = self._nearest(chord[0], centre - 4, instrument.low, instrument.high - 7)
        return sorted(self._nearest(pc, root + 4, root, root + 11) for pc in chord)

    def chords_part(self, instrument: PoolInstrument, program: int, role: str) -> list[NoteEvent]:
        """Play the harmony as block-chord rhythms, broken-chord eighths, or held pads."""
        voice = (program, False)
        base = int(self.rng.integers(60, 95))
        rhythm = ((0, 1, 2, 3), (0, 1.5, 2.5), (0, 2), (0.5, 1.5, 2.5, 3.5))[int(self.rng.integers(4))]
        events = []
        for bar, chord in enumerate(self.chords):
            keys = self._voicing(chord, instrument)
            start = 4 * bar
            if role == "pad":
                events += [self._note(start, 3.9, k, self._velocity(base - 10, 4), voice) for k in keys]
            elif role == "arpeggio":
                pattern = [*keys, keys[0] + 12, *reversed(keys[1:])]
                pattern = [k for k in pattern if k <= instrument.high]
                for i, b in enumerate(np.arange(0, 4, 0.5)):
                    key = pattern[i % len(pattern)]
                    events.append(self._note(start + float(b), 0.45, key, self._velocity(base), voice))
            else:
                lengths = np.diff([*rhythm, 4])
                for hit, length in zip(rhythm, lengths):
                    velocity = self._velocity(base)
                    events += [self._note(start + hit, 0.9 * float(length), k, velocity, voice) for k in keys]
        return events

    def line(self, instrument: PoolInstrument, program: int) -> list[NoteEvent]:
        """Hold one chord tone per bar, moving to the nearest tone of the next chord."""
        voice = (program, False)
        base = int(self.rng.integers(60, 90))
        key = (instrument.low + instrument.high) / 2
        events = []
        for bar, chord in enumerate(self.chords):
            key = min(
                (self._nearest(pc, key, instrument.low, instrument.high) for pc in chord),
                key=lambda p: abs(p - key),
            )
            events.append(self._note(4 * bar, 3.9, int(key), self._velocity(base, 4), voice))
        return events

    def part(self, instrument: PoolInstrument, role: str) -> tuple[int, list[NoteEvent]]:
        """Pick a program for the instrument and write its notes for a role."""
        program = int(self.rng.choice(instrument.programs))
        if role == "drums":
            events = self.drums(program)
        elif role == "bass":
            events = self.bass(instrument, program)
        elif role == "melody":
            events = self.melody(instrument, program)
        elif role == "line":
            events = self.line(instrument, program)
        else:
            events = self.chords_part(instrument, program, role)
        # Notes that start after the end are never heard; keep the score to what is rendered.
        return program, [e for e in events if e.start < self.seconds]


def compose_piece(seed: int, index: int, seconds: float) -> PieceScore:
    """Generate piece number `index` of a seed: the same (seed, index) always gives the same piece."""
    rng = np.random.default_rng([seed, index])
    composer = _Composer(rng, seconds)
    chosen: list[tuple[PoolInstrument, str]] = []
    if rng.random() < 0.7:
        chosen.append((DRUMS, "drums"))
    if rng.random() < 0.8:
        chosen.append((BASS, "bass"))
    if rng.random() < 0.6:
        chosen.append((VOICE, "melody"))
    others = rng.choice(len(OTHER_POOL), size=int(rng.integers(1, 4)), replace=False)
    picked = [OTHER_POOL[int(i)] for i in others]
    roles = [str(rng.choice(p.roles)) for p in picked]
    if not any(role == "melody" for _, role in chosen) and "melody" not in roles:
        # Without a voice, give the tune to the first accompanist that can play one.
        for i, instrument in enumerate(picked):
            if "melody" in instrument.roles:
                roles[i] = "melody"
                break
    chosen += list(zip(picked, roles))

    parts, used = [], set()
    for instrument, role in chosen:
        program, events = composer.part(instrument, role)
        stem, n = instrument.label, 2
        while stem in used:
            stem, n = f"{instrument.label}_{n}", n + 1
        used.add(stem)
        parts.append(Part(stem, instrument, program, role, tuple(events)))
    return PieceScore(composer.tempo, composer.tonic, composer.mode, composer.chords, tuple(parts))


@dataclass
class PiecesReport:
    """What render_pieces did: the pieces table, counts, audio length, time and disk use."""

    metadata: pd.DataFrame
    root: Path
    rendered: int
    reused: int
    repaired: int
    silent_stems: int
    audio_seconds: float
    wall_seconds: float
    size_mb: float
    backend: str
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Describe the run in one line."""
        return (
            f"{len(self.metadata)} pieces, {self.audio_seconds / 60:.1f} min audio, {self.size_mb:.1f} MB: "
            f"{self.rendered} rendered, {self.reused} reused, {self.repaired} repaired, "
            f"{self.silent_stems} silent stems dropped; {self.wall_seconds:.1f} s with {self.backend}"
        )


_PIECE_SETTINGS = ("soundfont", "seed", "index", "seconds", "sample_rate")
PIECES_COLUMNS = ["sample_key", "soundfont", "mixture", "instruments", *OPENMIC_CLASSES]


def _piece_complete(folder: Path, frames: int) -> dict | None:
    """Return a piece folder's piece.json if every file it lists is there with the right length."""
    try:
        info = json.loads((folder / "piece.json").read_text())
        files = [
            "mixture.wav",
            *(f"groups/{g}.flac" for g in GROUPS),
            *(f"stems/{s}.flac" for s in info["stems"]),
        ]
        # A truncated WAV reports fewer frames than it was written with.
        if all(sf.info(folder / f).frames == frames for f in files):
            return info
    except (OSError, ValueError, KeyError, RuntimeError):
        pass
    return None


def _write_piece(folder: Path, score: PieceScore, synth: Synth, settings: dict) -> dict:
    """Render each part, scale, quantise and write stems, groups, mixture and piece.json."""
    frames = round(settings["seconds"] * settings["sample_rate"])
    rate = settings["sample_rate"]
    audio, dropped = {}, []
    for part in score.parts:
        rendered = synth.render(part.events, settings["seconds"])
        if _is_silent(rendered):
            # The soundfont lacks this program: a silent stem would be a false label.
            dropped.append(part.stem)
        else:
            audio[part.stem] = rendered
    if not audio:
        raise RuntimeError(
            f"Every part of {settings['sample_key']} rendered silent with {settings['soundfont']}"
        )
    parts = [p for p in score.parts if p.stem in audio]
    def group_sum(tracks: dict[str, np.ndarray], group: str) -> np.ndarray:
        members = [tracks[p.stem] for p in parts if p.instrument.group == group]
        return np.sum(members, axis=0) if members else np.zeros(frames, dtype=next(iter(tracks.values())).dtype)

    # One gain for the whole piece, so that neither the mixture nor any group clips.
    sums = [np.sum(list(audio.values()), axis=0), *(group_sum(audio, g) for g in GROUPS)]
    gain = min(1.0, _MIXTURE_PEAK / max(float(np.max(np.abs(x))) for x in sums))
    quantised = {stem: _quantise(gain * x).astype(np.int32) for stem, x in audio.items()}
    # Stems are 16-bit; a sum of 16-bit values stored as 24-bit PCM (value * 256) is exact, and so
    # is reading it back as float32: the stem files summed reproduce mixture.wav bit for bit.
    # (soundfile takes int32 as full scale 2**31, hence the shift by 16 bits.)
    (folder / "stems").mkdir(parents=True)
    (folder / "groups").mkdir()
    for stem, q in quantised.items():
        sf.write(folder / "stems" / f"{stem}.flac", q.astype(np.int16), rate, subtype="PCM_16")
    for group in GROUPS:
        sf.write(folder / "groups" / f"{group}.flac", (group_sum(quantised, group) << 16).astype(np.int32), rate, subtype="PCM_24")
    mixture = np.sum(list(quantised.values()), axis=0)
    sf.write(folder / "mixture.wav", (mixture << 16).astype(np.int32), rate, subtype="PCM_24")
    info = {
        **settings,
        "stems": [p.stem for p in parts],
        "labels": sorted({p.instrument.label for p in parts}),
        "dropped_silent": dropped,
        "gain": gain,
        "backend": synth.backend,
        "tempo": round(score.tempo, 3),
        "key": f"{_PITCH_CLASSES[score.tonic]} {score.mode}",
        "parts": [
            {
                "stem": p.stem,
                "program": p.program,
                "role": p.role,
                "group": p.instrument.group,
                "notes": len(p.events),
            }
            for p in parts
        ],
    }
    write_json(folder / "piece.json", info)
    return info


def _pieces_row(info: dict) -> dict:
    """Build the pieces.csv row of a piece from its piece.json."""
    labels = set(info["labels"])
    return {
        "sample_key": info["sample_key"],
        "soundfont": info["soundfont"],
        "mixture": f"{info['sample_key']}/mixture.wav",
        "instruments": "|".join(info["stems"]),
        **{c: int(c in labels) for c in OPENMIC_CLASSES},
    }


def render_pieces(
    out_dir: str | Path,
    soundfont_name: str,
    soundfont_path: str | Path,
    *,
    count: int,
    seconds: float = 10.0,
    sample_rate: int = 22050,
    seed: int = 0,
    first_index: int = 0,
    prefix: str = "piece",
    backend: Backend = "auto",
    progress: bool = True,
) -> PiecesReport:
    """Render `count` procedural pieces with stems, groups and mixture, and update pieces.csv.

    Piece i is composed from (seed, first_index + i) alone. Complete piece folders are reused; a
    folder is written under a temporary name and renamed into place only once complete. A folder
    made with other settings (soundfont, seed, length, rate) is an error, not overwritten.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = round(seconds * sample_rate)
    counts = dict.fromkeys(("rendered", "reused", "repaired", "silent_stems"), 0)
    infos: list[dict] = []
    synths = _OnDemandSynth(sample_rate, backend)
    try:
        indices = range(first_index, first_index + count)
        for index in tqdm(indices, f"pieces {soundfont_name}", unit="piece", disable=not progress):
            key = f"{prefix}-{index:04d}"
            settings = {
                "sample_key": key,
                "soundfont": soundfont_name,
                "seed": seed,
                "index": index,
                "seconds": seconds,
                "sample_rate": sample_rate,
            }
            folder = out_dir / key
            damaged = folder.exists()
            if damaged:
                info = _piece_complete(folder, frames)
                if info is not None:
                    different = [k for k in _PIECE_SETTINGS if info.get(k) != settings[k]]
                    if different:
                        raise ValueError(
                            f"{folder} was rendered with other settings ({', '.join(different)}); "
                            "use another out_dir or prefix, or delete the folder"
                        )
                    counts["reused"] += 1
                    infos.append(info)
                    continue
                shutil.rmtree(folder)
            score = compose_piece(seed, index, seconds)
            tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{key}."))
            try:
                info = _write_piece(tmp, score, synths.get(soundfont_name, soundfont_path), settings)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            counts["repaired" if damaged else "rendered"] += 1
            counts["silent_stems"] += len(info["dropped_silent"])
            infos.append(info)
    finally:
        synths.close()

    metadata = pd.DataFrame([_pieces_row(i) for i in infos], columns=PIECES_COLUMNS)
    csv_path = out_dir / "pieces.csv"
    table = metadata
    if csv_path.is_file():
        earlier = pd.read_csv(csv_path)
        earlier = earlier[~earlier["sample_key"].isin(metadata["sample_key"])]
        table = pd.concat([earlier, metadata], ignore_index=True)
    write_csv(csv_path, table.sort_values("sample_key", kind="stable")[PIECES_COLUMNS])
    return PiecesReport(
        metadata=metadata,
        root=out_dir,
        audio_seconds=len(metadata) * seconds,
        wall_seconds=time.perf_counter() - started,
        size_mb=_folder_size_mb(f for i in infos for f in (out_dir / i["sample_key"]).rglob("*")),
        backend=synths.used(),
        dropped=[f"{i['sample_key']}/{s}" for i in infos for s in i["dropped_silent"]],
        **counts,
    )


def read_pieces(root: str | Path) -> pd.DataFrame:
    """Read pieces.csv into a clip table: path, labels, soundfont, source, sample_key, stems_dir."""
    root = Path(root)
    csv_path = root / "pieces.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"No pieces table at {csv_path}")
    table = pd.read_csv(csv_path)
    for column in ("sample_key", "soundfont", "mixture", *OPENMIC_CLASSES):
        if column not in table.columns:
            raise ValueError(f"{csv_path} has no column {column!r}")
    mixtures = [(root / m).resolve() for m in table["mixture"]]
    presence = table[list(OPENMIC_CLASSES)].to_numpy() == 1
    return pd.DataFrame(
        {
            "path": [str(m) for m in mixtures],
            "labels": ["|".join(c for c, on in zip(OPENMIC_CLASSES, row) if on) for row in presence],
            "soundfont": table["soundfont"].astype(str),
            "source": "rendered_pieces",
            "sample_key": table["sample_key"].astype(str),
            "stems_dir": [str(m.parent / "stems") for m in mixtures],
        }
    )
