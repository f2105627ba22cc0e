"""Data-parallel training: two CPU processes (gloo, started by torchrun) train like one on the same batches."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import test_separate
import torch

from audiokd_lib import training
from audiokd_lib.core import distributed, tracking
from audiokd_lib.core.params import DistributedParams, load_params
from audiokd_lib.experiment import runs, workers
from audiokd_lib.models import students
from audiokd_lib.separation import crnn, separator


def _recipe(params, epochs: int):
    # mixup and gain: the augmentations every process must draw alike for the slices to make up one batch
    return params.train.model_copy(update={"epochs": epochs, "batch_size": 16, "crop_seconds": None, "patience": 9,
                                           "augment": ["gain", "mixup"], "recalibrate_batches": 0})


def test_one_process_keeps_the_whole_batch():
    batch = torch.arange(10)
    assert distributed.rank_and_size() == (0, 1) and distributed.is_main()
    assert distributed.shard(batch) is batch and distributed.shard(None) is None
    assert distributed.shard_weight(10) == 1.0 and distributed.total(3.0, 4.0) == [3.0, 4.0]


def test_the_torchrun_command_trains_a_job_file_on_this_machine(tmp_path):
    command = distributed.torchrun_command(tmp_path / "job.pt", 4)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert command[-3:] == ["audiokd_lib", "fit", str(tmp_path / "job.pt")]


def test_fit_outside_torchrun_says_how_to_start_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "job.pt").write_bytes(b"")
    with pytest.raises(RuntimeError, match="torchrun"):
        workers.fit_job_file(tmp_path / "job.pt")
    with pytest.raises(FileNotFoundError, match="no such job file"):
        workers.fit_job_file(tmp_path / "missing.pt")


def _without_batch_statistics(model):
    """The student with BatchNorm and dropout taken out: what remains is the same function of a batch
    whether one process sees it or two processes see a half each."""
    for name, module in list(model.net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (torch.nn.BatchNorm2d, torch.nn.Dropout)):
                setattr(module, child_name, torch.nn.Identity())
    return model


@pytest.mark.slow
@pytest.mark.parametrize("batch_statistics", [False, True], ids=["no-batchnorm", "mobilenet"])
def test_two_processes_train_like_one_on_the_same_global_batches(tiny, tmp_path, capsys, batch_statistics):
    params, classes, stats, data = tiny
    # Batches of 3 make slices of 2 and 1, and a last batch of 1 leaves one process nothing of its own;
    # BatchNorm needs more than one example a slice.
    tp = _recipe(params, epochs=3).model_copy(update={"batch_size": 16 if batch_statistics else 3})

    def student():
        model = students.build_student(params, classes, stats, seed=0)
        return model if batch_statistics else _without_batch_statistics(model)

    single = training.fit(student(), data, data, tp, params, 0, tmp_path / "one", progress=False).history

    two = params.model_copy(update={"distributed": DistributedParams(processes=2)})
    job = runs.RunJob("student-baseline", "two-processes", student(), 0)
    runs.train_many(two, [job], {"train": data, "val": data}, tp=tp, progress=False)
    shown = capsys.readouterr().out
    assert "torchrun --standalone --nproc-per-node=2 -m audiokd_lib fit" in shown  # the command, for the reader
    assert shown.count("epoch 1, train_loss") == 1 and "epoch 3, train_loss" in shown  # rank 0 reports, once
    parallel = pd.DataFrame(json.loads((runs.model_dir(two, "two-processes") / "history.json").read_text()))

    # Same clips, crops and mixup partners in every step, and the whole batch's mean gradient: without
    # batch statistics two processes take the very steps one does (up to float rounding). A MobileNet's
    # BatchNorm normalises each half-batch by its own statistics, and its dropout draws differ: close, not equal.
    # (Validation then uses running statistics averaged over the halves: its loss differs more.)
    if batch_statistics:
        assert parallel["train_loss"].tolist() == pytest.approx(single["train_loss"].tolist(), rel=0.1)
    else:
        for column in ("train_loss", "val_loss", "val_macro_f1"):
            assert parallel[column].tolist() == pytest.approx(single[column].tolist(), rel=1e-4), column
    # The weights the parent process loaded are rank 0's best: they score as its history says.
    assert training.score(data, training.predict(job.model, data))[1] == pytest.approx(
        parallel["val_macro_f1"].max(), abs=1e-6)


@pytest.mark.slow
def test_a_data_parallel_run_resumes_from_its_last_epoch(tiny, tmp_path, capsys):
    params, classes, stats, data = tiny
    two = params.model_copy(update={"distributed": DistributedParams(processes=2)})
    sets = {"train": data, "val": data}

    def launch(epochs):
        job = runs.RunJob("student-baseline", "resumed", students.build_student(params, classes, stats, seed=0), 0)
        job_file = runs.write_job(two, job, sets, _recipe(params, epochs))
        distributed.launch(job_file, processes=2, threads=1)
        return json.loads((job_file.parent / "history.json").read_text())

    first = launch(epochs=2)
    assert (runs.model_dir(two, "resumed") / "last.pt").is_file() and len(first) == 2
    capsys.readouterr()
    longer = launch(epochs=3)  # the same run given one more epoch: both processes pick up after epoch 2
    assert "resuming resumed after epoch 2" in capsys.readouterr().out
    assert [r["train_loss"] for r in longer[:2]] == [r["train_loss"] for r in first]
    assert len(longer) == 3


@pytest.fixture
def pieces(tmp_path):
    """Four tiny rendered pieces (test_separate's)."""
    return test_separate.render_pieces(tmp_path)


def _separator_params(tmp_path, processes: int, **crnn_settings):
    from conftest import ROOT, write_profile
    from test_separate import RATE, TINY

    tmp_path.mkdir(parents=True, exist_ok=True)
    # A fixed number of epochs, no time budget (null, not left out: the smoke profile's would apply), so
    # that the two runs compared take the same steps on any machine.
    settings = ", ".join(f"{key}: {'null' if value is None else value}"
                         for key, value in TINY.model_copy(update=crnn_settings).model_dump().items())
    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'outputs'}\n"
                                      f"data: {{pieces: {{sample_rate: {RATE}}}}}\n"
                                      f"distributed: {{processes: {processes}}}\n"
                                      f"separation: {{crnn: {{{settings}}}}}\n", f"sep{processes}")
    return load_params(profile)


