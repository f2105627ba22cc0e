"""Does distilling the large embedding model help notebook 10's small one? Variants over seeds, side by side.

    python scripts/search_ablation.py quick --variants none cosine:0.5 cosine:0.9 relational:0.5 --seeds 0 1 2

Reads the profile's search collection and cached features (notebook 10 makes them; this makes what is
missing), and for every seed trains the large contrastive model once, then one small contrastive model
per variant: `none` (the metric loss alone) or `KIND:ALPHA`, distilled with `search.kd_loss` KIND
(cosine or relational) at weight ALPHA. All use the profile's lr and supcon_temperature (not notebook 10's
Optuna choice). Prints one JSON line per model with its validation score (what a choice may use) and
its within-piece and cross-timbre scores, then the mean and spread over seeds. Nothing is logged to
MLflow: this is a measurement, not a model of the course. Each model and its scores are kept under
outputs/<profile>/ablations/search/ by their settings (the profile's search settings, the variant, the
seed, the data, the large model's weights): run again, only what changed is trained.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd
import torch

from audiokd_lib.core.files import cached, digest
from audiokd_lib.core.params import profile_params
from audiokd_lib.core.tracking import settings_key
from audiokd_lib.data.tables import plan_soundfonts
from audiokd_lib.search import model as embedding
from audiokd_lib.search.collection import evaluate, render_collection, search_sets
from audiokd_lib.search.features import cached_features

SHOWN = ["val_mAP", "within_mAP", "twin_recall@1", "twin_recall@10", "twin_mAP"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="profile name or params file, e.g. quick")
    parser.add_argument("--variants", nargs="+", default=["none", "cosine:0.5", "cosine:0.9", "relational:0.5"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    params = profile_params(args.profile)
    sp, rate = params.search, params.beats.pieces.sample_rate
    torch.set_num_threads(params.threads)
    table = render_collection(params, plan_soundfonts(params.data), progress=False)
    sets = search_sets(table, cached_features(table, params.output_dir / "features" / "search", sp, rate,
                                              progress=False), sp, rate)
    rows, folder = [], params.output_dir / "ablations" / "search"
    data = embedding.recordings_digest(sets.train, sets.val)
    tests = sets.tests_key

    def report(model_name: str, variant: str, seed: int, found: dict):
        row = {"model": model_name, "variant": variant, "seed": seed, **found["scores"]}
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    def trained(model: embedding.Embedder, recipe, seed: int, teacher=None) -> dict:
        fit = embedding.train_embedding(model, sets.train, sets.val, recipe, seed, teacher=teacher, progress=False)
        return {"weights": model.net.state_dict(),
                "scores": {**{f"val_{k}": v for k, v in fit.best.items()}, **evaluate(model, sets)}}

    for seed in args.seeds:
        teacher = embedding.build(sp, rate, width=sp.teacher_width, seed=seed)
        found = cached(folder / f"teacher-seed{seed}.pkl",
                       settings_key({"search": sp.model_dump(), "seed": seed, "data": data, "tests": tests}),
                       lambda: trained(teacher, sp, seed))
        teacher.net.load_state_dict(found["weights"])
        report("teacher", "-", seed, found)
        for variant in args.variants:
            kind, _, alpha = variant.partition(":")
            recipe = sp if kind == "none" else sp.model_copy(update={"kd_loss": kind, "kd_alpha": float(alpha)})
            student = embedding.build(recipe, rate, seed=seed)
            found = cached(folder / f"student-{variant.replace(':', '-')}-seed{seed}.pkl",
                           settings_key({"search": recipe.model_dump(), "variant": variant, "seed": seed, "data": data,
                                         "tests": tests, "teacher": None if kind == "none" else digest(teacher.net)}),
                           lambda: trained(student, recipe, seed, None if kind == "none" else teacher))
            report("student", variant, seed, found)
    frame = pd.DataFrame(rows)
    summary = frame.groupby(["model", "variant"], sort=False)[SHOWN].agg(["mean", "std"]).round(3)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(summary)


if __name__ == "__main__":
    main()
