"""Pieces with stems like Slakh/MUSDB, rendered from procedural MIDI (notebook 08).

Slakh2100 renders MIDI songs instrument by instrument; MUSDB18 ships every song as drums, bass, vocals
and other. We write short procedural songs (chords, a bass line, drums, a melody and accompaniment
drawn from an instrument pool), render each instrument on its own, and save the stems, the four
MUSDB-style groups and the mixture. The mixture is the exact sum of the stem files, so separation
scores measured against the stems are exact. Each instrument is named by its OpenMIC-2018 class, and
`pieces.csv` has one 0/1 column per class, like OpenMIC.

Resumable: the random choices for a piece depend only on (seed, piece index), so an interrupted run
resumes to the same dataset; files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from audiokd_lib.core.files import write_csv, write_json
from audiokd_lib.data.notes import PITCH_CLASSES, OnDemandSynth, folder_size_mb, is_silent, quantise
from audiokd_lib.data.synth import Backend, NoteEvent, Synth
from audiokd_lib.data.taxonomy import GROUPS, OPENMIC_CLASSES


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
        if is_silent(rendered):
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
    quantised = {stem: quantise(gain * x).astype(np.int32) for stem, x in audio.items()}
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
        "key": f"{PITCH_CLASSES[score.tonic]} {score.mode}",
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
    synths = OnDemandSynth(sample_rate, backend)
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
        size_mb=folder_size_mb(f for i in infos for f in (out_dir / i["sample_key"]).rglob("*")),
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
