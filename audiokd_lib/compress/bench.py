"""Measuring several models side by side on one machine: what `audiokd bench` prints.

The MLflow table measures each model when its notebook trains it: on different days, under different
loads, perhaps on different machines. A claim such as "the distilled student is 6x faster than the
teacher" deserves two numbers from one run on one machine, so this module measures a list of models
in one go, each the same way:

- latency per clip at batch 1 (a clip arriving alone) and at batch `batch` (a busy server), each the
  median of `repeats` runs after warm-up, on a fixed number of threads; throughput is clips/s at `batch`;
- peak memory of the forward pass: how far the process's resident memory rises during one batch;
- parameters, checkpoint size and MACs of one clip, from :func:`metrics.complexity` as in the MLflow table.

As in the MLflow table, only the head is timed (features in, logits out), the front end is not. Every
model reads one clip of its own `clip_seconds` through its own front end (AST has its own), from the
same audio: the first test clip of the profile's clip table, or synthetic noise when there is none.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from audiokd_lib.audio.loading import load_clip
from audiokd_lib.classify import resolve_model
from audiokd_lib.compress.export import head_module
from audiokd_lib.core import metrics
from audiokd_lib.models.checkpoints import load_checkpoint
from audiokd_lib.models.classifier import Classifier

DEFAULT_MODELS = ["teacher", "student-baseline", "student-kd"]


SYNTHETIC_SEED = 0


@dataclass
class Benchmark:
    """One model's row of the comparison."""

    model: str  # the role or checkpoint it was asked by
    kind: str  # architecture
    input_shape: str  # features of one clip, e.g. 1x128x201
    params: int
    macs: int  # of one clip, counted by thop
    size_mb: float  # checkpoint on disk
    ms_b1: float  # median ms per clip at batch 1
    ms_batch: float  # median ms per clip at batch `batch`
    clips_per_s: float  # throughput at batch `batch`
    peak_mb: float  # rise of resident memory during one forward at batch `batch`; NaN where unmeasurable
    batch: int
    threads: int


def _kind(model: Classifier) -> str:
    spec = model.spec
    return spec.get("identity") or f"{spec['arch']} x{spec['width_mult']}"


