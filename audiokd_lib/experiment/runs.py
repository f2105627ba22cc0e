"""One model run, start to finish: train, evaluate the same way as every other model, log to MLflow.

Notebook 03 calls :func:`train_and_log` with a role (`teacher`, `student-baseline`, `student-kd`, ...)
and gets back the model and the MLflow row of the run; notebooks 04-05 hand several runs (one per
seed and variant) to :func:`train_many`, which trains them side by side in worker processes.
Everything a table needs is measured here, identically for every model:

- accuracy and macro-F1 (mAP and micro-F1 for multi-label data) on the in-domain `test` split and on
  the `heldout` split (the unseen soundfont), a per-class report, a confusion matrix, PR curves;
- parameters, checkpoint size, MACs for one clip, CPU latency per clip.

Notebook 08's separator, the mask CRNN, goes the same way through :func:`train_separator`.

A run that already finished with the same settings is not trained again: its MLflow row is returned.
A run that was interrupted resumes from its last epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from audiokd_lib import plots
from audiokd_lib.compress import prune
from audiokd_lib.compress.export import head_module
from audiokd_lib.data import real_eval
from audiokd_lib.data.tables import fingerprint
from audiokd_lib.experiment import distributed, metrics, tracking
from audiokd_lib.experiment.params import KDParams, Params, TrainParams
from audiokd_lib.experiment.training import FeatureSet, FitResult, cached_features, cached_windows, fit, predict_files
from audiokd_lib.files import atomic_path, write_json
from audiokd_lib.models.checkpoints import load_checkpoint, save_checkpoint
from audiokd_lib.models.classifier import Classifier
from audiokd_lib.separation import crnn

EVAL_SPLITS = ("test", "heldout", "real")  # in-domain, the soundfont no model trained on, real recordings


def feature_key(params: Params, model: Classifier) -> str:
    """Names a front end in cache files: students and the EfficientAT teacher share one."""
    if model.spec["kind"] == "ast":
        blob = json.dumps(model.spec["extractor"], sort_keys=True, default=str)
        return "ast-" + hashlib.sha256(blob.encode()).hexdigest()[:10]
    return "logmel-" + params.fingerprint("features")


def feature_sets(params: Params, table: pd.DataFrame, model: Classifier,
                 splits=("train", "val", "test", "heldout", "transfer", "real"),
                 progress: bool = True) -> dict[str, FeatureSet]:
    """Cached features of every split the table has, through `model`'s front end.

    `real`: those of the real recordings notebook 01 found (:mod:`~audiokd_lib.data.real_eval`) whose
    instrument is one of the model's classes (its OpenMIC class, for a multi-label model, every other
    class a known negative), cut into windows; none when no recording is.
    """
    present = [s for s in splits if s != "real" and (table["split"] == s).any()]
    sets = {s: cached_features(params, table, s, model, feature_key(params, model), model.classes, progress)
            for s in present}
    real = real_eval.load_table(params) if "real" in splits else None
    if real is not None and model.spec["multilabel"]:  # a detector of OpenMIC classes: each solo's one instrument
        real = real.assign(label=real["openmic_class"])
    if real is not None and real["label"].isin(model.classes).any():
        real = real[real["label"].isin(model.classes)]
        try:
            sets["real"] = cached_windows(params, real, model, feature_key(params, model), model.classes, progress)
        except ValueError as err:  # none readable or all silent: a report we cannot make, not a failed run
            warnings.warn(f"no real column: {err}", stacklevel=2)
    return sets


def sets_fingerprint(sets: dict[str, FeatureSet]) -> str:
    """Short hash of the splits' clips and targets: the data a run learned from and was tested on.

    The real recordings are left out: they are only reported on, so finding them (or not) changes no run.
    """
    digest = hashlib.sha256()
    for split in sorted(set(sets) - {"real"}):
        digest.update(split.encode() + "\n".join(sets[split].paths).encode() + sets[split].targets.numpy().tobytes())
    return digest.hexdigest()[:12]


def measure(params: Params, model: Classifier, checkpoint: Path, example: torch.Tensor) -> dict[str, float]:
    """Params, size on disk, MACs and CPU latency for one clip's features (front end excluded).

    Next to the dense figures, what only non-zero weights cost: they differ for unstructured-pruned
    models, whose zeros still take dense memory and dense arithmetic (notebook 06).
    """
    head = head_module(model).eval()
    cx = metrics.complexity(head, example[:1], checkpoint, threads=params.threads)
    return {**{k: float(v) for k, v in asdict(cx).items()},
            "nonzero_params": float(prune.sparsity(model)["nonzero_params"]),
            "nonzero_macs": float(prune.nonzero_macs(model, example[:1])),
            "compressed_mb": prune.compressed_size_mb(model)}


def scores(model: Classifier, sets: dict[str, FeatureSet], splits: tuple[str, ...] = EVAL_SPLITS) -> dict[str, float]:
    """The table's scores on the evaluation splits (e.g. `heldout_macro_f1`, `real_accuracy`), nothing saved."""
    results = {}
    for split in splits:
        if split in sets:
            data = sets[split]
            y, logits = predict_files(model, data)
            results.update({f"{split}_{key}": value for key, value in _split_metrics(data, y, logits).items()})
    return results


