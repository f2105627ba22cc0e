"""General MIDI soundfonts and a small synthesiser that turns note lists into mono audio.

Two backends play a soundfont: FluidSynth (through pyfluidsynth; needs the system library, best
quality) and TinySoundFont (a pip wheel with no system dependency; the fallback). Both sit behind one
`Synth` whose `render(events, seconds)` returns exactly `seconds` of float32 mono audio and leaves the
synthesiser silent again, so rendering the same notes twice gives the same samples.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

Backend = Literal["auto", "fluidsynth", "tinysoundfont"]


DRUM_CHANNEL = 9


DRUM_BANK = 128


# FluidSynth renders in blocks of 64 samples and applies events at block starts; keeping every
# render a whole number of blocks long makes each one start at the same block phase.
_FLUID_BLOCK = 64


# Silence rendered after TinySoundFont's reset, long enough for its quick-release fade to finish.
_FLUSH_SECONDS = 0.05


# MIDI channels 16-31 exist only inside FluidSynth; they play the notes that settle voice slots.
_FLUID_CHANNELS = 32


_SETTLE_CHANNELS = range(16, _FLUID_CHANNELS)


_SETTLE_SPARE_VOICES = 8


_GEN_PAN = 17


# Output gains, measured on every pitch of the 14 TinySOL instruments at velocity 127 in FluidR3_GM,
# MuseScore_General and TimGM6mb: the loudest note peaks near 0.57 (-5 dBFS), so ff never clips.
# (One exception: TinySoundFont glitches to about 1.8 in the release of a few MuseScore trumpet notes.)
_FLUID_GAIN = 0.8


_TSF_GAIN_DB = -4.0


def _pretty_midi_folder() -> Path | None:
    """Return the installed pretty_midi package folder, without importing it (slow)."""
    spec = importlib.util.find_spec("pretty_midi")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


@dataclass(frozen=True)
class SoundfontInfo:
    """Where a soundfont may be installed, and which Debian package installs it."""

    name: str
    candidates: tuple[Path, ...]
    debian_package: str | None
    install_hint: str


def _soundfont_table() -> dict[str, SoundfontInfo]:
    """Build the table of known soundfonts (pretty_midi's folder is looked up at call time)."""
    sf2, sf3 = Path("/usr/share/sounds/sf2"), Path("/usr/share/sounds/sf3")
    pretty_midi_folder = _pretty_midi_folder()
    timgm = (pretty_midi_folder / "TimGM6mb.sf2",) if pretty_midi_folder else ()
    return {
        "FluidR3_GM": SoundfontInfo(
            "FluidR3_GM",
            (sf2 / "FluidR3_GM.sf2", sf3 / "FluidR3_GM.sf3"),
            "fluid-soundfont-gm",
            "sudo apt-get install fluid-soundfont-gm",
        ),
        "MuseScore_General": SoundfontInfo(
            "MuseScore_General",
            (
                sf3 / "MuseScore_General.sf3",
                sf3 / "MuseScore_General_Lite.sf3",
                sf2 / "MuseScore_General.sf2",
                sf2 / "MuseScore_General_Lite.sf2",
                sf3 / "MuseScore_General_Full.sf3",
                sf2 / "MuseScore_General_Full.sf2",
            ),
            "musescore-general-soundfont-small",
            "sudo apt-get install musescore-general-soundfont-small",
        ),
        "TimGM6mb": SoundfontInfo(
            "TimGM6mb",
            timgm,
            None,
            "pip install pretty_midi  (the wheel ships TimGM6mb.sf2)",
        ),
    }


SOUNDFONTS: dict[str, SoundfontInfo] = _soundfont_table()


class SoundfontNotFound(FileNotFoundError):
    """A soundfont that is not installed, or a name that is not known."""


def find_soundfont(name: str) -> Path | None:
    """Return the first installed file of a known soundfont, or None."""
    info = SOUNDFONTS.get(name)
    if info is None:
        return None
    return next((path for path in info.candidates if path.is_file()), None)


def install_hint(name: str) -> str:
    """Return how to install a known soundfont (a command line), or the list of known names."""
    info = SOUNDFONTS.get(name)
    if info is None:
        return f"unknown soundfont; known soundfonts: {', '.join(SOUNDFONTS)}"
    return info.install_hint


def require_soundfont(name: str) -> Path:
    """Return an installed soundfont's path, or raise SoundfontNotFound saying how to install it."""
    info = SOUNDFONTS.get(name)
    if info is None:
        raise SoundfontNotFound(f"Unknown soundfont {name!r}; known soundfonts: {', '.join(SOUNDFONTS)}")
    path = find_soundfont(name)
    if path is None:
        looked = ", ".join(str(p) for p in info.candidates) or "(pretty_midi is not installed)"
        raise SoundfontNotFound(
            f"Soundfont {name!r} not found; looked in: {looked}. Install it with: {info.install_hint}"
        )
    return path


@dataclass(frozen=True)
class NoteEvent:
    """One note: times in seconds, MIDI key and velocity, General MIDI program (0-based)."""

    start: float
    end: float
    key: int
    velocity: int
    program: int = 0
    is_drum: bool = False


def _assign_channels(events: Sequence[NoteEvent]) -> dict[tuple[int, bool], int]:
    """Give each (program, is_drum) its own MIDI channel; drums always use channel 9."""
    melodic_channels = [c for c in range(16) if c != DRUM_CHANNEL]
    channels: dict[tuple[int, bool], int] = {}
    for voice in sorted({(e.program, e.is_drum) for e in events}):
        if voice[1]:
            channels[voice] = DRUM_CHANNEL
            continue
        if not melodic_channels:
            raise ValueError("A render can use at most 15 melodic programs (16 MIDI channels, one for drums)")
        channels[voice] = melodic_channels.pop(0)
    return channels


def _timeline(
    events: Sequence[NoteEvent], sample_rate: int, total: int
) -> list[tuple[int, int, int, int, int]]:
    """Turn notes into (sample, order, channel, key, velocity) messages sorted in time.

    Note-offs sort before note-ons at the same sample so that a repeated key retriggers.
    """
    channels = _assign_channels(events)
    messages = []
    for event in events:
        if event.end <= event.start:
            raise ValueError(f"Note ends before it starts: {event}")
        channel = channels[(event.program, event.is_drum)]
        on = round(event.start * sample_rate)
        off = round(event.end * sample_rate)
        if on < total:
            messages.append((on, 1, channel, event.key, event.velocity))
        if off < total:
            messages.append((off, 0, channel, event.key, 0))
    messages.sort()
    return messages


class Synth:
    """A loaded soundfont that renders note lists; create once, render many times."""

    backend: str = ""

    def __init__(self, soundfont: Path, sample_rate: int) -> None:
        self.soundfont = Path(soundfont)
        self.sample_rate = int(sample_rate)

    def render(self, events: Sequence[NoteEvent], seconds: float) -> np.ndarray:
        """Render notes to float32 mono audio of exactly round(seconds * sample_rate) samples."""
        total = round(seconds * self.sample_rate)
        channels = _assign_channels(events)
        for (program, is_drum), channel in channels.items():
            self._select(channel, program, is_drum)
        out = np.zeros(total, dtype=np.float32)
        position = 0
        try:
            for sample, is_on, channel, key, velocity in _timeline(events, self.sample_rate, total):
                if sample > position:
                    out[position:sample] = self._generate(sample - position)
                    position = sample
                if is_on:
                    self._note_on(channel, key, velocity)
                else:
                    self._note_off(channel, key)
            out[position:] = self._generate(total - position)
            position = total
        finally:
            # Even after an error, no note may keep sounding into the next render.
            self._silence(position)
        return out

    def close(self) -> None:
        """Free the synthesiser."""

    def __enter__(self) -> Synth:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.soundfont.name!r}, {self.sample_rate} Hz)"

    # Backend hooks.
    def _select(self, channel: int, program: int, is_drum: bool) -> None:
        raise NotImplementedError

    def _note_on(self, channel: int, key: int, velocity: int) -> None:
        raise NotImplementedError

    def _note_off(self, channel: int, key: int) -> None:
        raise NotImplementedError

    def _generate(self, samples: int) -> np.ndarray:
        raise NotImplementedError

    def _silence(self, rendered: int) -> None:
        raise NotImplementedError


