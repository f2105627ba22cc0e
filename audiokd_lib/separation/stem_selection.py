"""Handing over only the stems of the instruments a classifier hears.

:func:`select_stems` maps predicted instruments (OpenMIC-2018 classes) to a separator's stems and
:func:`write_selection` writes only those, with a manifest that says what was chosen, why, and what
the mapping cannot do; :func:`separate_and_choose` runs the whole hand-over for one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from audiokd_lib.audio.loading import load_audio, save_audio
from audiokd_lib.classify import classify_file
from audiokd_lib.core.files import atomic_folder, write_json
from audiokd_lib.core.params import SeparationParams
from audiokd_lib.data.taxonomy import OPENMIC_CLASSES
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.separation.crnn import FOUR_STEMS
from audiokd_lib.separation.separator import SIX_STEMS, Separation, separate

# Instruments a separator's stems are named after, where the OpenMIC class has another name.
STEM_OF_CLASS = {"voice": "vocals", "cymbals": "drums", "drums": "drums", "bass": "bass", "guitar": "guitar",
                 "piano": "piano"}


def stem_mapping(sources: Iterable[str], classes: Iterable[str] = OPENMIC_CLASSES) -> dict[str, str]:
    """Which stem carries each instrument class: its own stem when the separator has one, else 'other'."""
    sources = list(sources)
    fallback = "other" if "other" in sources else sources[-1]
    return {c: STEM_OF_CLASS[c] if STEM_OF_CLASS.get(c) in sources else fallback for c in classes}


def mapping_table() -> pd.DataFrame:
    """The mapping for a 4-stem (htdemucs, the CRNN) and a 6-stem (htdemucs_6s) separator, one row per class."""
    return pd.DataFrame({"class": OPENMIC_CLASSES,
                         "4 stems": list(stem_mapping(FOUR_STEMS).values()),
                         "6 stems": list(stem_mapping(SIX_STEMS).values())})


def mapping_limits(mapping: dict[str, str], sources: Iterable[str]) -> list[str]:
    """What the mapping cannot do, in words, for the manifest and the notebook."""
    sources = list(sources)
    limits = []
    for instrument in ("guitar", "piano"):
        if mapping.get(instrument) not in (None, instrument):
            limits.append(f"{instrument} is inside '{mapping[instrument]}' for this {len(sources)}-stem separator "
                          f"(a 6-stem model such as htdemucs_6s has its own {instrument} stem)")
    shared: dict[str, list[str]] = {}
    for name, stem in mapping.items():
        shared.setdefault(stem, []).append(name)
    for stem, names in shared.items():
        if len(names) > 1:
            limits.append(f"several instruments share '{stem}' ({', '.join(names)}): a stem chosen for one of them "
                          "holds the others too, mixed together")
    unknown = [name for name in mapping if name not in OPENMIC_CLASSES]
    if unknown:
        limits.append(f"classes that are not OpenMIC-2018 instruments go to '{mapping[unknown[0]]}': "
                      f"{', '.join(unknown)}")
    limits.append("the classifier says which instruments play somewhere in the file, not when or in which stem; "
                  "a chosen stem also carries whatever the separator leaked into it from other instruments")
    return limits


@dataclass
class Selection:
    """Which stems to hand over and why: every stem has a reason, chosen or not."""

    scores: dict[str, float]
    threshold: float | None  # None: no classifier, every stem is handed over
    mapping: dict[str, str]
    chosen: list[str]
    reasons: dict[str, str]
    limits: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"scores": {c: round(p, 4) for c, p in self.scores.items()}, "threshold": self.threshold,
                "chosen": self.chosen, "reasons": self.reasons, "mapping": self.mapping, "limits": self.limits}


def select_stems(scores: dict[str, float] | None, threshold: float, sources: Iterable[str],
                 mapping: dict[str, str] | None = None, all_stems: bool = False) -> Selection:
    """Choose the stems whose instruments score at least `threshold`; reasons for every stem.

    `scores` maps class names to probabilities (a multi-label classifier's sigmoid outputs); None means
    no classifier was run, and then every stem is handed over, as with `all_stems`. `mapping` defaults to
    :func:`stem_mapping` of the separator's sources, over the OpenMIC classes and any other scored class.
    """
    sources = list(sources)
    classified = scores is not None
    scores = dict(scores or {})
    mapping = mapping or stem_mapping(sources, dict.fromkeys([*OPENMIC_CLASSES, *scores]))
    heard: dict[str, list[str]] = {s: [] for s in sources}
    for name, probability in sorted(scores.items(), key=lambda item: -item[1]):
        if probability >= threshold and mapping.get(name) in heard:
            heard[mapping[name]].append(f"{name} {probability:.2f}")
    reasons = {}
    for stem in sources:
        if heard[stem]:
            reasons[stem] = f"{', '.join(heard[stem])} >= {threshold:g}"
        elif not classified:
            reasons[stem] = "no classifier was run: every stem is handed over"
        else:
            mapped = [n for n, s in mapping.items() if s == stem and n in scores]
            best = max(mapped, key=scores.__getitem__, default=None)
            reasons[stem] = (f"no instrument of this stem reached {threshold:g}" +
                             (f" (best: {best} {scores[best]:.2f})" if best else " (no class maps here)"))
            if all_stems:
                reasons[stem] += "; written anyway (all stems asked for)"
    chosen = [s for s in sources if heard[s] or all_stems or not classified]
    return Selection(scores, threshold if classified else None, mapping, chosen, reasons,
                     mapping_limits(mapping, sources))


def write_selection(out_dir: str | Path, track: str, separation: Separation, selection: Selection,
                    info: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the chosen stems as `<out_dir>/<track>/<stem>.wav` and a `manifest.json`; return the folder.

    WAV files are 32-bit float, so a stem louder than full scale is not clipped. The folder is written
    under a temporary name and renamed into place once complete. An existing track folder is an error
    unless `overwrite` is True: a user's earlier output is never replaced silently.
    """
    out_dir = Path(out_dir)
    target = out_dir / track
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (audiokd separate --overwrite) "
                              "or choose another output folder")
    unknown = [s for s in selection.chosen if s not in separation.stems]
    if unknown:
        raise ValueError(f"chosen stems {unknown} are not among the separator's {list(separation.stems)}")
    with atomic_folder(target) as tmp:
        for stem in selection.chosen:
            save_audio(tmp / f"{stem}.wav", separation.stems[stem], separation.sample_rate, subtype="FLOAT")
        write_json(tmp / "manifest.json", {
            "track": track, "sample_rate": separation.sample_rate, "stems": list(separation.stems),
            "files": {s: f"{s}.wav" for s in selection.chosen}, **selection.as_dict(), **(info or {}),
        })
    return target


