"""A model trained outside the classification runs, reused by its settings: trained once, logged once.

Notebooks 09 and 10 train small models of their own (beat trackers, embedding models) rather than the
classifiers of :mod:`audiokd_lib.experiment.runs`. Each is one MLflow run, through :func:`train_or_reuse`:

- reused when a finished run of its name has the same settings key
  (:func:`~audiokd_lib.core.tracking.settings_key`: spec, training settings, seed, a fingerprint of the data,
  the teacher's weights; :func:`~audiokd_lib.core.files.digest` makes the fingerprints);
- otherwise trained (resumed from its `last.pt` when interrupted), saved with its learning curve, logged
  (:func:`~audiokd_lib.core.tracking.log_trained`) and marked done, so the next call reuses it;

:func:`add_scores` adds the scores measured later to that run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from audiokd_lib.core import tracking
from audiokd_lib.core.params import Params
from audiokd_lib.models.checkpoints import read_checkpoint, write_checkpoint


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


def add_scores(params: Params, fit: Fit, scores: dict[str, float]) -> dict[str, float]:
    """Add scores measured after training to the model's MLflow run; those it already holds with the same
    value are not written again. Return what was written."""
    held = fit.run if fit.run is not None else {}
    new = {tracking.metric_name(k): float(v) for k, v in scores.items() if v == v}  # NaN: not measured, not logged
    new = {k: v for k, v in new.items() if not (k in held and held[k] == v)}
    if new:
        tracking.add_metrics(params, fit.run_id, new)
        fit.run = pd.concat([fit.run, pd.Series(new)]) if fit.run is not None else None
    return new
