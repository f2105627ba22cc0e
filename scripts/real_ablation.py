"""What carries rendered-note models to real recordings? Train one model per recipe change and score it.

Each variant trains one teacher member or one labels-only student (seed 0, the profile's recipe) on
the profile's cached features, with one change, and prints its test, held-out and real scores as a
JSON line. Nothing is logged to MLflow and no table changes: this is the experiment behind the
README's "Real recordings" section, to be repeated, not a step of the course.

    python scripts/real_ablation.py --profile quick teacher - eq reverb eq,reverb transfer lr=3e-4
    python scripts/real_ablation.py --profile quick student - eq reverb transfer transfer,reverb
    python scripts/real_ablation.py --profile quick zero-shot

A variant is "-" (the recipe as it is) or comma-joined changes: `eq` and `reverb` add those training
augmentations; `transfer` also trains on the transfer soundfont's clips *with their labels* (a second
training timbre); `lr=<value>` sets the peak learning rate; `finetune=head|last_blocks` (teacher)
trains only the new head, or it and the last blocks, keeping more of what AudioSet taught. Run notebooks 01-02 of the profile first
(and set AUDIOKD_REAL_EVAL or let notebook 01 download the recordings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from audiokd_lib import training
from audiokd_lib.audio.features import NormStats
from audiokd_lib.core.params import profile_params
from audiokd_lib.data import tables
from audiokd_lib.experiment import evaluation
from audiokd_lib.models import students, teachers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("model", choices=["teacher", "student", "zero-shot"])
    parser.add_argument("variants", nargs="*", default=["-"])
    args = parser.parse_args()
    params = profile_params(args.profile)
    torch.set_num_threads(params.threads)
    clips = tables.load_clip_table(params, "clips")
    classes = training.class_names(clips)
    stats = NormStats.load(params.output_dir / "features" / "norm_stats.json", params.fingerprint("features"),
                           tables.fingerprint(clips))

    def build(settings=params):
        if args.model in ("teacher", "zero-shot"):
            return teachers.build_teacher(settings, classes, progress=False, seed=args.seed)
        return students.build_student(settings, classes, stats, seed=args.seed)

    sets = evaluation.feature_sets(params, clips, build(), progress=False)
    if "real" not in sets:
        print("note: no real recordings found (run notebook 01 with AUDIOKD_REAL_EVAL or a network): no real scores")
    if args.model == "zero-shot":
        print(json.dumps({"model": "zero-shot", **zero_shot(params, sets)}))
        return
    recipe = params.teacher.train if args.model == "teacher" else params.train
    for variant in args.variants:
        changes = [] if variant == "-" else variant.split(",")
        tp, train, settings = recipe.model_copy(update={"seeds": [args.seed]}), sets["train"], params
        for change in changes:
            if change in ("eq", "reverb"):
                tp = tp.model_copy(update={"augment": [*tp.augment, change]})
            elif change == "transfer":
                extra = sets["transfer"]
                train = dataclasses.replace(train, features=torch.cat([train.features, extra.features]),
                                            targets=torch.cat([train.targets, extra.targets]),
                                            paths=train.paths + extra.paths, cache_file=None)
            elif change.startswith("lr="):
                tp = tp.model_copy(update={"lr": float(change.removeprefix("lr="))})
            elif change.startswith("finetune=") and args.model == "teacher":
                teacher = settings.teacher.model_copy(update={"finetune": change.removeprefix("finetune=")})
                settings = settings.model_copy(update={"teacher": teacher})
            else:
                parser.error(f"unknown change {change!r} in variant {variant!r}: eq, reverb, transfer, lr=<value> "
                             "or (teacher) finetune=head|last_blocks|all")
        model, start = build(settings), time.time()
        with tempfile.TemporaryDirectory() as run_dir:
            training.fit(model, train, sets["val"], tp, params, args.seed, Path(run_dir), progress=False)
        found = evaluation.scores(model, sets)
        print(json.dumps({"model": args.model, "variant": variant, "seconds": round(time.time() - start),
                          **{k: round(v, 3) for k, v in found.items() if "top3" not in k}}), flush=True)


# TinySOL instruments that AudioSet's ontology names (it has no oboe, bassoon, viola or tuba).
TINYSOL_TO_AUDIOSET = {"Flute": "Flute", "Violin": "Violin, fiddle", "Violoncello": "Cello", "Contrabass": "Double bass",
                       "Trumpet in C": "Trumpet", "Alto Saxophone": "Saxophone", "Clarinet in Bb": "Clarinet",
                       "French Horn": "French horn", "Trombone": "Trombone", "Accordion": "Accordion"}


def zero_shot(params, sets) -> dict[str, float]:
    """The AudioSet mn04 as published, answering with the largest of the AudioSet outputs of the instruments
    it has a class for: top-1 accuracy on each split (clips of instruments without an AudioSet class count
    as wrong, as they must)."""
    audioset = teachers.pretrained_audioset(params, progress=False)
    mapped = [c for c in sets["train"].classes if c in TINYSOL_TO_AUDIOSET]
    columns = [audioset.classes.index(TINYSOL_TO_AUDIOSET[c]) for c in mapped]
    found = {"mapped_classes": len(mapped)}
    for split in ("test", "heldout", "real"):
        if split in sets:
            data = sets[split]
            logits = training.predict(audioset, data)[:, columns]
            if data.groups is not None:  # windows of one recording: the mean of their sigmoids
                logits = torch.stack([torch.sigmoid(logits[data.groups == g]).mean(0) for g in data.groups.unique()])
                truth = [data.targets[(data.groups == g).nonzero()[0, 0]] for g in data.groups.unique()]
            else:
                truth = list(data.targets)
            said = [mapped[i] for i in logits.argmax(1).tolist()]
            found[f"{split}_accuracy"] = round(sum(s == data.classes[int(t)] for s, t in zip(said, truth)) / len(said), 3)
    return found


if __name__ == "__main__":
    main()
