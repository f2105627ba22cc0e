"""Where the project lives, writing files so that an interrupted run never leaves half a file, the folder a
training keeps its state in (:func:`run_folder`), and results that cost kept on disk by the key of their
inputs (:func:`cached`, with :func:`digest` to fingerprint the tensors, arrays and models among them)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def project_root() -> Path:
    """The folder holding pyproject.toml: notebooks run from notebooks/, papermill from anywhere."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "audiokd_lib").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def run_folder(run_dir: str | Path | None) -> Iterator[Path]:
    """`run_dir`, or a temporary folder removed afterwards for a training nobody resumes (an Optuna trial):
    where an :class:`~audiokd_lib.core.loop.EpochLoop` keeps its `last.pt`."""
    if run_dir is not None:
        yield Path(run_dir)
        return
    with tempfile.TemporaryDirectory(prefix="audiokd-run-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` (and whatever was there) only if the block
    succeeds, so a folder is either complete or absent. Asking before replacing is the caller's job."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically, indented for people to read."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path: str | Path, frame) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hash of a file as lowercase hex (e.g. "sha256", "md5"), read in chunks so it never has to fit in memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def digest(*things: Any) -> str:
    """A short sha256 of tensors, arrays, modules (their state_dict), dicts, lists, strings and numbers, in
    order: the fingerprint of a model's weights or of a data set, for a key of :func:`cached` or of a run."""
    h = hashlib.sha256()

    def add(thing: Any) -> None:
        if callable(getattr(thing, "state_dict", None)):  # a torch module (this file imports no torch)
            thing = thing.state_dict()
        if isinstance(thing, dict):
            for key in sorted(thing):
                h.update(str(key).encode())
                add(thing[key])
        elif isinstance(thing, (list, tuple)):
            for item in thing:
                add(item)
        elif callable(getattr(thing, "detach", None)):  # a torch tensor
            add(thing.detach().cpu().contiguous().numpy())
        elif isinstance(thing, np.ndarray):
            h.update(str((thing.dtype, thing.shape)).encode())
            h.update(np.ascontiguousarray(thing).tobytes())
        else:
            h.update(repr(thing).encode())

    for thing in things:
        add(thing)
    return h.hexdigest()[:16]


def cached(path: str | Path, key: str, compute: Callable[[], T], needs: Iterable[str | Path] = ()) -> T:
    """What `compute()` returned when it last ran on inputs of this `key`, read back from `path`; when the key
    differs (or nothing is saved yet) it runs now and its value is saved there, atomically, with the key.

    The key names everything the value depends on: settings, data fingerprint, model checkpoint hash
    (e.g. :func:`~audiokd_lib.core.tracking.settings_key` of them). `needs`: files that `compute` writes
    besides its value (an export); the value is reused only while they exist. The file is a pickle of our
    own making.
    """
    path = Path(path)
    if path.is_file() and all(Path(p).is_file() for p in needs):
        with contextlib.suppress(OSError, EOFError, pickle.UnpicklingError, AttributeError, KeyError, TypeError):
            with open(path, "rb") as handle:
                saved = pickle.load(handle)  # written by this function, in this project's outputs
            if saved["key"] == key:
                return saved["value"]
    value = compute()
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        pickle.dump({"key": key, "value": value}, handle)
    return value
