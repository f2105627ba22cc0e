"""Where training runs: in this process, in a pool of worker processes, or data-parallel under torchrun.

A job (one classifier run, or the separator's training) travels to another process as bytes written
by `torch.save` (:func:`job_payload`, :func:`separator_payload`), is trained there in its run folder,
and leaves its best weights and its result beside the job file for the process that sent it.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from audiokd_lib.core import distributed
from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.params import Params, TrainParams
from audiokd_lib.separation import crnn
from audiokd_lib.training import FeatureSet, FitResult, fit

if TYPE_CHECKING:
    from audiokd_lib.experiment.runs import RunJob


def fit_job(params: Params, job: RunJob, run_dir: Path, train: FeatureSet, val: FeatureSet, tp: TrainParams,
            progress: bool, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train one classifier job in this process, in its run folder (resuming from its last.pt)."""
    return fit(job.model, train, val, tp, params, job.seed, run_dir, teacher=job.teacher,
               teacher_logits=job.teacher_logits, kd=job.kd, on_epoch=on_epoch, progress=progress)


def job_payload(params: Params, job: RunJob, run_dir: Path, sets: dict[str, FeatureSet], tp: TrainParams) -> bytes:
    """A classifier job as bytes: what a worker process or each torchrun process trains."""
    # torch.save rather than the pool's own pickling: tensors then travel inside the bytes, not through
    # /dev/shm (64 MB in a default Docker container). Feature sets travel as their cache file's path.
    buffer = io.BytesIO()
    torch.save({"kind": "classifier", "params": params, "job": job, "run_dir": run_dir, "train": sets["train"],
                "val": sets["val"], "tp": tp}, buffer)
    return buffer.getvalue()


def die_with_parent(parent: int) -> None:
    """Start of a worker process: have Linux kill it when `parent` (the process that started it) dies.

    A `make run` killed mid-run takes its notebook's kernel with it; without this its workers would train on,
    orphaned, writing into the run folders that the next `make run` resumes from.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that took effect
        os._exit(1)


def fit_in_worker(payload: bytes) -> FitResult:
    """Runs in a worker process: train one job and leave its best weights in `fitted.pt`."""
    return fit_work(torch.load(io.BytesIO(payload), weights_only=False))  # made by our own parent process


def fit_work(work: dict, on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train a loaded classifier job; its best weights go to `fitted.pt` (from rank 0 of a data-parallel run)."""
    params, job, run_dir = work["params"], work["job"], work["run_dir"]
    torch.set_num_threads(params.threads)
    result = fit_job(params, job, run_dir, work["train"], work["val"], work["tp"], progress=False, on_epoch=on_epoch)
    if distributed.is_main():
        with atomic_path(run_dir / "fitted.pt") as tmp:
            torch.save(job.model.state_dict(), tmp)
    return result


def save_job(run_dir: Path, payload: bytes) -> Path:
    with atomic_path(run_dir / "job.pt") as tmp:
        tmp.write_bytes(payload)
    return run_dir / "job.pt"


def with_torchrun(params: Params, job_file: Path):
    """Train a job file on `distributed.processes` processes (:func:`fit_job_file` in every one) and return
    the result rank 0 left beside it; both files are removed."""
    distributed.launch(job_file, params.distributed.processes, params.threads)
    result_file = job_file.with_name("result.pt")
    result = torch.load(result_file, weights_only=False)  # written by our own training processes
    job_file.unlink()
    result_file.unlink()
    return result


def fit_job_file(job_file: str | Path) -> None:
    """`audiokd fit JOB`, in each process torchrun starts: train the saved job together, data-parallel.

    A job is a classifier run (:func:`job_payload`) or the separator's (:func:`separator_payload`). Rank 0
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
            _, result = train_crnn_job(work["params"], work["pieces"], work["run_dir"], on_epoch=report, progress=False)
        else:
            result = fit_work(work, on_epoch=report)
        if distributed.is_main():
            with atomic_path(job_file.with_name("result.pt")) as tmp:
                torch.save(result, tmp)
    finally:
        torch.distributed.destroy_process_group()


def separator_payload(params: Params, pieces: pd.DataFrame, run_dir: Path) -> bytes:
    """The separator's training as bytes: what each torchrun process trains."""
    buffer = io.BytesIO()
    torch.save({"kind": "separator", "params": params, "pieces": pieces, "run_dir": run_dir}, buffer)
    return buffer.getvalue()


def train_crnn_job(params: Params, pieces: pd.DataFrame, run_dir: Path,
                   on_epoch: Callable[[dict], None] | None = None,
                   progress: bool = True) -> tuple[crnn.MaskCRNN, crnn.TrainResult]:
    """The profile's CRNN, built and trained (or resumed) in its run folder, in this process or in each of
    a data-parallel run's."""
    cp = params.separation.crnn
    model = crnn.build_crnn(cp, params.data.pieces.sample_rate, seed=params.seed)
    result = crnn.train_crnn(model, pieces[pieces["split"] == "train"], pieces[pieces["split"] == "val"], cp,
                             run_dir, seed=params.seed, on_epoch=on_epoch, progress=progress)
    return model, result