def separate_and_choose(separator: nn.Module, classifier: Classifier, path: str | Path, out_dir: str | Path,
                        track: str, sp: SeparationParams, info: dict[str, Any]) -> dict[str, Any]:
    """The whole hand-over for one file, as `audiokd separate` runs it: separate it (in `sp`'s segments), score
    its instruments with `classifier` (windows combined), choose the stems at `sp.threshold` and write them
    with their manifest to `out_dir/track`; return the manifest.

    `info` (the input, the separator's and classifier's runs, ...) goes into the manifest. A folder written
    before with the same `info` and settings, all its stems present, is kept: nothing is separated again.
    """
    info = {**info, "segment_seconds": sp.segment_seconds, "overlap": sp.overlap}
    folder = Path(out_dir) / track
    if (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        if (all(manifest.get(k) == json.loads(json.dumps(v)) for k, v in info.items())
                and manifest["threshold"] == sp.threshold
                and all((folder / name).is_file() for name in manifest["files"].values())):
            return manifest
    separation = separate(separator, load_audio(path, separator.samplerate, mono=False), separator.samplerate,
                          sp.segment_seconds, sp.overlap)
    prediction = classify_file(classifier, path, top_k=len(classifier.classes))
    selection = select_stems(dict(prediction.top), sp.threshold, separator.sources)
    # overwrite=True: a folder that does not match these inputs is an earlier output of this same step
    folder = write_selection(out_dir, track, separation, selection, info, overwrite=True)
    return json.loads((folder / "manifest.json").read_text())
