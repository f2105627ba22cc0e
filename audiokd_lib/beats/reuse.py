"""Nothing computed twice in notebooks 09 and 10: trained models and costly results kept by their settings.

Both notebooks train small models outside the classification runs (beat trackers, embedding models)
and compute results that take seconds (evaluations over pieces, DBN decoding, embeddings of a
collection, an Optuna study, ONNX exports). Each goes through one of two functions here:

- :func:`train_or_reuse`: a model run, reused by its settings key (:func:`~audiokd_lib.core.tracking.settings_key`:
  spec, training settings, seed, a fingerprint of the data, the teacher's weights), resumed from its
  `last.pt` when interrupted, otherwise trained, saved with its learning curve, logged as one MLflow run
  (:func:`~audiokd_lib.core.tracking.log_trained`) and marked done;
  :func:`add_scores` adds the scores measured later to that run;
- :func:`cached`: a result stored beside its settings key, computed again only when the key changes.

Notebook 10 (:mod:`audiokd_lib.search`) builds on notebook 09's pieces and uses these too.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from audiokd_lib.core import tracking
from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.params import Params
from audiokd_lib.models.checkpoints import read_checkpoint, write_checkpoint

T = TypeVar("T")


def digest(*things: Any) -> str:
    """A short sha256 of tensors, arrays, modules (their state_dict), strings and numbers, in order."""
    h = hashlib.sha256()

    def add(thing: Any) -> None:
        if isinstance(thing, nn.Module):
            thing = thing.state_dict()
        if isinstance(thing, dict):
            for key in sorted(thing):
                h.update(str(key).encode())
                add(thing[key])
        elif isinstance(thing, (list, tuple)):
            for item in thing:
                add(item)
        elif isinstance(thing, torch.Tensor):
            add(thing.detach().cpu().contiguous().numpy())
        elif isinstance(thing, np.ndarray):
            h.update(str((thing.dtype, thing.shape)).encode())
            h.update(np.ascontiguousarray(thing).tobytes())
        else:
            h.update(repr(thing).encode())

    for thing in things:
        add(thing)
    return h.hexdigest()[:16]


@contextmanager
def run_folder(run_dir: str | Path | None) -> Iterator[Path]:
    """`run_dir`, or a temporary folder removed afterwards for a training nobody resumes (an Optuna trial)."""
    if run_dir is not None:
        yield Path(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix="audiokd-run-") as tmp:
        yield Path(tmp)


def cached(path: str | Path, settings: dict[str, Any], compute: Callable[[], T], needs: Iterable[Path] = ()) -> T:
    """`compute()`'s result, kept in `path` (a pickle) with the key of `settings`: read back while the key
    is the same (and the files `compute` writes, `needs`, are all there), computed again (and kept) when not."""
    path, key = Path(path), tracking.settings_key(settings)
    if path.is_file() and all(Path(p).is_file() for p in needs):
        saved = pd.read_pickle(path)  # our own file, written below
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pd.to_pickle({"key": key, "settings": settings, "value": value}, tmp)
    return value


@dataclass
class Fit:
    """What training left: the learning curve, the kept epoch and its validation scores, the MLflow run."""

    history: pd.DataFrame     # one row per epoch: epoch, train_loss, validation scores, seconds
    best_epoch: int
    best: dict[str, float]    # the kept epoch's validation scores
    run: pd.Series | None = None  # its finished MLflow run
    reused: bool = False      # True: found finished with the same settings, not trained now

    @property
    def run_id(self) -> str:
        return self.run["run_id"]


def train_or_reuse(params: Params, role: str, name: str, settings: dict[str, Any], net: nn.Module, spec: dict,
                   train: Callable[[Path], Fit], final: Callable[[Fit], dict[str, float]],
                   params_file: str | Path | None = None) -> Fit:
    """Train `net` (through `train(run_dir)`, which resumes from `run_dir/last.pt`) unless a finished run
    of `name` has the same `settings`: then its weights are loaded into `net` and its learning curve returned.

    A new run is saved as `outputs/<profile>/models/<name>/model.pt` (spec, weights, learning curve) and
    logged as one MLflow run of `role` with its curve, `final(fit)` and the weights; `settings`' key is its
    `settings` tag. The run folder is then marked done, so the next call reuses it.
    """
    run_dir = params.output_dir / "models" / name
    weights = run_dir / "model.pt"
    key = tracking.settings_key(settings)
    row = tracking.reuse_or_prepare(params, role, name, key, run_dir, done_marker=weights)
    if row is not None:
        saved = read_checkpoint(weights)
        net.load_state_dict(saved["state_dict"])
        net.eval()
        fit = saved["fit"]
        return Fit(pd.DataFrame(fit["history"]), fit["best_epoch"], fit["best"], row, reused=True)
    fit = train(run_dir)
    write_checkpoint(weights, spec, net.state_dict(), fit={
        "history": fit.history.to_dict("records"), "best_epoch": fit.best_epoch, "best": fit.best})
    run_id = tracking.log_trained(params, role, name, spec["kind"], weights, fit.history, final(fit), params_file,
                                  tags={"settings": key})
    fit.run = tracking.finish_run(params, role, run_dir, run_id)
    return fit


def metric_name(key: str) -> str:
    """A score's name as MLflow keeps it ("@" is not allowed: recall@5 is recall_at_5)."""
    return key.replace("@", "_at_")


def add_scores(params: Params, fit: Fit, scores: dict[str, float]) -> dict[str, float]:
    """Add scores measured after training to the model's MLflow run; those it already holds with the same
    value are not written again. Return what was written."""
    held = fit.run if fit.run is not None else {}
    new = {metric_name(k): float(v) for k, v in scores.items() if v == v}  # NaN: not measured, not logged
    new = {k: v for k, v in new.items() if not (k in held and held[k] == v)}
    if new:
        tracking.add_metrics(params, fit.run_id, new)
        fit.run = pd.concat([fit.run, pd.Series(new)]) if fit.run is not None else None
    return new


def pieces_digest(items: Iterable[Any], *fields: str) -> str:
    """A fingerprint of training data: the named fields (tensors, arrays, keys) of every item, in order."""
    return digest([[getattr(item, f) for f in fields] for item in items])