def _split_metrics(data: FeatureSet, y, logits) -> dict[str, float]:
    """The table's numbers for one split; for recordings of one instrument each (the real split) seen by a
    multi-label model, also the precision and recall of what it names (probability at least 0.5)."""
    found = metrics.classification_metrics(y, logits, data.classes, data.multilabel,
                                           present_only=data.groups is not None)
    if data.groups is not None and data.multilabel:
        plays = [data.classes[row.argmax()] for row in y]
        heard = [[c for c, z in zip(data.classes, row) if z >= 0] for row in logits]
        found.update({k: v for k, v in metrics.solo_detection(plays, heard).items() if k != "named_per_recording"})
    return found


def evaluate(params: Params, model: Classifier, sets: dict[str, FeatureSet], name: str
             ) -> tuple[dict[str, float], list[Path]]:
    """Metrics on the test, heldout and real splits, with per-class reports and figures saved."""
    results, artifacts = {}, []
    out = model_dir(params, name)
    for split in EVAL_SPLITS:
        if split not in sets:
            continue
        data = sets[split]
        y, logits = predict_files(model, data)  # the real recordings: one row per recording, windows combined
        for key, value in _split_metrics(data, y, logits).items():
            results[f"{split}_{key}"] = value
        report = metrics.per_class_report(y, logits, data.classes, data.multilabel)
        with atomic_path(out / f"per_class_{split}.csv") as tmp:
            report.to_csv(tmp)
        artifacts.append(out / f"per_class_{split}.csv")
        title = f"{name}, {split}"
        figures = {"pr": metrics.pr_curve_figure(y, logits, data.classes, data.multilabel, title=title)}
        if not data.multilabel:  # a confusion matrix needs one true class per clip
            figures["confusion"] = metrics.confusion_figure(y, logits, data.classes, title=title)
        for kind, fig in figures.items():
            artifacts.append(plots.save_fig(fig, params, f"{name}_{kind}_{split}"))
            plt.close(fig)
    return results, artifacts


