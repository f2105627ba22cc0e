"""Finding or downloading pretrained files, and proving they are the right ones.

A pretrained model is only as trustworthy as the file it was loaded from. Every file the project
uses is named here with its official download address, its license and its SHA-256 hash. `fetch`
looks for the file in folders you name (a parameter, then $AUDIOKD_WEIGHTS), then in the project's
own cache; only if it is nowhere does it download, into the cache. Whatever it finds or downloads
must match the hash: a file with another hash is refused, never silently used or overwritten.

Downloads go to a ".part" file first and are renamed into place only once the hash matches, so an
interrupted download never looks like a finished one; the next attempt resumes the ".part" where
the server allows it (an HTTP Range request) and starts over where it does not.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from audiokd_lib.data.download import ChecksumError, DownloadError, file_digest
from audiokd_lib.data.download import download as download_file


@dataclass(frozen=True)
class WeightsFile:
    """One pretrained file: where it officially comes from, under which license, and its hash."""

    name: str  # file name, e.g. "mn04_as_mAP_432.pt"
    url: str  # official download URL
    sha256: str
    license: str
    source: str  # human description of the official source


MN04_AS = WeightsFile(
    "mn04_as_mAP_432.pt",
    "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/mn04_as_mAP_432.pt",
    "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c",
    "MIT (Florian Schmid, 2022)",
    "github.com/fschmid56/EfficientAT release v0.0.1",
)


AUDIOSET_LABELS = WeightsFile(
    "audioset_class_labels_indices.csv",
    "http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/class_labels_indices.csv",
    "cdd1049833c4b86127c2773ac0d14a2754b6a6d0d1798002ed5c66e699708429",
    "CC BY 4.0",
    "AudioSet ontology",
)


KNOWN = {"mn04_as": MN04_AS}  # the EfficientAT weights teacher.checkpoint may name


class WeightsNotFound(RuntimeError):
    """A pretrained file that is in none of the folders searched and could not be downloaded."""

    def __init__(self, wf: WeightsFile, folders: list[Path], reason: str):
        looked = "\n".join(f"  - {path}{'' if path.is_dir() else ' (no such folder)'}" for path in folders)
        super().__init__(
            f"{wf.name} ({wf.source}, {wf.license}) was not found. Looked in:\n{looked}\n"
            f"Download from {wf.url}: {reason}.\n"
            "To fix: download that URL on a machine with internet access, put the file in a folder and set "
            "AUDIOKD_WEIGHTS=/that/folder (or the teacher.weights_dir parameter), "
            "or allow downloading (download=True) where the URL can be reached."
        )


def cache_dir() -> Path:
    """Where downloads go: $AUDIOKD_CACHE, else $XDG_CACHE_HOME/audiokd, else ~/.cache/audiokd."""
    if os.environ.get("AUDIOKD_CACHE"):
        return Path(os.environ["AUDIOKD_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "audiokd"


def search_dirs(weights_dir: str | Path | None = None) -> list[Path]:
    """The folders searched, in order: `weights_dir`, $AUDIOKD_WEIGHTS, then the cache."""
    candidates = [weights_dir, os.environ.get("AUDIOKD_WEIGHTS"), cache_dir()]
    folders: list[Path] = []
    for candidate in candidates:
        if candidate:
            folder = Path(candidate).expanduser()
            if folder not in folders:
                folders.append(folder)
    return folders


def _check_local(path: Path, wf: WeightsFile) -> Path:
    """Return `path` if its hash is the expected one; refuse it otherwise."""
    actual = file_digest(path)
    if actual != wf.sha256:
        raise ValueError(
            f"{path}: SHA-256 is {actual}, expected {wf.sha256} for {wf.name} from {wf.source}. "
            f"The file is damaged or another version; replace it with the one from {wf.url} "
            "(it is left untouched here)."
        )
    return path


def _download(wf: WeightsFile, progress: bool, timeout: float) -> Path:
    """Download `wf` into the cache (resumable, through a .part file) and check its hash."""
    try:
        return download_file(wf.url, cache_dir() / wf.name, sha256=wf.sha256, progress=progress, timeout=timeout)
    except ChecksumError as err:
        raise ValueError(
            f"{err} Get the expected version from {wf.source} and put it in a folder named by AUDIOKD_WEIGHTS."
        ) from None


def fetch(wf: WeightsFile, weights_dir: str | Path | None = None, download: bool = True,
          progress: bool = True, timeout: float = 60) -> Path:
    """Path of a verified copy of `wf`: found in a search folder, or downloaded into the cache."""
    folders = search_dirs(weights_dir)
    for folder in folders:
        if (folder / wf.name).is_file():
            return _check_local(folder / wf.name, wf)
    if not download:
        raise WeightsNotFound(wf, folders, "not attempted, downloading is disabled (download=False)")
    try:
        return _download(wf, progress, timeout)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError,
            DownloadError) as err:
        reason = f"failed ({err}); any part already downloaded is kept in the cache and resumed next time"
        raise WeightsNotFound(wf, folders, reason) from err
