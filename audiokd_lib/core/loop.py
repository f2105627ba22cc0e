"""The epoch loop the course's trainings share: early stopping, the best epoch kept, resumable state.

Its users: the classifiers of notebooks 03-08 (:func:`audiokd_lib.training.fit`), notebook 08's mask CRNN
(:func:`audiokd_lib.separation.crnn.train_crnn`), notebook 09's beat trackers (:mod:`audiokd_lib.beats.model`)
and notebook 10's embedding models (:mod:`audiokd_lib.search.model`). They differ in their steps and their
validation; what happens between epochs is the same for all and is written once here (:class:`EpochLoop`):

- training stops after `epochs` epochs, after `patience` epochs without a better validation score,
  or once an optional time budget is spent (time spent before a resume counts);
- the best epoch's weights are kept in memory and put back at the end;
- after every epoch the whole state (weights, optimiser, schedule, history, random generators) is
  written to `last.pt` atomically, so an interrupted run resumes exactly where it stopped. The file
  holds only tensors and plain Python values, so it is read back with torch's weights-only loader.
  In data-parallel training (:mod:`~audiokd_lib.core.distributed`) rank 0 writes it and every
  process resumes from it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from audiokd_lib.core.distributed import any_process, is_main
from audiokd_lib.core.files import atomic_path


def _state_of(thing: Any) -> Any:
    if isinstance(thing, torch.Generator):
        return thing.get_state()
    if isinstance(thing, np.random.Generator):
        return thing.bit_generator.state  # a dict of strings and ints: safe for the weights-only loader
    return thing.state_dict()


def _restore(thing: Any, state: Any) -> None:
    if isinstance(thing, torch.Generator):
        thing.set_state(state)
    elif isinstance(thing, np.random.Generator):
        thing.bit_generator.state = state
    else:
        thing.load_state_dict(state)


def _plain(value: Any) -> Any:
    # numpy scalars (a metric's float64) would make last.pt unreadable to the weights-only loader.
    return value.item() if isinstance(value, np.generic) else value


class EpochLoop:
    """The epochs still to run, with early stopping, the best weights kept and `run_dir/last.pt` after each.

    Use as::

        loop = EpochLoop(model, run_dir, epochs, patience, stateful={"optimizer": optimizer})
        for epoch in loop:          # 0-based; a resumed run starts after its last finished epoch
            ...                     # train, validate
            row = loop.end_epoch({"train_loss": ..., "val_loss": ...}, score=val_score)
        loop.restore_best()

    `stateful` names everything besides the model whose state must survive a resume: optimisers and
    schedulers (their state_dict), torch and numpy random generators. torch's global generator (dropout)
    is always saved. `settings` (plain values, e.g. the model's spec) are written to `last.pt` and must
    match on resume, so a file from another configuration is refused instead of half-loaded.
    `on_epoch` receives each finished epoch's row, after `last.pt` is written.
    """

    def __init__(self, model: nn.Module, run_dir: str | Path, epochs: int, patience: int, *,
                 stateful: dict[str, Any] | None = None, higher_is_better: bool = True,
                 time_budget_s: float | None = None, on_epoch: Callable[[dict], None] | None = None,
                 settings: Any = None):
        self.model, self.epochs, self.patience = model, epochs, patience
        self.stateful = stateful or {}
        self.higher_is_better, self.time_budget_s, self.on_epoch = higher_is_better, time_budget_s, on_epoch
        self.settings = settings
        self.last = Path(run_dir) / "last.pt"
        self.last.parent.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
        self.best = {"epoch": 0, "score": -math.inf if higher_is_better else math.inf,
                     "state": copy.deepcopy(model.state_dict())}
        self.bad_epochs = 0
        self._started: float | None = None
        if self.last.is_file():
            self._resume()

    @property
    def elapsed(self) -> float:
        """Seconds spent in finished epochs, before and after any resume."""
        return sum(row["seconds"] for row in self.history)

    def time_is_up(self) -> bool:
        """Whether the time budget is spent, counting the epoch under way; never without a budget."""
        if self.time_budget_s is None:
            return False
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return any_process(self.elapsed + running >= self.time_budget_s)  # data-parallel: all stop together

    @property
    def stopped(self) -> str:
        """Why training ended: "patience", "time budget" or "epochs"."""
        return "patience" if self.bad_epochs >= self.patience else "time budget" if self.time_is_up() else "epochs"

    def __iter__(self) -> Iterator[int]:
        for epoch in range(len(self.history), self.epochs):
            if self.bad_epochs >= self.patience or self.time_is_up():
                return
            self._started = time.perf_counter()
            yield epoch
            if self._started is not None:
                raise RuntimeError("call end_epoch at the end of every epoch")

    def end_epoch(self, row: dict[str, Any], score: float) -> dict[str, Any]:
        """Close the epoch: its row (with `epoch` and `seconds` added), the best weights, patience, last.pt."""
        seconds = time.perf_counter() - self._started
        self._started = None
        row = {"epoch": len(self.history) + 1, **{key: _plain(value) for key, value in row.items()},
               "seconds": seconds}
        self.history.append(row)
        score = _plain(score)
        if score > self.best["score"] if self.higher_is_better else score < self.best["score"]:
            self.best = {"epoch": row["epoch"], "score": score, "state": copy.deepcopy(self.model.state_dict())}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self._save()
        if self.on_epoch is not None:
            self.on_epoch(row)
        return row

    def restore_best(self) -> None:
        """Put the best epoch's weights back into the model."""
        self.model.load_state_dict(self.best["state"])

    def _save(self) -> None:
        if not is_main():  # the processes of a data-parallel run hold the same state: one writes it
            return
        state = {"settings": self.settings, "model": self.model.state_dict(), "history": self.history,
                 "best": self.best, "bad_epochs": self.bad_epochs, "torch_rng": torch.get_rng_state(),
                 **{name: _state_of(thing) for name, thing in self.stateful.items()}}
        with atomic_path(self.last) as tmp:
            torch.save(state, tmp)

    def _resume(self) -> None:
        # On the CPU: generator states must be CPU tensors; weights and optimiser state move to their
        # parameters' device as they load.
        state = torch.load(self.last, map_location="cpu", weights_only=True)
        if state.get("settings") != self.settings:
            raise ValueError(f"{self.last} was written with other settings; delete it or use another run folder")
        self.model.load_state_dict(state["model"])
        for name, thing in self.stateful.items():
            _restore(thing, state[name])
        self.history, self.best, self.bad_epochs = state["history"], state["best"], state["bad_epochs"]
        torch.set_rng_state(state["torch_rng"])  # dropout draws from torch's global generator
        if is_main():
            print(f"resuming {self.last.parent.name} after epoch {len(self.history)} ({self.elapsed:.0f} s spent)")