def loss_figure(history: pd.DataFrame, metric: str | None, title: str, loss_name: str = "loss") -> plt.Figure:
    """Train and validation loss per epoch, with the validation score `val_<metric>` (if any) on a second axis."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(history["epoch"], history["train_loss"], "o-", label="train loss")
    ax.plot(history["epoch"], history["val_loss"], "o-", label="val loss")
    ax.set(xlabel="epoch", ylabel=loss_name, title=title)
    lines = ax.get_lines()
    if metric is not None:
        right = ax.twinx()
        right.plot(history["epoch"], history[f"val_{metric}"], "s--", color="tab:green", label=f"val {metric}")
        right.set(ylabel=f"val {metric}", ylim=(0, 1.02))
        lines += right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right" if metric else "best", fontsize=8)
    return fig


def settings_key(settings: dict) -> str:
    """A short hash of a run's settings (plain values): equal keys, the same run."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_key(params: Params, role: str, seed: int, tp: TrainParams | None, data_fp: str, extra: dict) -> str:
    """What makes two classifier runs the same run: settings, data, seed, and the teacher behind them."""
    return settings_key({"role": role, "seed": seed, "train": tp and tp.model_dump(),
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
    train: FeatureSet | None = None             # this job's training clips, if not the shared `train` split


def _job_sets(job: RunJob, sets: dict[str, FeatureSet]) -> dict[str, FeatureSet]:
    return sets if job.train is None else {**sets, "train": job.train}


def train_and_log(params: Params, role: str, name: str, model: Classifier, sets: dict[str, FeatureSet], *,
                  seed: int, tp: TrainParams, teacher: Classifier | None = None,
                  teacher_logits: torch.Tensor | None = None, kd: KDParams | None = None,
                  tags: dict[str, str] | None = None, params_file: str | Path | None = None,
                  progress: bool = True) -> tuple[Classifier, pd.Series]:
    """Train (or resume, or reuse) one model in this process, evaluate it, log it; return it and its MLflow row."""
    job = RunJob(role, name, model, seed, tags or {}, teacher, teacher_logits, kd)
    [row] = train_many(params, [job], sets, tp=tp, params_file=params_file, workers=1, progress=progress)
    return job.model, row


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
            results[job.name] = _fit_with_torchrun(params, job, _job_sets(job, sets), tp)
    elif workers <= 1:
        for job in todo:
            results[job.name] = _fit_job(params, job, _job_sets(job, sets)["train"], sets["val"], tp, progress)
    else:
        # spawn, not fork: a forked copy of a process that already ran torch threads can deadlock.
        print(f"training {len(todo)} runs in {workers} processes of {params.threads} thread(s) each")
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_fit_in_worker, _worker_payload(params, job, _job_sets(job, sets), tp)): job
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
    """The MLflow row of the finished run `name` if it had settings `key`, else None after clearing a run
    folder whose settings changed."""
    run_dir = model_dir(params, name)
    done_file = run_dir / "done.json"
    if done_file.is_file() and checkpoint_path(params, name).is_file():
        done = json.loads(done_file.read_text())
        runs = tracking.runs_frame(params, role)
        found = runs[runs["run_id"] == done.get("run_id")] if done.get("key") == key else runs.iloc[:0]
        if len(found):
            print(f"{name}: already trained with these settings (MLflow run {done['run_id'][:8]}); reusing it")
            return found.set_index("run_id", drop=False).iloc[0]
    if (run_dir / "key.txt").is_file() and (run_dir / "key.txt").read_text() != key:
        print(f"{name}: settings changed since the last run; starting it again")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "key.txt").write_text(key)
    return None


def _finish(params: Params, role: str, name: str, run_id: str) -> pd.Series:
    """Mark the run folder done (for reuse), drop its last.pt (the best weights are in model.pt), and
    return the run's MLflow row."""
    run_dir = model_dir(params, name)
    write_json(run_dir / "done.json", {"key": (run_dir / "key.txt").read_text(), "run_id": run_id})
    (run_dir / "last.pt").unlink(missing_ok=True)
    return tracking.runs_frame(params, role).set_index("run_id", drop=False).loc[run_id].rename(run_id)


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