class FluidSynth(Synth):
    """FluidSynth through pyfluidsynth, with reverb and chorus off so that notes are dry."""

    backend = "fluidsynth"

    def __init__(self, soundfont: Path, sample_rate: int) -> None:
        super().__init__(soundfont, sample_rate)
        import fluidsynth

        # One core: mixer threads would sum voices in a varying order (renders not bit-identical).
        self._fs = fluidsynth.Synth(
            gain=_FLUID_GAIN,
            samplerate=float(self.sample_rate),
            channels=_FLUID_CHANNELS,
            **{"synth.reverb.active": 0, "synth.chorus.active": 0, "synth.cpu-cores": 1},
        )
        # pyfluidsynth only offers 16-bit output, which FluidSynth dithers with a running noise
        # table (renders would differ); float output is exact and leaves quantising to us.
        self._write_float = fluidsynth.cfunc(
            "fluid_synth_write_float",
            ctypes.c_int,
            ("synth", ctypes.c_void_p, 1),
            ("len", ctypes.c_int, 1),
            ("lout", ctypes.c_void_p, 1),
            ("loff", ctypes.c_int, 1),
            ("lincr", ctypes.c_int, 1),
            ("rout", ctypes.c_void_p, 1),
            ("roff", ctypes.c_int, 1),
            ("rincr", ctypes.c_int, 1),
        )
        self._set_gen = fluidsynth.cfunc(
            "fluid_synth_set_gen",
            ctypes.c_int,
            ("synth", ctypes.c_void_p, 1),
            ("chan", ctypes.c_int, 1),
            ("param", ctypes.c_int, 1),
            ("value", ctypes.c_float, 1),
        )
        self._sfid = self._fs.sfload(str(self.soundfont))
        if self._sfid < 0:
            self._fs.delete()
            raise RuntimeError(f"FluidSynth could not load {self.soundfont}")
        self._polyphony = int(self._fs.get_setting("synth.polyphony"))
        self._peak_voices = 0
        self._prepare_settling_channels()
        self._silence(0, voices=self._polyphony)

    def _prepare_settling_channels(self) -> None:
        """Give channels 16-31 the first preset of bank 0, panned hard left by a generator offset."""
        first = _SETTLE_CHANNELS[0]
        program = next((p for p in range(128) if self._fs.program_select(first, self._sfid, 0, p) == 0), None)
        if program is None:
            raise RuntimeError(f"{self.soundfont} has no melodic preset in bank 0")
        for channel in _SETTLE_CHANNELS:
            self._fs.program_select(channel, self._sfid, 0, program)
            # Pan offsets beyond +-500 are clamped, so every voice here ends up exactly hard left.
            self._set_gen(self._fs.synth, channel, _GEN_PAN, -1000.0)

    def _select(self, channel: int, program: int, is_drum: bool) -> None:
        bank = DRUM_BANK if is_drum else 0
        if self._fs.program_select(channel, self._sfid, bank, program) != 0:
            # A failed select keeps the channel's previous instrument: unset it so it plays nothing.
            self._fs.program_unset(channel)

    def _note_on(self, channel: int, key: int, velocity: int) -> None:
        self._fs.noteon(channel, key, velocity)
        self._peak_voices = max(self._peak_voices, self._fs.get_active_voice_count())

    def _note_off(self, channel: int, key: int) -> None:
        self._fs.noteoff(channel, key)

    def _generate(self, samples: int) -> np.ndarray:
        stereo = np.zeros((samples, 2), dtype=np.float32)
        pointer = stereo.ctypes.data
        self._write_float(self._fs.synth, samples, pointer, 0, 2, pointer, 1, 2)
        return stereo.mean(axis=1, dtype=np.float32)

    def _kill_all(self) -> None:
        """Stop every voice at once and render until FluidSynth has freed them."""
        for channel in range(_FLUID_CHANNELS):
            self._fs.all_sounds_off(channel)
        self._generate(2 * _FLUID_BLOCK)

    def _silence(self, rendered: int, voices: int | None = None) -> None:
        """Stop all sound and put every voice slot this render used back into one fixed state.

        FluidSynth fades each new voice in over its first 64-sample block from the pan gain of the
        previous voice that used the same slot, so a note's onset depends on what played before.
        Filling the used slots with identical hard-left voices makes that history the same for
        every render (measured: up to 1e-3 different in a note's first block without this).
        """
        self._generate(-rendered % _FLUID_BLOCK)
        self._kill_all()
        target = min(self._polyphony, (voices or self._peak_voices) + _SETTLE_SPARE_VOICES)
        # Free slots are taken lowest index first, so `target` voices cover every slot used.
        for channel in _SETTLE_CHANNELS:
            for key in range(128):
                if self._fs.get_active_voice_count() >= target:
                    break
                self._fs.noteon(channel, key, 100)
        self._generate(4 * _FLUID_BLOCK)
        self._kill_all()
        self._peak_voices = 0

    def close(self) -> None:
        """Free the FluidSynth instance (idempotent)."""
        if self._fs is not None:
            self._fs.delete()
            self._fs = None


