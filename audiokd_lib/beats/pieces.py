"""Pieces with exact beats and downbeats, rendered from procedural MIDI like notebook 08's (notebook 09).

A beat tracker learns from audio whose beats are known to the sample. Annotated real music is scarce
and its annotations are a listener's taps; here the score *is* the annotation. Each piece draws:

- a metre: 3/4 (three beats a bar, two eighths a beat), 4/4, or 6/8 (two dotted-quarter beats a bar,
  three eighths each, the way beat trackers and their datasets count it);
- a tempo between `min_bpm` and `max_bpm` (6/8 at most 120 dotted quarters a minute), and for some
  pieces an expressive drift: the tempo swings sinusoidally by up to `max_drift` over a few bars;
- a band, played a little off the grid (onsets spread by `humanise_ms`): a drum kit (kick on the
  downbeat, snare on the back beats, hi-hats on the eighths) in
  `drums_fraction` of the pieces, otherwise pitched instruments only; a bass on the downbeats and
  some other beats; chords on the beats, louder on the downbeat; sometimes a melody on the eighths.

Beat k falls at t_k, the sum of the periods before it, and everything between two beats is placed
linearly between them, so the notes follow the drifting tempo and `beats.csv` (time, position in the
bar, 1 = downbeat) is exact. Pieces of the training soundfonts are split into train, val and test
(unseen compositions, seen timbres); those of the held-out soundfont are the `heldout` split, the
unseen test set, as GTZAN is for trackers trained on Harmonix. The random choices of piece i depend
only on (seed, i): an interrupted rendering resumes to the same dataset, folder by folder.

The pieces of notebook 08 stay as they are (4/4, constant tempo): their audio feeds 08's results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from audiokd_lib.core.files import atomic_folder, write_csv
from audiokd_lib.core.params import BeatPiecesParams
from audiokd_lib.data.notes import OnDemandSynth, quantise
from audiokd_lib.data.synth import NoteEvent
from audiokd_lib.data.tables import SoundfontPlan

METRES = {"3/4": (3, 2), "4/4": (4, 2), "6/8": (2, 3)}  # beats a bar, subdivisions a beat
CHORD_PROGRAMS = (0, 1, 4, 16, 19, 24, 25, 48)          # pianos, organs, guitars, strings
MELODY_PROGRAMS = (40, 56, 65, 71, 73, 80)              # violin, trumpet, sax, clarinet, flute, lead
BASS_PROGRAMS = (32, 33, 34)
KICK, SNARE, HAT = 36, 38, 42
COLUMNS = ["sample_key", "path", "beats_path", "soundfont", "metre", "tempo", "drift", "drums", "split"]


@dataclass(frozen=True)
class BeatScore:
    """A composed piece: its notes, its beat times and each beat's position in the bar (1: downbeat)."""

    metre: str
    tempo: float            # beats a minute at the start
    drift: float            # largest tempo swing, as a ratio (0: steady)
    drums: bool
    events: tuple[NoteEvent, ...]
    beats: np.ndarray       # seconds
    positions: np.ndarray   # 1..beats_per_bar


def beat_times(tempo: float, drift: float, drift_beats: float, phase: float, start: float, seconds: float
               ) -> np.ndarray:
    """Times of the beats from `start` to past `seconds`: the tempo swings by `drift` with a period of
    `drift_beats` beats (a steady tempo when drift is 0)."""
    times = [start]
    while times[-1] <= seconds + 1.0:
        k = len(times) - 1
        factor = 1.0 + drift * math.sin(2 * math.pi * k / drift_beats + phase)
        times.append(times[-1] + 60.0 / (tempo * factor))
    return np.asarray(times)


