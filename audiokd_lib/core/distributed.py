"""One run trained data-parallel by several processes: several GPUs, or CPU cores, on PyTorch's own engine.

`torchrun` starts the processes and tells each its rank; `DistributedDataParallel` (DDP) averages
the gradients after every backward pass, so every process holds the same weights after every step.
Nothing here replaces them; this module only decides how the course's training loop
(:func:`audiokd_lib.training.fit`) shares one step among N processes:

- every process draws the same global batch (the batch order has one seed) and augments it the same
  way (the augmentations have one seed too), then keeps its own slice of it (:func:`shard`). N
  processes thus take the step one process takes on the same batch: same clips, same crops, same
  mixup partners, gradients averaged over the whole batch (:func:`shard_weight`);
- except for BatchNorm, which normalises each slice with its own statistics, as DDP does by default
  (torchvision's reference scripts too). `SyncBatchNorm` would use the global batch's statistics, but
  it runs on GPUs only, and the course's runs must behave alike on both. The running statistics are
  averaged over the processes after every epoch (:func:`average_buffers`), so every process
  validates the same model; the losses match a single process's up to the slices' statistics;
- every process validates on the whole validation split with the same weights, so all of them take
  the same early-stopping decision; only rank 0 writes files (`last.pt`, the history, the weights).

`train_many` (:mod:`~audiokd_lib.experiment.runs`) starts `torchrun` itself when
`distributed.processes` is above 1, and prints the command, which also trains a run across several
machines (docs/running.md, "Training on several GPUs").
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank_and_size()[0] == 0


def device() -> torch.device:
    """This process's device: its own GPU (torchrun's LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_torchrun() -> None:
    """Join the process group torchrun set up (NCCL between GPUs, gloo between CPU processes)."""
    if "RANK" not in os.environ:
        raise RuntimeError("not started by torchrun (RANK is unset); use `torchrun ... -m audiokd_lib fit JOB`")
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _slice(batch: torch.Tensor) -> torch.Tensor:
    rank, size = rank_and_size()
    return torch.tensor_split(batch, size)[rank]  # contiguous; the first slices one longer when it does not divide


def shard(batch: torch.Tensor | None) -> torch.Tensor | None:
    """This process's slice of a global batch.

    A last batch smaller than the number of processes leaves some slices empty; those processes take
    the batch's first example instead, weighted zero (:func:`shard_weight`): every process must take
    part in every step, or the others wait for its gradients for ever.
    """
    if batch is None or rank_and_size()[1] == 1:
        return batch
    part = _slice(batch)
    return part if len(part) else batch[:1]


def shard_weight(batch_size: int) -> float:
    """Factor on this process's mean loss so that DDP's average of the gradients is the whole batch's mean
    gradient (slices may differ by one example); zero for a process with nothing of its own."""
    return len(_slice(torch.arange(batch_size))) * rank_and_size()[1] / batch_size


class _Replica(DistributedDataParallel):
    """DDP around a model's head (normalisation and network), called as `model.head(x)` like the model."""

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self(features)


def wrap(model: nn.Module, head: nn.Module) -> nn.Module:
    """`model` itself in one process; else DDP around `head` (`model`'s head as a module). The wrapper
    shares `model`'s parameters: training it trains `model`."""
    if rank_and_size()[1] == 1:
        return model
    return _ddp(_Replica, head)


def _ddp(kind: type[DistributedDataParallel], module: nn.Module) -> DistributedDataParallel:
    # Buffers (BatchNorm's running statistics) are averaged once an epoch instead of copied from rank 0
    # before every forward pass: an average of the slices' statistics is the global batch's mean.
    return kind(module, device_ids=[device().index] if torch.cuda.is_available() else None, broadcast_buffers=False)


class _Call(nn.Module):
    """`fn(model, *args)` as a module's forward, for DDP to wrap (it averages the gradients of what its
    forward computed)."""

    def __init__(self, model: nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, *args)


def parallel(model: nn.Module, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn(model, ...)` as a function of the rest; across processes it runs inside DDP, so that the
    gradients of what it returns (a loss) are averaged. For a model trained through a function of it
    rather than its forward, such as the CRNN through its loss."""
    if rank_and_size()[1] == 1:
        return partial(fn, model)
    return _ddp(DistributedDataParallel, _Call(model, fn))


def any_process(flag: bool) -> bool:
    """Whether `flag` holds in any process: a decision all of them must take together (a time budget
    spent in one of them stops every one, or the others would wait for it for ever)."""
    if rank_and_size()[1] == 1:
        return flag
    vote = torch.tensor([int(flag)], device=device())
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def average_buffers(module: nn.Module) -> None:
    """Every floating-point buffer (BatchNorm's running statistics) averaged over the processes."""
    size = rank_and_size()[1]
    if size == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(size)


def total(*values: float) -> list[float]:
    """Each value summed over the processes (e.g. a loss total and a clip count)."""
    if rank_and_size()[1] == 1:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.tolist()


def barrier() -> None:
    """Wait for every process (after rank 0 wrote a file the others read)."""
    if rank_and_size()[1] > 1:
        dist.barrier()


def torchrun_command(job_file: str | Path, processes: int) -> list[str]:
    """The command that trains a saved job on `processes` processes of this machine.

    `python -m torch.distributed.run` is `torchrun`, found through this interpreter rather than PATH.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "audiokd_lib", "fit", str(job_file)]


def launch(job_file: str | Path, processes: int, threads: int) -> None:
    """Train a saved job with torchrun on this machine; its output goes to ours; a failure raises."""
    command = torchrun_command(job_file, processes)
    print("$ torchrun", " ".join(command[3:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torchrun would set 1 with a warning
    # Relayed line by line through our own stdout, which a notebook shows (the child's file descriptors it would not).
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            print(line, end="", flush=True)
    if child.returncode:
        raise RuntimeError(f"torchrun failed (exit status {child.returncode}) on {job_file}; its output is above")