@pytest.mark.slow
def test_the_separator_trains_on_two_processes(pieces, tmp_path, capsys):
    one = runs.train_separator(_separator_params(tmp_path / "one", 1, epochs=3), pieces, progress=False)
    params = _separator_params(tmp_path / "two", 2, epochs=3)
    two = runs.train_separator(params, pieces, progress=False)
    assert "torchrun --standalone --nproc-per-node=2 -m audiokd_lib fit" in capsys.readouterr().out
    assert one["epochs_run"] == two["epochs_run"] == 3 and one["stopped"] == two["stopped"] == "epochs"
    assert two["macs"] == one["macs"]
    losses = [[row["train_loss"] for row in torch.load(tracking.artifact_path(run, "model.pt"))["history"]]
              for run in (one, two)]
    # The same batches, each process normalising its half by its own BatchNorm statistics: close, not equal.
    assert losses[1] == pytest.approx(losses[0], rel=0.25)
    found = separator.open_separator("crnn", params)  # rank 0's checkpoint, where `audiokd separate` finds it
    assert found.spec == crnn.build_crnn(params.separation.crnn, params.data.pieces.sample_rate).spec


def _collectives(rank: int, init_file: str, results: str) -> None:
    """One of two gloo processes: what each collective helper gives on this rank, saved for the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        norm = torch.nn.BatchNorm1d(1)
        norm.running_mean.fill_(float(rank))  # 0 and 1: averaged, 0.5 in both
        distributed.average_buffers(norm)
        found = {"rank_and_size": distributed.rank_and_size(), "main": distributed.is_main(),
                 "slice": distributed.shard(torch.arange(5)).tolist(), "weight": distributed.shard_weight(5),
                 "empty_slice": distributed.shard(torch.arange(1)).tolist(),
                 "empty_weight": distributed.shard_weight(1),
                 "vote": distributed.any_process(rank == 1), "no_vote": distributed.any_process(False),
                 "total": distributed.total(float(rank + 1), 2.0), "running_mean": norm.running_mean.item()}
        torch.save(found, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_collective_helpers_on_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives, args=(str(tmp_path / "init"), str(tmp_path / "found")), nprocs=2)
    zero, one = (torch.load(tmp_path / f"found.{rank}") for rank in (0, 1))
    assert zero["rank_and_size"] == (0, 2) and one["rank_and_size"] == (1, 2) and zero["main"] and not one["main"]
    assert zero["slice"] == [0, 1, 2] and one["slice"] == [3, 4]  # contiguous, the first one longer
    assert zero["weight"] == pytest.approx(6 / 5) and one["weight"] == pytest.approx(4 / 5)  # 3/5 and 2/5 of 2
    # A batch of one: the second process takes that example too, weighted zero.
    assert zero["empty_slice"] == one["empty_slice"] == [0] and (zero["empty_weight"], one["empty_weight"]) == (2, 0)
    assert zero["vote"] and one["vote"] and not zero["no_vote"]  # one process's "time is up" stops both
    assert zero["total"] == one["total"] == [3.0, 4.0] and zero["running_mean"] == one["running_mean"] == 0.5


@pytest.mark.slow
def test_a_time_budget_stops_a_data_parallel_run(pieces, tmp_path):
    # Each process checks the budget after every step, and they vote (distributed.any_process): all stop
    # at the same step.
    params = _separator_params(tmp_path, 2, epochs=1000, patience=1000, time_budget_s=3.0)
    row = runs.train_separator(params, pieces, progress=False)
    assert row["stopped"] == "time budget" and 1 <= row["epochs_run"] < 1000