def _fit_job(params: Params, job: RunJob, train: FeatureSet, val: FeatureSet, tp: TrainParams,
             progress: bool, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    return fit(job.model, train, val, tp, params, job.seed, _run_dir(params, job), teacher=job.teacher,
               teacher_logits=job.teacher_logits, kd=job.kd, on_epoch=on_epoch, progress=progress)


def _worker_payload(params: Params, job: RunJob, sets: dict[str, FeatureSet], tp: TrainParams) -> bytes:
    # torch.save rather than the pool's own pickling: tensors then travel inside the bytes, not through
    # /dev/shm (64 MB in a default Docker container). Feature sets travel as their cache file's path.
    buffer = io.BytesIO()
    torch.save({"kind": "classifier", "params": params, "job": job, "train": sets["train"], "val": sets["val"],
                "tp": tp}, buffer)
    return buffer.getvalue()


def _fit_in_worker(payload: bytes) -> FitResult:
    """Runs in a worker process: train one job and leave its best weights in `fitted.pt`."""
    return _fit_work(torch.load(io.BytesIO(payload), weights_only=False))  # made by our own parent process


def _fit_work(work: dict, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train a loaded classifier job; its best weights go to `fitted.pt` (from rank 0 of a data-parallel run)."""
    params, job = work["params"], work["job"]
    torch.set_num_threads(params.threads)
    result = _fit_job(params, job, work["train"], work["val"], work["tp"], progress=False, on_epoch=on_epoch)
    if distributed.is_main():
        with atomic_path(_run_dir(params, job) / "fitted.pt") as tmp:
            torch.save(job.model.state_dict(), tmp)
    return result


def write_job(params: Params, job: RunJob, sets: dict[str, FeatureSet], tp: TrainParams) -> Path:
    """Everything training one classifier run needs (settings, model, training and validation clips), saved
    as the run folder's `job.pt`: what `torchrun ... -m audiokd_lib fit JOB` trains, on one machine or several."""
    return _save_job(_run_dir(params, job), _worker_payload(params, job, sets, tp))


def _save_job(run_dir: Path, payload: bytes) -> Path:
    with atomic_path(run_dir / "job.pt") as tmp:
        tmp.write_bytes(payload)
    return run_dir / "job.pt"


def _with_torchrun(params: Params, job_file: Path):
    """Train a job file on `distributed.processes` processes (:func:`fit_job_file` in every one) and return
    the result rank 0 left beside it; both files are removed."""
    distributed.launch(job_file, params.distributed.processes, params.threads)
    result_file = job_file.with_name("result.pt")
    result = torch.load(result_file, weights_only=False)  # written by our own training processes
    job_file.unlink()
    result_file.unlink()
    return result


def _fit_with_torchrun(params: Params, job: RunJob, sets: dict[str, FeatureSet], tp: TrainParams) -> FitResult:
    return _with_torchrun(params, write_job(params, job, sets, tp))


def fit_job_file(job_file: str | Path) -> None:
    """`audiokd fit JOB`, in each process torchrun starts: train the saved job together, data-parallel.

    A job is a classifier run (:func:`write_job`) or the separator's (:func:`train_separator`). Rank 0
    prints each epoch and leaves the best weights (`fitted.pt` or the CRNN's checkpoint) and the result
    (`result.pt`) beside the job file, where the process that wrote the job reads them.
    """
    job_file = Path(job_file)
    if not job_file.is_file():
        raise FileNotFoundError(f"{job_file}: no such job file; training writes one per run when "
                                "distributed.processes is above 1")
    distributed.init_from_torchrun()
    try:
        def report(row: dict) -> None:
            if distributed.is_main():
                print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)

        work = torch.load(job_file, weights_only=False)  # written by this project's own training
        if work["kind"] == "separator":
            torch.set_num_threads(work["params"].threads)
            _, result = _train_crnn_job(work["params"], work["pieces"], on_epoch=report, progress=False)
        else:
            result = _fit_work(work, on_epoch=report)
        if distributed.is_main():
            with atomic_path(job_file.with_name("result.pt")) as tmp:
                torch.save(result, tmp)
    finally:
        torch.distributed.destroy_process_group()


def log_model(params: Params, role: str, name: str, model: Classifier, sets: dict[str, FeatureSet], *,
              tags: dict[str, str] | None = None, params_file: str | Path | None = None,
              metrics: dict[str, float] | None = None) -> pd.Series:
    """Evaluate and log a model made without training (a pruned copy): the same measures as every run.

    `metrics` are logged besides those (a teacher ensemble's validation score, which :func:`best_run`
    reads). Logged again only when the model's weights or the data changed; otherwise its MLflow row is reused.
    """
    weights = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values()))
    job = RunJob(role, name, model, params.seed, {**(tags or {}), "weights": weights.hexdigest()[:12]},
                 metrics=dict(metrics or {}))
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
        results, artifacts = evaluate(params, model, sets, job.name)
        if result is not None:
            _log_history(result.history)
            fig = loss_figure(result.history, result.metric, job.name)
            artifacts.append(plots.save_fig(fig, params, f"{job.name}_loss"))
            plt.close(fig)
            results.update({"best_epoch": result.best_epoch, f"val_{result.metric}": result.best_score,
                            "epochs_run": len(result.history),
                            "train_seconds": float(result.history["seconds"].sum())})
        example = sets["val"].features[:1]
        tracking.log_final({**results, **job.metrics, **measure(params, model, checkpoint, example),
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
    key = settings_key({"role": "separator", "seed": params.seed, "crnn": cp.model_dump(),
                        "sample_rate": sample_rate, "data": data_fp, **processes})
    row = _reuse_or_prepare(params, "separator", name, key)
    if row is not None:
        return row
    if params.distributed.processes > 1:  # trained by several processes together (torchrun, data-parallel)
        buffer = io.BytesIO()
        torch.save({"kind": "separator", "params": params, "pieces": pieces}, buffer)
        result = _with_torchrun(params, _save_job(model_dir(params, name), buffer.getvalue()))
        model = crnn.load_crnn(result.checkpoint)
    else:
        model, result = _train_crnn_job(params, pieces, progress=progress)
    tags = {"model": name, "settings": key, "dataset_fingerprint": data_fp, "stopped": result.stopped}
    with tracking.start_run(params, "separator", name, tags, params_file) as run:
        _log_history(result.history)
        fig = loss_figure(result.history, None, f"{name} (stopped: {result.stopped})", "L1 magnitude loss")
        curve = plots.save_fig(fig, params, f"{name}_loss")
        plt.close(fig)
        cost = metrics.complexity(model, torch.zeros(1, 1, sample_rate), result.checkpoint,
                                  threads=torch.get_num_threads(), repeats=5, warmup=1, batch=8)
        tracking.log_final({**asdict(cost), "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                            "epochs_run": len(result.history),
                            "train_seconds": float(result.history["seconds"].sum())})
        tracking.log_artifacts([result.checkpoint, curve])
        run_id = run.info.run_id
    return _finish(params, "separator", name, run_id)


def _train_crnn_job(params: Params, pieces: pd.DataFrame, on_epoch: Callable[[dict], None] | None = None,
                    progress: bool = True) -> tuple[crnn.MaskCRNN, crnn.TrainResult]:
    """The profile's CRNN, built and trained (or resumed) in its run folder, in this process or in each of
    a data-parallel run's."""
    cp = params.separation.crnn
    model = crnn.build_crnn(cp, params.data.pieces.sample_rate, seed=params.seed)
    result = crnn.train_crnn(model, pieces[pieces["split"] == "train"], pieces[pieces["split"] == "val"], cp,
                             model_dir(params, SEPARATOR_NAME), seed=params.seed, on_epoch=on_epoch, progress=progress)
    return model, result


TABLE_COLUMNS = {
    "model": "model", "role": "role", "variant": "variant", "teacher": "teacher", "seed": "seed",
    "test_accuracy": "test acc", "test_macro_f1": "test macro-F1",
    "heldout_accuracy": "heldout acc", "heldout_macro_f1": "heldout macro-F1",
    "test_mAP": "test mAP", "test_micro_f1": "test micro-F1", "heldout_mAP": "heldout mAP",
    "heldout_micro_f1": "heldout micro-F1", "real_accuracy": "real acc", "real_macro_f1": "real macro-F1",
    "real_mAP": "real mAP", "real_precision": "real precision", "real_recall": "real recall",
    "params": "params", "size_mb": "size MB", "macs": "MACs", "latency_ms": "latency ms",
    "latency_batch_ms": "latency ms/clip @32",
}


def best_run(params: Params, role: str) -> pd.Series:
    """Of the newest run of every model of `role`, the one with the best validation score.

    Chosen on validation, never on test or held-out scores, which would then be optimistic. The members
    of an ensemble (runs tagged `member_of`) are parts of a model, not candidates: the ensemble is.
    """
    runs = tracking.runs_frame(params, role).drop_duplicates("model")
    if "member_of" in runs:
        runs = runs[runs["member_of"].isna()]
    if runs.empty:
        tracking.latest_run(params, role)  # raises, naming the notebook that makes this role
    metric = "val_mAP" if "val_mAP" in runs and runs["val_mAP"].notna().any() else "val_macro_f1"
    return runs.loc[runs[metric].idxmax()]


def results_table(params: Params, roles: list[str] | None = None) -> pd.DataFrame:
    """The newest finished run of every model name (per role), from MLflow, in readable columns."""
    frame = tracking.runs_frame(params)
    if roles is not None:
        frame = frame[frame["role"].isin(roles)]
    frame = frame.drop_duplicates("model")  # newest first: one row per model name
    columns = [c for c in TABLE_COLUMNS if c in frame.columns and frame[c].notna().any()]
    table = frame[columns].rename(columns=TABLE_COLUMNS).reset_index(drop=True)
    for c in ("params", "MACs"):
        if c in table:
            table[c] = table[c].astype("Int64")  # runs without a MAC count (the beat trackers) show <NA>
    return table


def seed_summary(table: pd.DataFrame, value: str, by: str = "role") -> pd.DataFrame:
    """Mean, standard deviation, min and max of one column over seeds, per role."""
    return table.groupby(by, sort=False)[value].agg(["mean", "std", "min", "max", "count"])


def compare_to_baseline(table: pd.DataFrame, score: str, by: str = "variant", baseline: str = "baseline"
                        ) -> pd.DataFrame:
    """Each variant's gain over the baseline in `score`, across seeds, with Welch's t-test.

    Welch's test (scipy) does not assume equal variances; with three seeds a side it is weak, so the 95%
    confidence interval of the difference is given too: a gain holds when the interval excludes zero.
    """
    if "role" in table:  # teacher rows (an ensemble and its members, variants of their own) are no student recipe
        table = table[table["role"] != "teacher"]
    groups = {name: rows[score].dropna().to_numpy() for name, rows in table.groupby(by, sort=False)}
    if baseline not in groups:
        raise ValueError(f"no `{baseline}` rows in column {by!r} to compare with")
    base, rows = groups[baseline], []
    for name, values in groups.items():
        if name in (baseline, "teacher"):
            continue
        row = {by: name, "seeds": len(values), "mean": values.mean(), "baseline mean": base.mean(),
               "difference": values.mean() - base.mean()}
        if min(len(values), len(base)) >= 2:
            test = stats.ttest_ind(values, base, equal_var=False)
            interval = test.confidence_interval(0.95)
            row.update({"95% CI low": interval.low, "95% CI high": interval.high, "Welch t": test.statistic,
                        "p": test.pvalue})
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


def verdict(comparison: pd.DataFrame, score: str, target: float = 0.03) -> str:
    """One plain sentence per variant of :func:`compare_to_baseline`: a gain that holds, or does not."""
    lines = []
    for variant, row in comparison.iterrows():
        head = (f"- **{variant}**: {score} {row['mean']:.3f} vs baseline {row['baseline mean']:.3f} over "
                f"{int(row['seeds'])} seeds, a difference of {row['difference']:+.3f}")
        if pd.isna(row.get("p")):
            lines.append(f"{head}: too few seeds for a test, so no conclusion.")
            continue
        test = (f"95% CI [{row['95% CI low']:+.3f}, {row['95% CI high']:+.3f}], "
                f"Welch t = {row['Welch t']:.2f}, p = {row['p']:.3f}")
        if row["95% CI low"] > 0:
            met = "meets" if row["difference"] >= target else "falls short of"
            judged = f"a gain that holds, and {met} the {target:+.3f} target"
        elif row["95% CI high"] < 0:
            judged = "a loss that holds"
        else:
            judged = "no difference that holds: the interval includes zero"
        lines.append(f"{head} ({test}): {judged}.")
    return "\n".join(lines)
