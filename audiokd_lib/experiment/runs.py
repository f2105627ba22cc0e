"""One model run, start to finish: train (or resume, or reuse), evaluate the same way as every other model, log.

Notebooks 03-07 (and 08's instrument detectors) hand their runs (one per seed and variant) to
:func:`train_many`, which trains them side by side (:mod:`~audiokd_lib.experiment.workers`), then evaluates
each the same way (:mod:`~audiokd_lib.experiment.evaluation`) and logs it as one MLflow run. A model made without
training (a pruned copy, an ensemble) goes through :func:`log_model`; notebook 08's separator, the mask
CRNN, through :func:`train_separator`, and its SDR scores through :func:`separator_scores`.

A run that already finished with the same settings (:func:`run_key`) is not trained again: its MLflow
row is returned (through :func:`~audiokd_lib.core.tracking.reuse_or_prepare`). A run that was interrupted
resumes from its last epoch; a killed notebook's worker processes die with it
(`workers.die_with_parent`), so none trains on into a folder that the next run resumes from.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from audiokd_lib.core import metrics, plots, tracking
from audiokd_lib.core.files import cached, file_digest, write_csv
from audiokd_lib.core.params import KDParams, Params, TrainParams
from audiokd_lib.data.tables import fingerprint
from audiokd_lib.experiment.workers import (die_with_parent, fit_in_worker, fit_job, job_payload, save_job,
                                            separator_payload, train_crnn_job, with_torchrun)
from audiokd_lib.experiment.evaluation import evaluate, loss_figure, measure, scores, sets_fingerprint
from audiokd_lib.models.checkpoints import load_checkpoint, save_checkpoint
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.separation import crnn, quality
from audiokd_lib.training import FeatureSet, FitResult


def run_key(params: Params, role: str, seed: int, tp: TrainParams | None, data_fp: str, extra: dict) -> str:
    """What makes two classifier runs the same run: settings, data, seed, and the teacher behind them."""
    return tracking.settings_key({"role": role, "seed": seed, "train": tp and tp.model_dump(),
                         "features": params.features.model_dump(),
                         "augment": params.augment.model_dump(), "student": params.student.model_dump(),
                         "teacher": params.teacher.model_dump(), "data": data_fp, **extra})


@dataclass
class RunJob:
    """One model to train and log: what :func:`train_many` needs besides the shared data and recipe."""

    role: str                                   # teacher, student-baseline, student-kd, ...
    name: str                                   # the model's name in tables, folders and MLflow
    model: Classifier                           # trained in place
    seed: int
    tags: dict[str, str] = field(default_factory=dict)
    teacher: Classifier | None = None           # consistent distillation: the teacher sees every batch
    teacher_logits: torch.Tensor | None = None  # cached distillation: the training clips' soft labels
    kd: KDParams | None = None                  # the distillation loss's temperature and alpha; None: labels only
    metrics: dict[str, float] = field(default_factory=dict)  # logged with the measured ones (log_model's)
    score_splits: tuple[str, ...] = ()          # splits scored besides EVAL_SPLITS when logged (e.g. "val")
    train: FeatureSet | None = None             # this job's training clips, if not the shared `train` split


def _job_sets(job: RunJob, sets: dict[str, FeatureSet]) -> dict[str, FeatureSet]:
    return sets if job.train is None else {**sets, "train": job.train}


def train_many(params: Params, jobs: list[RunJob], sets: dict[str, FeatureSet], *, tp: TrainParams,
               params_file: str | Path | None = None, workers: int | None = None,
               progress: bool = True) -> list[pd.Series]:
    """Train several runs (seeds, variants) side by side, then evaluate and log each; return their MLflow rows.

    Training is what costs, and runs are independent: they go to `workers` processes (default:
    `params.workers`) of `params.threads` threads each. Evaluation and the latency measurement happen
    afterwards, one run at a time in this process, so no timing is taken while another run trains.
    Finished runs with the same settings are reused; interrupted ones resume from their last epoch.
    """
    rows, todo = {}, []
    for job in jobs:
        row = _reuse_job(params, job, _job_sets(job, sets), tp)
        if row is None:
            todo.append(job)
        else:
            rows[job.name] = row
    workers = min(workers or params.workers or _default_workers(), len(todo))
    processes = params.distributed.processes
    results = {}
    if processes > 1:  # one run at a time, trained by several processes together (torchrun, data-parallel)
        for job in todo:
            results[job.name] = with_torchrun(params, write_job(params, job, sets, tp))
    elif workers <= 1:
        for job in todo:
            results[job.name] = fit_job(params, job, _run_dir(params, job), _job_sets(job, sets)["train"],
                                                sets["val"], tp, progress)
    else:
        # spawn, not fork: a forked copy of a process that already ran torch threads can deadlock.
        print(f"training {len(todo)} runs in {workers} processes of {params.threads} thread(s) each")
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(fit_in_worker,
                                   job_payload(params, job, _run_dir(params, job), _job_sets(job, sets), tp)): job
                       for job in todo}
            for future in tqdm(as_completed(futures), total=len(futures), desc="runs", disable=not progress):
                job, result = futures[future], future.result()
                results[job.name] = result
                print(f"{job.name}: best val {result.metric} {result.best_score:.3f} at epoch {result.best_epoch} "
                      f"of {len(result.history)} ({result.history['seconds'].sum():.0f} s)")
    if processes > 1 or workers > 1:  # trained in other processes: their best weights are in fitted.pt
        for job in todo:
            fitted = _run_dir(params, job) / "fitted.pt"
            job.model.load_state_dict(torch.load(fitted, weights_only=True))
            job.model.eval()
    for job in todo:
        rows[job.name] = _log_run(params, job, _job_sets(job, sets), results[job.name], params_file)
        (_run_dir(params, job) / "fitted.pt").unlink(missing_ok=True)
    return [rows[job.name] for job in jobs]


def _default_workers() -> int:
    if torch.cuda.is_available():
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for_one_run(params: Params) -> int:
    """The threads one run with nothing beside it may use: those of all the processes that would otherwise train
    runs side by side (`workers` of `threads` each, by default one per CPU core)."""
    return (params.workers or _default_workers()) * params.threads


def model_dir(params: Params, name: str) -> Path:
    """The folder of the model run called `name`: its checkpoint, history, figures and reports."""
    return params.output_dir / "models" / name


def checkpoint_path(params: Params, name: str) -> Path:
    """The best weights of the model run called `name` (e.g. "teacher", "student-kd-cached-seed0")."""
    return model_dir(params, name) / "model.pt"


def _run_dir(params: Params, job: RunJob) -> Path:
    return model_dir(params, job.name)


def _job_tags(job: RunJob) -> dict[str, str]:
    return {"seed": str(job.seed), **job.tags}


def _reuse_or_prepare(params: Params, role: str, name: str, key: str) -> pd.Series | None:
    return tracking.reuse_or_prepare(params, role, name, key, model_dir(params, name),
                                     done_marker=checkpoint_path(params, name))


def _finish(params: Params, role: str, name: str, run_id: str) -> pd.Series:
    return tracking.finish_run(params, role, model_dir(params, name), run_id)


def _log_history(history: pd.DataFrame) -> None:
    for row in history.to_dict("records"):
        tracking.log_epoch({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))


def _reuse_job(params: Params, job: RunJob, sets: dict[str, FeatureSet], tp: TrainParams | None
               ) -> pd.Series | None:
    """The MLflow row of a finished run with the job's settings (its weights loaded into the job), else None."""
    # (temperature, alpha) as a list: the key a bare tuple gave before KDParams, so earlier runs stay reusable.
    kd = None if job.kd is None else [job.kd.temperature, job.kd.alpha]
    # The weights it starts from: a pruned student re-trained from another parent is another run.
    start = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in job.model.state_dict().values()))
    # Data-parallel training normalises slices of each batch (BatchNorm): another run than one process's.
    processes = {} if tp is None or params.distributed.processes == 1 else {"processes": params.distributed.processes}
    key = run_key(params, job.role, job.seed, tp, sets_fingerprint(sets),
                  {**_job_tags(job), "kd": kd, "start": start.hexdigest()[:12], **processes})
    row = _reuse_or_prepare(params, job.role, job.name, key)
    if row is not None:
        job.model = load_checkpoint(checkpoint_path(params, job.name))
        if "real" in sets and pd.isna(row.get("real_accuracy")) and pd.isna(row.get("real_mAP")):  # found later
            tracking.add_metrics(params, row["run_id"], scores(job.model, sets, splits=("real",)))
            row = _finish(params, job.role, job.name, row["run_id"])
    return row


