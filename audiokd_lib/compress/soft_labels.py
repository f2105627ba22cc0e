"""The teacher's soft labels: its logits on every clip, computed once and checked before reuse.

Cached distillation never runs the teacher while the student trains: notebook 03 runs it once over
every split and stores the logits with the teacher's identity, its checkpoint's hash and the clips'
paths, so a changed teacher or dataset is never paired with an old cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from audiokd_lib.core.files import atomic_path, file_digest
from audiokd_lib.core.params import Params
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.training import FeatureSet, predict


def teacher_logits_path(params: Params) -> Path:
    return params.output_dir / "models" / "teacher" / "logits.pt"


def cache_teacher_logits(params: Params, teacher: Classifier, checkpoint: Path, sets: dict[str, FeatureSet]) -> Path:
    """Run the teacher once over every clip of every split and save its logits (the soft labels).

    Stored with the teacher's identity, its checkpoint's hash and the clips' paths, so a changed
    teacher or dataset is never paired with an old cache (see :func:`load_teacher_logits`). For an
    ensemble teacher these are the ensemble's: its averaged logits, its name, its own checkpoint.

    A cache made by the same checkpoint for the same clips is kept as it is: the teacher does not run again.
    """
    path = teacher_logits_path(params)
    digest = file_digest(checkpoint)
    if path.is_file():
        old = torch.load(path, weights_only=True)
        same_teacher = (old["checkpoint_sha256"], old["identity"], old["classes"]) == (
            digest, teacher.spec["identity"], teacher.classes)
        if same_teacher and all(s in old["splits"] and old["splits"][s]["paths"] == d.paths for s, d in sets.items()):
            print(f"{path}: the teacher's logits for these clips are saved already; reusing them")
            return path
    saved = {"identity": teacher.spec["identity"], "checkpoint_sha256": digest, "classes": teacher.classes,
             "splits": {s: {"paths": d.paths, "logits": predict(teacher, d)}
                        for s, d in tqdm(sets.items(), desc="teacher logits", unit="split")}}
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)
    return path


def load_teacher_logits(params: Params, sets: dict[str, FeatureSet]) -> tuple[dict[str, torch.Tensor], str]:
    """The cached soft labels for these feature sets, checked against the teacher and the clips."""
    path = teacher_logits_path(params)
    checkpoint = path.with_name("model.pt")
    if not path.is_file() or not checkpoint.is_file():
        raise FileNotFoundError(f"{path}: no cached teacher logits; run notebook 03_teacher first")
    saved = torch.load(path, weights_only=True)
    if saved["checkpoint_sha256"] != file_digest(checkpoint):
        raise ValueError(f"{path} was made by another teacher checkpoint than {checkpoint}; re-run notebook 03")
    out = {}
    for split, data in sets.items():
        cached = saved["splits"].get(split)
        if cached is None or cached["paths"] != data.paths or saved["classes"] != data.classes:
            raise ValueError(f"{path}: the cached logits of split {split!r} belong to other clips or classes "
                             "(the dataset changed); re-run notebook 03")
        out[split] = cached["logits"]
    return out, saved["identity"]