def compose(seed: int, index: int, pp: BeatPiecesParams) -> BeatScore:
    """Piece `index`: everything drawn from (seed, index) alone."""
    rng = np.random.default_rng([seed, index, 9])  # 9: a stream of its own, apart from notebook 08's pieces
    metre = str(rng.choice(pp.metres))
    per_bar, subs = METRES[metre]
    top = min(pp.max_bpm, 120.0) if metre == "6/8" else pp.max_bpm
    tempo = float(np.exp(rng.uniform(math.log(pp.min_bpm), math.log(max(top, pp.min_bpm * 1.01)))))
    drift = float(rng.uniform(0.3, 1.0) * pp.max_drift) if rng.random() < pp.drift_fraction else 0.0
    times = beat_times(tempo, drift, float(rng.uniform(8, 24)), float(rng.uniform(0, 2 * math.pi)),
                       float(rng.uniform(0.1, 0.8)), pp.seconds)
    offset = int(rng.integers(per_bar))  # the piece may start on any beat of the bar (an upbeat)
    positions = (np.arange(len(times)) + offset) % per_bar + 1
    drums = bool(rng.random() < pp.drums_fraction)

    def at(beat: float) -> float:  # the time of a fractional beat index, linear between beats
        k = min(int(beat), len(times) - 2)
        return float(times[k] + (beat - k) * (times[k + 1] - times[k]))

    events: list[NoteEvent] = []

    def note(beat: float, length: float, key: int, velocity: int, program: int, is_drum: bool = False) -> None:
        # A player is never exactly on the grid: each onset moves by a few milliseconds (the beats stay put).
        late = float(rng.normal(0.0, pp.humanise_ms / 1000))
        start = max(0.0, at(beat) + late)
        velocity = velocity + int(rng.integers(-8, 9))
        events.append(NoteEvent(start, max(start + 0.02, at(beat + length) + late), int(key),
                                int(np.clip(velocity, 1, 127)), program, is_drum))

    tonic = int(rng.integers(0, 12))
    scale = (0, 2, 4, 5, 7, 9, 11)
    degrees = [0, 3, 4, 5]  # I, IV, V, vi
    chord_program, bass_program = int(rng.choice(CHORD_PROGRAMS)), int(rng.choice(BASS_PROGRAMS))
    melody_program = int(rng.choice(MELODY_PROGRAMS)) if rng.random() < 0.5 else None
    chord = 0
    for k in range(len(times) - 1):
        down = positions[k] == 1
        if down or k == 0:
            chord = int(rng.choice(degrees))
        triad = [tonic + scale[(chord + step) % 7] + 12 * ((chord + step) // 7) for step in (0, 2, 4)]
        root = triad[0]
        accent = 18 if down else 0
        if drums:
            if down or (per_bar == 4 and positions[k] == 3):
                note(k, 0.25, KICK, 100 + accent // 2, 0, True)
            elif per_bar != 3 or positions[k] == 2 or rng.random() < 0.5:
                note(k, 0.25, SNARE, 80, 0, True)
            for sub in range(subs):
                if rng.random() < 0.9:
                    note(k + sub / subs, 0.5 / subs, HAT, 70 if sub == 0 else 50, 0, True)
        if down or rng.random() < 0.4:
            note(k, 0.9, 36 + root % 12, 85 + accent // 2, bass_program)
        if per_bar != 3 or not down or not drums:  # a waltz: bass on one, chords on two and three
            for key in triad:
                note(k, 0.8, 60 + key, 60 + accent, chord_program)
        if melody_program is not None and rng.random() < 0.7:
            for sub in range(subs):
                if rng.random() < 0.6:
                    note(k + sub / subs, 0.9 / subs, 72 + tonic + int(rng.choice(scale)), 70, melody_program)
    keep = times <= pp.seconds - 0.05
    return BeatScore(metre, tempo, drift, drums, tuple(events), times[keep], positions[keep])


def _render_one(folder: Path, score: BeatScore, synth, pp: BeatPiecesParams, info: dict) -> None:
    audio = synth.render(score.events, pp.seconds)
    audio = audio / max(float(np.abs(audio).max()), 1e-9) * 0.7
    sf.write(folder / "mixture.flac", quantise(audio), pp.sample_rate, subtype="PCM_16")
    pd.DataFrame({"time": np.round(score.beats, 6), "position": score.positions}).to_csv(folder / "beats.csv",
                                                                                         index=False)
    (folder / "piece.json").write_text(json.dumps(info, indent=1))


def render_beat_pieces(root: str | Path, plan: SoundfontPlan, pp: BeatPiecesParams, seed: int = 0,
                       backend: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Render (or resume) the pieces, training soundfonts then the held-out one; return their table.

    The table (`beat_pieces.csv` in `root`) lists each piece's mixture, beats file, metre, tempo,
    drift, whether it has drums, and its split. A piece folder is written under a temporary name and
    renamed once complete; one made with other settings is an error, not overwritten.
    """
    root = Path(root)
    jobs = [(name, path, pp.count) for name, path in plan.train.items()]
    if plan.heldout is not None:
        jobs.append((*plan.heldout, pp.heldout_count))
    tables, first = [], 0
    for name, path, count in jobs:  # consecutive indices: every piece is a different composition
        table = render_versions(root, (name, path), range(first, first + count), pp, seed, backend, progress=progress)
        heldout = plan.heldout is not None and name == plan.heldout[0]
        table["split"] = "heldout" if heldout else [_split(i, pp) for i in range(first, first + count)]
        tables.append(table)
        first += count
    table = pd.concat(tables, ignore_index=True)[COLUMNS]
    write_csv(root / "beat_pieces.csv", table)
    return table


def render_versions(root: str | Path, soundfont: tuple[str, Path], indices, pp: BeatPiecesParams, seed: int = 0,
                    backend: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Render (or resume) the scores `indices` with one soundfont, under `root`/<its name>; return their
    table without a split. The score of index i is always the same
    composition, so the same index in two soundfonts is one piece played by two bands (notebook 10's twins).
    """
    name, path = soundfont
    settings = {"seed": seed, **pp.model_dump(exclude={"count", "heldout_count", "val_fraction", "test_fraction"})}
    rows = []
    synths = OnDemandSynth(pp.sample_rate, backend)
    try:
        for index in tqdm(list(indices), desc=f"beat pieces {name}", disable=not progress):
            key = f"beats-{index:04d}"
            target = Path(root) / name / key
            info = {"sample_key": key, "soundfont": name, "index": index, **settings}
            if (target / "piece.json").is_file():
                saved = json.loads((target / "piece.json").read_text())
                if {k: saved.get(k) for k in info} != info:
                    raise ValueError(f"{target} was rendered with other settings; delete it or use another "
                                     "output folder")
            else:
                score = compose(seed, index, pp)
                info.update(metre=score.metre, tempo=round(score.tempo, 3), drift=round(score.drift, 4),
                            drums=score.drums)
                with atomic_folder(target) as tmp:
                    _render_one(tmp, score, synths.get(name, path), pp, info)
                saved = info
            rows.append({"sample_key": key, "path": str(target / "mixture.flac"),
                         "beats_path": str(target / "beats.csv"), "soundfont": name, "metre": saved["metre"],
                         "tempo": saved["tempo"], "drift": saved["drift"], "drums": saved["drums"]})
    finally:
        synths.close()
    return pd.DataFrame(rows, columns=COLUMNS[:-1])


def _split(index: int, pp: BeatPiecesParams) -> str:
    """train, val or test for a piece of a training soundfont, by a hash of its index (stable as counts grow)."""
    u = np.random.default_rng([index, 17]).random()
    return "val" if u < pp.val_fraction else "test" if u < pp.val_fraction + pp.test_fraction else "train"


def read_beats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(beat times in seconds, downbeat times) from a piece's beats.csv."""
    table = pd.read_csv(path)
    return table["time"].to_numpy(float), table.loc[table["position"] == 1, "time"].to_numpy(float)
