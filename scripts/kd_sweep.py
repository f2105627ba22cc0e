"""A small sweep of the distillation recipe on a profile's data: temperature, alpha, transfer set.

Run after notebooks 01-03 of the profile (its clip table, features and cached teacher logits):

    .venv/bin/python scripts/kd_sweep.py --params params/quick.yaml --seeds 0 \\
        --variants base "kd:3:0.7" "kd:2:0.9" "kd+transfer:3:0.7" "kd+transfer:2:0.9" "kd+transfer:1:0.9"

A variant is `base` (labels only), `kd:T:alpha` (cached soft labels) or `kd+transfer:T:alpha` (the
transfer set added). Each run is trained with the profile's student recipe (`train`), logged to the
profile's MLflow store with role `kd-sweep`, and printed as one line of validation, test and held-out
macro-F1. Choose by validation: the test and held-out columns are there to be reported, not tuned on.
"""

from __future__ import annotations

import argparse

import torch

from audiokd_lib import training
from audiokd_lib.audio.features import NormStats
from audiokd_lib.compress import soft_labels
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables
from audiokd_lib.experiment import evaluation, runs
from audiokd_lib.models import students


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/quick.yaml")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--variants", nargs="+", default=["base", "kd:2:0.9", "kd+transfer:2:0.9"])
    args = parser.parse_args()

    params = load_params(args.params)
    torch.set_num_threads(params.threads)
    clips = tables.load_clip_table(params, "clips")
    classes = training.class_names(clips)
    stats = NormStats.load(params.output_dir / "features" / "norm_stats.json", params.fingerprint("features"),
                           tables.fingerprint(clips))
    sets = evaluation.feature_sets(params, clips, students.build_student(params, classes, stats))
    logits, identity = soft_labels.load_teacher_logits(params, sets)
    jobs = []
    for variant in args.variants:
        kind, *recipe = variant.split(":")
        if kind not in ("base", "kd", "kd+transfer") or (kind != "base" and len(recipe) != 2):
            parser.error(f"variant {variant!r}: give base, kd:T:alpha or kd+transfer:T:alpha")
        if kind == "kd+transfer" and "transfer" not in sets:
            parser.error("kd+transfer needs a transfer split: set data.transfer_soundfonts and re-run notebook 01")
        kd = None if kind == "base" else params.kd.model_copy(
            update={"temperature": float(recipe[0]), "alpha": float(recipe[1]), "modes": ["cached"]})
        train, teacher_logits = sets["train"], logits["train"]
        if kind == "kd+transfer":
            train, teacher_logits = training.with_transfer_set(sets["train"], sets["transfer"], logits["train"],
                                                               logits["transfer"])
        for seed in (int(s) for s in args.seeds.split(",")):
            jobs.append(runs.RunJob("kd-sweep", f"kd-sweep-{variant.replace(':', '-')}-seed{seed}",
                                    students.build_student(params, classes, stats, seed=seed), seed,
                                    tags={"variant": variant, "teacher": identity},
                                    teacher_logits=None if kd is None else teacher_logits, kd=kd,
                                    train=None if kind == "base" else train))
    rows = runs.train_many(params, jobs, sets, tp=params.train, progress=False)
    print(f"teacher: {identity}")
    print(f"{'variant':24s} seed   val    test   held-out (macro-F1)")
    for job, row in zip(jobs, rows):
        print(f"{job.tags['variant']:24s} {job.seed:4d}  {row.get('val_macro_f1', float('nan')):.3f}  "
              f"{row['test_macro_f1']:.3f}  {row.get('heldout_macro_f1', float('nan')):.3f}")


if __name__ == "__main__":
    main()