def _status_kb(field: str) -> int:
    """One memory figure of this process from /proc/self/status (Linux), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"/proc/self/status has no {field} line")


def peak_rise_mb(forward: torch.nn.Module, clip: torch.Tensor, batch: int) -> float:
    """How far resident memory rises above its level before one forward pass at `batch`, in MB; NaN off Linux.

    PyTorch allocates in C++, out of sight of Python's tracemalloc, so the measure is the resident set
    size the kernel reports: its peak (VmHWM) is reset to the current size, the batch runs, and the new
    peak is read. One call at batch 1 goes first, so that set-up done once per process (thread pools,
    kernel caches) is not counted as the model's working memory.
    """
    inputs = clip.repeat(batch, *([1] * (clip.dim() - 1)))
    with torch.inference_mode():
        forward(clip)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak resident size (Linux >= 4.0)
        except OSError:
            return float("nan")
        before = _status_kb("VmRSS")
        forward(inputs)
        return (_status_kb("VmHWM") - before) * 1024 / 1e6


def measure_model(checkpoint: str | Path, name: str, clip: str | None = None, batch: int = 32, threads: int = 1,
                  repeats: int = 30, warmup: int = 5) -> Benchmark:
    """Measure one saved model in this process, on one clip of audio (`clip`, or synthetic noise).

    :func:`bench` calls it in a fresh process per model, so that no model inherits the memory another
    left behind; called directly, its peak memory is that of a warm process and reads low.
    """
    model = load_checkpoint(checkpoint)
    samples = round(model.spec["clip_seconds"] * model.sample_rate)
    if clip is None:
        wave = 0.1 * torch.randn(1, samples, generator=torch.Generator().manual_seed(SYNTHETIC_SEED))
    else:
        wave = load_clip(clip, model.sample_rate, model.spec["clip_seconds"])
    with torch.inference_mode():
        features = model.features(wave)
    head = head_module(model)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = peak_rise_mb(head, features, batch)
    finally:
        torch.set_num_threads(previous_threads)
    cost = metrics.complexity(head, features, checkpoint, threads=threads, repeats=repeats, warmup=warmup,
                              batch=batch)
    return Benchmark(name, _kind(model), "x".join(map(str, features.shape[1:])), cost.params, cost.macs,
                     cost.size_mb, cost.latency_ms, cost.latency_batch_ms, 1000 / cost.latency_batch_ms, peak,
                     batch, threads)


def _in_fresh_process(**kwargs) -> Benchmark:
    # A fresh interpreter per model: its memory starts from nothing that an earlier model allocated
    # (a warm allocator would hide the rise), and no thread pool or cache of one model times another.
    # spawn, not fork: a forked copy would inherit this process's memory and threads.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_model, **kwargs).result()


def example_clip(profile: str | None) -> tuple[str | None, str]:
    """The audio file every model is measured on (None: synthetic noise), and a sentence saying which."""
    if profile is None:
        return None, "synthetic noise (no --profile given)"
    from audiokd_lib.core.params import profile_params
    from audiokd_lib.data.tables import load_clip_table

    params = profile_params(profile)
    try:
        table = load_clip_table(params, "clips")
    except FileNotFoundError:
        return None, f"synthetic noise (profile {params.profile} has no clip table yet)"
    paths = [path for path in table.loc[table["split"] == "test", "path"] if Path(path).is_file()]
    if not paths:
        return None, f"synthetic noise (the test clips of profile {params.profile} are missing)"
    return paths[0], f"test clip {Path(paths[0]).name} of profile {params.profile}"


def bench(models: list[str], profile: str | None = None, batch: int = 32, threads: int = 1, repeats: int = 30,
          warmup: int = 5, progress: bool = True) -> tuple[pd.DataFrame, str]:
    """Measure `models` (checkpoints, or roles of the profile's newest runs) one after another.

    Returns one row per model, with ratios of the first model's figures to each one's (faster_b1 = 4:
    four times faster than the first at batch 1), and a sentence saying what audio they were fed.
    """
    if min(batch, threads, repeats) < 1:
        raise ValueError(f"batch, threads and repeats must be at least 1 (got {batch}, {threads}, {repeats})")
    checkpoints = {name: resolve_model(name, profile) for name in models}  # every name checked before any timing
    clip, source = example_clip(profile)
    rows = [asdict(_in_fresh_process(checkpoint=path, name=name, clip=clip, batch=batch, threads=threads,
                                     repeats=repeats, warmup=warmup))
            for name, path in tqdm(checkpoints.items(), desc="bench", disable=not progress)]
    table = pd.DataFrame(rows)
    first = table.iloc[0]
    for ratio, column in (("faster_b1", "ms_b1"), ("faster_batch", "ms_batch"), ("fewer_macs", "macs"),
                          ("fewer_params", "params")):
        table[ratio] = first[column] / table[column]
    return table, source


def describe(table: pd.DataFrame, source: str) -> str:
    """The benchmark as text: what was measured and how, then the table."""
    first, batch, threads = table["model"].iloc[0], table["batch"].iloc[0], table["threads"].iloc[0]
    shown = table.drop(columns=["batch", "threads"]).assign(
        params=table["params"] / 1e6, macs=table["macs"] / 1e6,
    ).rename(columns={"params": "params_M", "macs": "MACs_M", "ms_batch": f"ms_b{batch}",
                      "faster_batch": f"faster_b{batch}"})
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.precision", 3):
        text = shown.to_string(index=False)
    return (f"input: {source}, through each model's own front end; the front end is not timed\n"
            f"{threads} thread(s); ms per clip at batch 1 and {batch}, medians after warm-up; clips_per_s at "
            f"batch {batch}; peak_mb: rise of resident memory during one batch of {batch}\n"
            f"faster_*, fewer_*: {first}'s figure divided by each model's (2.0 = twice as fast, half the MACs)\n"
            f"{text}")
