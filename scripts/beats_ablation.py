"""Does distillation help notebook 09's causal student? Students over seeds and kd_alpha, side by side.

    python scripts/beats_ablation.py quick --alphas 0 0.2 0.5 0.8 --seeds 0 1

Reads the profile's rendered beat pieces (notebook 09 renders them; this renders what is missing),
trains the profile's teacher once, then one causal student per (alpha, seed): alpha 0 is labels
alone. Prints the DBN's beat and downbeat F-measures on `test` and `heldout` for each, and their mean
over seeds. Nothing is logged to MLflow: this is a measurement, not a model of the course. Each model
and its scores are kept under outputs/<profile>/ablations/beats/ by their settings (the profile's beats
settings, alpha, seed, the pieces, the teacher's weights): run again, only what changed is trained.
"""

from __future__ import annotations

import argparse
import json
import warnings

import pandas as pd
import torch

from audiokd_lib.beats import decode
from audiokd_lib.beats import model as beatnet
from audiokd_lib.beats.pieces import render_beat_pieces
from audiokd_lib.core.files import cached, digest
from audiokd_lib.core.params import profile_params
from audiokd_lib.core.tracking import settings_key
from audiokd_lib.data.tables import data_dir, plan_soundfonts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="profile name or params file, e.g. quick")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="mir_eval")
    params = profile_params(args.profile)
    bp = params.beats
    torch.set_num_threads(params.threads)
    pieces = render_beat_pieces(data_dir(params) / "beats", plan_soundfonts(params.data), bp.pieces,
                                seed=params.seed, backend=params.data.synth, progress=False)
    teacher = beatnet.build(bp, "teacher", seed=params.seed)
    sets = {s: beatnet.load_pieces(pieces[pieces["split"] == s], teacher.frontend, progress=False)
            for s in ("train", "val", "test", "heldout") if (pieces["split"] == s).any()}
    dbn = decode.dbn_for(bp, teacher.frontend.fps)

    def scores(model: beatnet.BeatModel) -> dict[str, float]:
        found = {}
        for split in ("test", "heldout"):
            if split in sets:
                result = decode.evaluate_dbn(beatnet.predict(model, sets[split]), [p.beats for p in sets[split]],
                                             [p.downbeats for p in sets[split]], dbn, bp.bar_lengths)
                found.update({f"{split} F": result["F"], f"{split} downbeat F": result["downbeat F"]})
        return found

    folder = params.output_dir / "ablations" / "beats"
    data = beatnet.pieces_digest([p for split in sets.values() for p in split], "key", "features", "targets", "beats")

    def trained_teacher() -> dict:
        beatnet.set_normalisation(teacher, sets["train"])
        beatnet.train_beats(teacher, sets["train"], sets["val"], bp, params.seed, progress=False)
        return {"weights": teacher.net.state_dict(), "scores": scores(teacher)}

    kept = cached(folder / "teacher.pkl", settings_key({"beats": bp.model_dump(), "seed": params.seed, "data": data}),
                  trained_teacher)
    teacher.net.load_state_dict(kept["weights"])
    rows = [{"model": "teacher", "alpha": None, "seed": params.seed, **kept["scores"]}]
    print(json.dumps(rows[0]), flush=True)
    soft = {}

    def student_scores(recipe, alpha: float, seed: int) -> dict[str, float]:
        if alpha > 0 and not soft:
            soft.update(zip([p.key for p in sets["train"]], beatnet.predict(teacher, sets["train"])))
        student = beatnet.build(recipe, "student", seed=seed)
        beatnet.set_normalisation(student, sets["train"])
        beatnet.train_beats(student, sets["train"], sets["val"], recipe, seed,
                            teacher_acts=soft if alpha > 0 else None, progress=False)
        return scores(student)

    for alpha in args.alphas:
        recipe = bp.model_copy(update={"kd_alpha": alpha})
        for seed in args.seeds:
            found = cached(folder / f"student-alpha{alpha:g}-seed{seed}.pkl",
                           settings_key({"beats": recipe.model_dump(), "seed": seed, "data": data,
                                         "teacher": digest(teacher.net) if alpha > 0 else None}),
                           lambda: student_scores(recipe, alpha, seed))
            rows.append({"model": "student", "alpha": alpha, "seed": seed, **found})
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.precision", 3):
        print(table)
        print("\nmean over seeds:\n", table[table["model"] == "student"].groupby("alpha").mean(numeric_only=True)
              .drop(columns="seed"))


if __name__ == "__main__":
    main()