def write_job(params: Params, job: RunJob, sets: dict[str, FeatureSet], tp: TrainParams) -> Path:
    """Everything training one classifier run needs (settings, model, training and validation clips), saved
    as the run folder's `job.pt`: what `torchrun ... -m audiokd_lib fit JOB` trains, on one machine or several."""
    run_dir = _run_dir(params, job)
    return save_job(run_dir, job_payload(params, job, run_dir, _job_sets(job, sets), tp))


def log_model(params: Params, role: str, name: str, model: Classifier, sets: dict[str, FeatureSet], *,
              tags: dict[str, str] | None = None, params_file: str | Path | None = None,
              metrics: dict[str, float] | None = None, score_splits: tuple[str, ...] = ()) -> pd.Series:
    """Evaluate and log a model made without training (a pruned copy): the same measures as every run.

    `metrics` are logged besides those, and the scores on `score_splits` (a teacher ensemble's `val`, which
    :func:`best_run` reads), measured only when the run is logged. Logged again only when the model's
    weights or the data changed; otherwise its MLflow row is reused and nothing is measured.
    """
    weights = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values()))
    job = RunJob(role, name, model, params.seed, {**(tags or {}), "weights": weights.hexdigest()[:12]},
                 metrics=dict(metrics or {}), score_splits=score_splits)
    row = _reuse_job(params, job, sets, None)
    return row if row is not None else _log_run(params, job, sets, None, params_file)


