"""Class names shared by the datasets, the detector and the separators: OpenMIC-2018's instruments and MUSDB's groups."""

from __future__ import annotations

# (b) Pieces with stems, Slakh/MUSDB-like

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
