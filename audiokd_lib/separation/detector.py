"""The instrument detector that chooses stems (notebook 08): the course's student, multi-label, on whole pieces.

:func:`detector_params` are the profile's settings as the detector needs them, :func:`norm_stats` its
front end's normalisation, measured on the training pieces once per front end and data,
:func:`zero_shot_logits` the AudioSet teacher's answers for the OpenMIC classes, and :func:`named_on_solos`
what each trained detector names on the real solo recordings. Each is computed once per inputs (settings,
clips, checkpoints) and read back by a second run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from audiokd_lib import training
from audiokd_lib.audio.features import NormStats, compute_norm_stats
from audiokd_lib.classify import classify_file
from audiokd_lib.core.files import cached
from audiokd_lib.core.params import Params
from audiokd_lib.data import tables
from audiokd_lib.models import teachers
from audiokd_lib.models.checkpoints import load_checkpoint
from audiokd_lib.models.classifier import Classifier


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


def zero_shot_logits(params: Params, audioset: Classifier, sets: dict[str, training.FeatureSet],
                     classes: list[str]) -> dict[str, torch.Tensor]:
    """The AudioSet tagger's logits of `classes` (OpenMIC's) on every split, read zero-shot
    (:func:`~audiokd_lib.models.teachers.openmic_logits`); run once per teacher, clips and front end."""
    key = training.result_key(sets, teacher=teachers.teacher_identity(audioset), features=params.features,
                              classes=classes)
    return cached(params.output_dir / "models" / "detector-teacher-logits.pkl", key,
                  lambda: {split: teachers.openmic_logits(training.predict(audioset, clips), audioset.classes, classes)
                           for split, clips in sets.items()})


def named_on_solos(params: Params, detectors: dict[str, Path], solos: pd.DataFrame, threshold: float
                   ) -> pd.DataFrame:
    """What each detector (name: checkpoint) names on each real solo recording (`file`, `openmic_class`,
    `path` columns): the classes at probability `threshold` or more, windows combined as `audiokd classify`
    does. Run once per checkpoints, recordings and threshold."""
    def name_them() -> pd.DataFrame:
        heard = pd.DataFrame({"file": solos["file"], "plays": solos["openmic_class"]})
        for name, checkpoint in detectors.items():
            model = load_checkpoint(checkpoint)
            answers = [classify_file(model, path, top_k=len(model.classes)).top for path in solos["path"]]
            heard[name] = [", ".join(c for c, p in top if p >= threshold) for top in answers]
        return heard

    key = training.result_key("\n".join(solos["path"]), list(detectors.values()), threshold=threshold)
    return cached(params.output_dir / "models" / "detector-real-solos.pkl", key, name_them)