def _log_run(params: Params, job: RunJob, sets: dict[str, FeatureSet], result: FitResult | None,
             params_file: str | Path | None) -> pd.Series:
    """Evaluate a job's model, save its checkpoint and figures, and log all of it as one MLflow run."""
    model = job.model
    checkpoint = checkpoint_path(params, job.name)
    tags = {"model": job.name, "teacher": "none (labels only)",
            "dataset_fingerprint": sets["train"].data_fingerprint, **_job_tags(job)}
    with tracking.start_run(params, job.role, job.name, tags, params_file) as run:
        save_checkpoint(model, checkpoint, role=job.role, seed=job.seed, run_id=run.info.run_id)
        results, artifacts = evaluate(params, model, sets, job.name, _run_dir(params, job))
        if result is not None:
            _log_history(result.history)
            fig = loss_figure(result.history, result.metric, job.name)
            artifacts.append(plots.save_fig(fig, params, f"{job.name}_loss"))
            plt.close(fig)
            results.update({"best_epoch": result.best_epoch, f"val_{result.metric}": result.best_score,
                            "epochs_run": len(result.history),
                            "train_seconds": float(result.history["seconds"].sum())})
        example = sets["val"].features[:1]
        tracking.log_final({**results, **job.metrics, **scores(model, sets, splits=job.score_splits),
                            **measure(params, model, checkpoint, example),
                            "clip_frames": example.shape[-1]})
        tracking.log_artifacts([checkpoint, *artifacts])
        run_id = run.info.run_id
    return _finish(params, job.role, job.name, run_id)


SEPARATOR_NAME = "separator-crnn"  # the CRNN's model name in MLflow and its run folder


