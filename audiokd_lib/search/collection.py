"""The music notebook 10 searches: notebook 09's procedural pieces, some played by a second band.

Every composition (one index of :func:`~audiokd_lib.beats.pieces.compose`) keeps notebook 09's split.
Besides 09's recordings, some compositions are rendered again with another soundfont, the same score
in other timbres:

- `train` and `val` compositions in the transfer soundfonts: during training, the same music in
  other timbres is a positive; validation (early stopping, the Optuna search) measures it too;
- `test` compositions in the held-out soundfont, and `heldout` compositions in the training
  soundfont: each unseen composition then exists in both, and its held-out-soundfont recording must
  find its training-soundfont *twin* (cross-timbre retrieval). No model ever hears the held-out soundfont
  before it is tested.
"""

from __future__ import annotations

import pandas as pd

from audiokd_lib.beats.pieces import render_beat_pieces, render_versions
from audiokd_lib.data import tables
from audiokd_lib.experiment.params import Params
from audiokd_lib.files import write_csv

COLUMNS = ["sample_key", "path", "soundfont", "group", "split", "timbre"]


def render_collection(params: Params, plan: tables.SoundfontPlan, progress: bool = True) -> pd.DataFrame:
    """Render (or resume) every recording; return the table (`search_pieces.csv`): one row a recording,
    `group` its composition, `split` the composition's, `timbre` training | transfer | heldout (soundfont role)."""
    root, pp, seed, backend = tables.data_dir(params) / "beats", params.beats.pieces, params.seed, params.data.synth
    pieces = render_beat_pieces(root, plan, pp, seed=seed, backend=backend, progress=progress)
    pieces["group"] = pieces["sample_key"].str.removeprefix("beats-").astype(int)
    pieces["timbre"] = ["heldout" if s == "heldout" else "training" for s in pieces["split"]]
    split_of = dict(zip(pieces["group"], pieces["split"]))
    parts = [pieces]

    def again(soundfont: tuple, splits: tuple[str, ...], timbre: str) -> None:
        groups = sorted(g for g, s in split_of.items() if s in splits)
        table = render_versions(root, soundfont, groups, pp, seed, backend, progress=progress)
        table["group"], table["split"], table["timbre"] = groups, [split_of[g] for g in groups], timbre
        parts.append(table)

    for soundfont in plan.transfer.items():
        again(soundfont, ("train", "val"), "transfer")
    if plan.heldout is not None:
        again(plan.heldout, ("test",), "heldout")
        again(next(iter(plan.train.items())), ("heldout",), "training")
    table = pd.concat(parts, ignore_index=True)[COLUMNS]
    write_csv(root / "search_pieces.csv", table)
    return table