class TinySoundFont(Synth):
    """TinySoundFont, the pip-only backend (no system library; lower quality)."""

    backend = "tinysoundfont"

    def __init__(self, soundfont: Path, sample_rate: int) -> None:
        super().__init__(soundfont, sample_rate)
        try:
            import tinysoundfont
        except ImportError as error:
            # Its wheel declares pyaudio, which needs PortAudio headers and which we never use.
            raise ImportError("No synthesiser backend: pip install --no-deps tinysoundfont") from error

        self._tsf = tinysoundfont.Synth(gain=_TSF_GAIN_DB, samplerate=self.sample_rate)
        self._sfid = self._tsf.sfload(str(self.soundfont))

    def _select(self, channel: int, program: int, is_drum: bool) -> None:
        try:
            self._tsf.program_select(channel, self._sfid, 0, program, is_drums=is_drum)
        except RuntimeError:
            # Missing preset: leave the channel without one, so its notes are silent, not wrong.
            self._tsf.program_unset(channel)

    def _note_on(self, channel: int, key: int, velocity: int) -> None:
        self._tsf.noteon(channel, key, velocity)

    def _note_off(self, channel: int, key: int) -> None:
        self._tsf.noteoff(channel, key)

    def _generate(self, samples: int) -> np.ndarray:
        buffer = self._tsf.generate_simple(samples)
        stereo = np.frombuffer(buffer, dtype=np.float32).reshape(-1, 2)
        return stereo.mean(axis=1, dtype=np.float32)

    def _silence(self, rendered: int) -> None:
        # reset() ends every voice and clears the channels (the next render selects programs
        # again); a failed select took its channel out of the wrapper's map, so put all back.
        self._tsf.soundfonts[self._sfid].reset()
        for channel in range(16):
            self._tsf.channel[channel] = self._sfid
        # reset() still lets voices fade out quickly: render the fade away before the next render.
        self._generate(round(_FLUSH_SECONDS * self.sample_rate))

    def close(self) -> None:
        """Free the TinySoundFont instance (idempotent)."""
        if self._tsf is not None:
            self._tsf.sfunload(self._sfid)
            self._tsf = None


def fluidsynth_available() -> bool:
    """Tell whether pyfluidsynth imports and can create a synthesiser."""
    try:
        import fluidsynth

        probe = fluidsynth.Synth()
        probe.delete()
    except (ImportError, OSError, AttributeError, TypeError):
        return False
    return True


def open_synth(soundfont: str | Path, sample_rate: int, backend: Backend = "auto") -> Synth:
    """Load a soundfont into a synthesiser ("auto": FluidSynth if it works, else TinySoundFont)."""
    soundfont = Path(soundfont)
    if not soundfont.is_file():
        raise SoundfontNotFound(f"No soundfont file at {soundfont}")
    if backend == "auto":
        backend = "fluidsynth" if fluidsynth_available() else "tinysoundfont"
    if backend == "fluidsynth":
        return FluidSynth(soundfont, sample_rate)
    if backend == "tinysoundfont":
        return TinySoundFont(soundfont, sample_rate)
    raise ValueError(f"Unknown synth backend {backend!r}; use 'auto', 'fluidsynth' or 'tinysoundfont'")