def train_separator(params: Params, pieces: pd.DataFrame, params_file: str | Path | None = None,
                    progress: bool = True) -> pd.Series:
    """Train (or resume, or reuse) the profile's mask CRNN on the rendered pieces, measure it, log it.

    Returns the MLflow row of the run, of role `separator`, with the CRNN's checkpoint at the root of
    its artifacts (where `audiokd separate --separator crnn` finds it) and its learning curve. Its cost
    (MACs, latency) is measured for one second of audio, on torch's current number of threads.
    """
    cp, sample_rate, name = params.separation.crnn, params.data.pieces.sample_rate, SEPARATOR_NAME
    data_fp = fingerprint(pieces)
    processes = {} if params.distributed.processes == 1 else {"processes": params.distributed.processes}
    key = tracking.settings_key({"role": "separator", "seed": params.seed, "crnn": cp.model_dump(),
                        "sample_rate": sample_rate, "data": data_fp, **processes})
    row = _reuse_or_prepare(params, "separator", name, key)
    if row is not None:
        return row
    if params.distributed.processes > 1:  # trained by several processes together (torchrun, data-parallel)
        run_dir = model_dir(params, name)
        result = with_torchrun(params, save_job(run_dir, separator_payload(params, pieces, run_dir)))
        model = crnn.load_crnn(result.checkpoint)
    else:
        model, result = train_crnn_job(params, pieces, model_dir(params, name), progress=progress)
    fig = loss_figure(result.history, None, f"{name} (stopped: {result.stopped})", "L1 magnitude loss")
    curve = plots.save_fig(fig, params, f"{name}_loss")
    plt.close(fig)
    cost = metrics.complexity(model, torch.zeros(1, 1, sample_rate), result.checkpoint,
                              threads=torch.get_num_threads(), repeats=5, warmup=1, batch=8)
    final = {**asdict(cost), "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
             "epochs_run": len(result.history), "train_seconds": float(result.history["seconds"].sum())}
    run_id = tracking.log_trained(params, "separator", name, "separation", result.checkpoint, result.history, final,
                                  params_file, tags={"settings": key, "dataset_fingerprint": data_fp,
                                                     "stopped": result.stopped}, artifacts=[curve])
    return _finish(params, "separator", name, run_id)


def separator_scores(params: Params, run: pd.Series, separator: torch.nn.Module, pieces: dict[str, pd.DataFrame],
                     name: str = "CRNN") -> dict[str, quality.SeparationScores]:
    """SDR scores (:func:`~audiokd_lib.separation.quality.evaluate`) of the separator of MLflow run `run`, called
    `name`, with the mixture (floor) and the ideal ratio mask (ceiling), on each split's `pieces`.

    Computed once per checkpoint, pieces, settings and thread count; a second run reads them back from the
    run folder. They join the separator's own run (metrics such as `test_sdr_average_CRNN`, per-track
    tables under `sdr/`) when it does not have them yet.
    """
    sp, cp, sample_rate = params.separation, params.separation.crnn, params.data.pieces.sample_rate
    run_dir = model_dir(params, run["model"])
    key = tracking.settings_key({"checkpoint": file_digest(tracking.artifact_path(run, crnn.CHECKPOINT_NAME)),
                                 "pieces": {split: fingerprint(rows) for split, rows in pieces.items()},
                                 "n_fft": cp.n_fft, "hop": cp.hop, "sample_rate": sample_rate, "name": name,
                                 "segment_seconds": sp.segment_seconds, "overlap": sp.overlap,
                                 "threads": torch.get_num_threads()})
    scores = cached(run_dir / "sdr_scores.pkl", key, lambda: {
        split: quality.evaluate(rows, {name: separator}, cp.n_fft, cp.hop, sample_rate, sp.segment_seconds,
                                sp.overlap) for split, rows in pieces.items() if len(rows)})
    if scores and pd.isna(run.get(f"{next(iter(scores))}_sdr_average_{name}")):  # not in its run yet
        per_track = []
        for split, split_scores in scores.items():
            tracking.add_metrics(params, run["run_id"], split_scores.metrics(split))
            per_track.append(write_csv(run_dir / f"sdr_{split}.csv", split_scores.per_track))
        add_artifacts(params, run["run_id"], per_track, folder="sdr")
    return scores


def add_artifacts(params: Params, run_id: str, paths: list[Path], folder: str | None = None) -> None:
    """Store files with a run that already finished (what was made with its model afterwards), under `folder`."""
    client = MlflowClient(tracking.tracking_uri(params))
    for path in paths:
        client.log_artifact(run_id, str(path), folder)
