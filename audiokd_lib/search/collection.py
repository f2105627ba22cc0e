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

:func:`evaluate` scores a model on those tests; :func:`model_scores` and :func:`compare_rerankers` keep what it
measured by the key of the model's weights and the test segments (:attr:`SearchSets.tests_key`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import pandas as pd

from audiokd_lib.beats.pieces import render_beat_pieces, render_versions
from audiokd_lib.core.files import cached, digest, write_csv
from audiokd_lib.core.params import Params, SearchParams
from audiokd_lib.core.tracking import settings_key
from audiokd_lib.data import tables
from audiokd_lib.search.features import Segments, make_segments
from audiokd_lib.search.metrics import retrieval_scores
from audiokd_lib.search.model import Embedder, Recording

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


@dataclass
class SearchSets:
    """What notebook 10 trains on, validates on and tests on (segments: see features.make_segments).

    - `train`: the `train` compositions' recordings (training and transfer soundfonts);
    - `val`: (queries, catalogue): the `val` compositions in the training soundfont, searching the same
      compositions in the transfer soundfont (what early stopping and Optuna watch); without a transfer
      soundfont, the same segments twice: each searches the others of its piece;
    - `within`: the `test` and `heldout` compositions, each in its own soundfont: segments searching
      the other segments of their piece;
    - `twin_queries` against `catalogue`: every held-out-soundfont recording searching the
      training-soundfont recordings of every composition, for its twin (no queries without a
      held-out soundfont).
    """

    train: list[Recording]
    val: tuple[Segments, Segments]
    within: Segments
    twin_queries: Segments
    catalogue: Segments

    @cached_property
    def tests_key(self) -> str:
        """A fingerprint of the test segments (within, twin queries, catalogue): their groups and features."""
        return digest([[s.items["group"].to_numpy(), dict(s.features)]
                       for s in (self.within, self.twin_queries, self.catalogue)])


def search_sets(table: pd.DataFrame, features: list[dict], sp: SearchParams, sample_rate: int) -> SearchSets:
    """Split the collection's recordings (and their cached features) into the sets above."""
    def segments(mask: pd.Series) -> Segments:
        keep = mask.to_numpy()
        return make_segments(table[keep], [f for f, k in zip(features, keep) if k], sp, sample_rate)

    split, timbre = table["split"], table["timbre"]
    for needed in ("train", "val"):
        if not split.eq(needed).any():
            raise ValueError(f"no `{needed}` pieces among the {table['group'].nunique()} compositions: raise "
                             "beats.pieces.count (or its val_fraction) in the profile")
    val = segments(split.eq("val") & timbre.eq("training"))
    other = segments(split.eq("val") & timbre.eq("transfer"))
    return SearchSets(
        train=[Recording(g, f) for g, f, keep in zip(table["group"], features, split.eq("train")) if keep],
        val=(val, other if len(other) else val),
        within=segments((split.eq("test") & timbre.eq("training")) | (split.eq("heldout") & timbre.eq("heldout"))),
        twin_queries=segments(timbre.eq("heldout")),
        catalogue=segments(timbre.eq("training")))


def evaluate(model, sets: SearchSets, rerank=None) -> dict[str, float]:
    """{within_recall@1, ..., within_mAP, twin_recall@1, ..., twin_mAP, distinct@10s} of a model (or any
    callable from segment features to unit vectors), exact search, optionally re-ranked (PRF, MMR)."""
    within = model(sets.within.features)
    groups = sets.within.items["group"].to_numpy()
    scores = {f"within_{k}": v for k, v in retrieval_scores(within, groups, within, groups, exclude_self=True,
                                                            rerank=rerank).items()}
    if not len(sets.twin_queries):  # no held-out soundfont on this machine: nothing to measure
        return scores | {k.replace("within_", "twin_"): float("nan") for k in scores}
    twin = retrieval_scores(model(sets.twin_queries.features), sets.twin_queries.items["group"].to_numpy(),
                            model(sets.catalogue.features), sets.catalogue.items["group"].to_numpy(), rerank=rerank)
    return scores | {f"twin_{k}": v for k, v in twin.items()}


def model_scores(params: Params, name: str, model: Embedder, sets: SearchSets) -> dict[str, float]:
    """:func:`evaluate` of the model `name`, kept in `outputs/<profile>/search/scores-<name>.pkl` with the key of
    its weights and the test segments, and measured again only when those change."""
    key = settings_key({"model": digest(model.net), "sets": sets.tests_key})
    return cached(params.output_dir / "search" / f"scores-{name}.pkl", key, lambda: evaluate(model, sets))


def compare_rerankers(params: Params, model: Embedder, sets: SearchSets, rerankers: dict[str, Callable | None]
                      ) -> pd.DataFrame:
    """:func:`evaluate` of `model` once per re-ranker (None: plain search), one row each, indexed by its name
    (`query`). Kept in `outputs/<profile>/search/rerankers.pkl` with the key of the model's weights, the test
    segments, the re-rankers' names (which carry their settings) and `search.top`."""
    key = settings_key({"model": digest(model.net), "segments": sets.tests_key, "rerankers": list(rerankers),
                        "top": params.search.top})
    rows = cached(params.output_dir / "search" / "rerankers.pkl", key, lambda: [
        {"query": name, **{k.replace("_", " "): v for k, v in evaluate(model, sets, rerank).items()}}
        for name, rerank in rerankers.items()])
    return pd.DataFrame(rows).set_index("query")
