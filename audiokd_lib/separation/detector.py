"""The instrument detector that chooses stems (notebook 08): the course's student, multi-label, on whole pieces.

:func:`detector_params` are the profile's settings as the detector needs them, :func:`norm_stats` its
front end's normalisation, measured on the training pieces once per front end and data.
"""

from __future__ import annotations

import pandas as pd

from audiokd_lib.audio.features import NormStats, compute_norm_stats
from audiokd_lib.core.params import Params
from audiokd_lib.data import tables


def detector_params(params: Params) -> Params:
    """The profile's settings for the detector: a clip is a whole piece, and the teacher is always mn04, read
    zero-shot on AudioSet, whatever teacher notebooks 03-07 used."""
    return params.model_copy(update={
        "features": params.features.model_copy(update={"clip_seconds": params.data.pieces.seconds}),
        "teacher": params.teacher.model_copy(update={"kind": "efficientat", "checkpoint": "mn04_as"}),
    })


def norm_stats(params: Params, pieces: pd.DataFrame) -> NormStats:
    """Per-mel-bin mean and std of the training pieces through the detector's front end (`params` as
    :func:`detector_params` gives them), measured once per front end and data and then read back."""
    path = params.output_dir / "features" / "detector_norm_stats.json"
    features_fp, data_fp = params.fingerprint("features"), tables.fingerprint(pieces)
    try:
        return NormStats.load(path, features_fp, data_fp)
    except (FileNotFoundError, ValueError, KeyError):
        stats = compute_norm_stats(pieces, params.features, features_fp, data_fp)
        stats.save(path)
        return stats
