"""Where the real datasets come from, and the machinery every downloader shares: budget, subsets, manifests.

The rendered notes teach the method; real recordings test it. Each dataset is fetched from its
official source (the table `SOURCES`, with its licence), into a cache folder shared by every
profile, as a *subset* the profile chooses (classes, files per class, longest clip), and turned
into the same clip table as the rendered data (columns path, label or labels, split, source).

How little is fetched depends on the archive format:

- a **zip** (IRMAS, ESC-50) is read through HTTP Range requests: its central directory first, then
  only the chosen members, so a subset costs its own bytes. Members are chosen in a fixed
  pseudo-random order (a hash of their names), so the same settings always give the same clips.
- a **tar.gz** (TinySOL, OpenMIC-2018) can only be read front to back. It is streamed, the first
  `files_per_class` clips of each class *in archive order* are kept, and the stream stops once
  every class has its clips. What was streamed stays in the cache and is resumed from there.

Checks: files read whole are checked against the record's md5; zip members against their CRC-32
as they are read; a tar.gz read only in part cannot be checked (gzip's checksum is at its end),
which the manifest says. Every download is charged to a byte budget (data.downloads.budget_bytes,
1 GB by default, all datasets together); what would exceed it is refused before it starts, with
the numbers. `manifest.json` in each dataset's folder records the request, the files taken and
the bytes read, so a subset can be reproduced and compared.

Splits, all deterministic:

- TinySOL: its official 5-fold split (balanced by instrument, pitch and dynamics). Fold 0 is the
  test set, fold 1 the validation set, folds 2-4 train: one fixed round of the cross-validation.
- IRMAS: training clips are split 80/10/10 (train/val/test) by a hash of the recording they were
  cut from, so excerpts of one recording never straddle splits; the testing excerpts form a
  separate multi-label table, all `test`.
- OpenMIC-2018: its partitions split01_train / split01_test; 10% of the training keys (by hash) are
  the validation set.
- ESC-50: fold 5 is the test set, fold 4 validation, folds 1-3 train.

OpenMIC's labels are partial: volunteers answered only some (clip, instrument) questions. A
relevance above 0.5 is a positive, below 0.5 a negative, and every other pair is *unknown*, kept
in the column `labels_unknown`. :func:`multilabel_targets` turns a table into targets and a known
mask for `losses.masked_bce` and `metrics.masked_multilabel_metrics`, which skip the unknown pairs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import soundfile as sf

from audiokd_lib.core.files import write_json
from audiokd_lib.core.params import DownloadParams, SubsetParams
from audiokd_lib.data import download
from audiokd_lib.data.download import DownloadError
from audiokd_lib.models.weights import cache_dir

ZENODO_FILE = "https://zenodo.org/records/{record}/files/{name}?download=1"


ZENODO_API = "https://zenodo.org/api/records/{record}"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: its official address, and its md5 and size where known."""

    name: str
    url: str
    md5: str | None = None  # None: not confirmed here, read from the Zenodo record
    size: int | None = None  # bytes, from the Zenodo record


@dataclass(frozen=True)
class Source:
    """Where a dataset officially comes from, under which licence, and its files."""

    title: str
    record: int | None  # Zenodo record id; None: not on Zenodo
    licence: str
    home: str
    files: tuple[RemoteFile, ...]


def _zenodo(record: int, name: str, md5: str | None = None) -> RemoteFile:
    return RemoteFile(name, ZENODO_FILE.format(record=record, name=name), md5)


# Sizes come from each Zenodo record's API at download time. The md5 values given here are the ones
# mirdata's loaders pin; the record's own listing must agree with them, or nothing is downloaded.
SOURCES: dict[str, Source] = {
    "tinysol": Source("TinySOL", 3685367, "CC BY 4.0", "https://zenodo.org/records/3685367", (
        _zenodo(3685367, "TinySOL_metadata.csv", "a86c9bb115f69e61f2f25872e397fc4a"),
        _zenodo(3685367, "TinySOL.tar.gz", "36030a7fe389da86c3419e5ee48e3b7f"),
    )),
    "irmas": Source("IRMAS", 1290750, "CC BY-NC-SA 3.0 (non-commercial use only)",
                    "https://www.upf.edu/web/mtg/irmas", (
        _zenodo(1290750, "IRMAS-TrainingData.zip", "4fd9f5ed5a18d8e2687e6360b5f60afe"),
        _zenodo(1290750, "IRMAS-TestingData-Part1.zip", "5a2e65520dcedada565dff2050bb2a56"),
        _zenodo(1290750, "IRMAS-TestingData-Part2.zip", "afb0c8ea92f34ee653693106be95c895"),
        _zenodo(1290750, "IRMAS-TestingData-Part3.zip", "9b3fb2d0c89cdc98037121c25bd5b556"),
    )),
    # The archive's md5 could not be confirmed offline: it is read from the record.
    "openmic": Source("OpenMIC-2018", 1432913, "CC BY 4.0 (each clip under its own Creative Commons licence)",
                      "https://github.com/cosmir/openmic-2018", (_zenodo(1432913, "openmic-2018-v1.0.0.tgz"),)),
    # Notebook 09's real beats: both md5 values are those mirdata's loader pins.
    "candombe": Source("Candombe", 6533068, "CC BY 4.0", "https://zenodo.org/records/6533068", (
        _zenodo(6533068, "candombe_annotations.zip", "f78aff60aa413cb4960c0c77cc31c243"),
        _zenodo(6533068, "candombe_audio.zip", "ccd7f437024807b1a52c0818aa0b7f06"),
    )),
    # GitHub builds this zip of the repository on request: it has no published size or checksum.
    "esc50": Source("ESC-50", None, "CC BY-NC 3.0 (clips from freesound.org)", "https://github.com/karolpiczak/ESC-50",
                    (RemoteFile("master.zip", "https://github.com/karolpiczak/ESC-50/archive/master.zip"),)),
}


# Both store 16-bit PCM WAV at 44.1 kHz (IRMAS in stereo), so a member's size gives its length.
WAV_BYTES_PER_SECOND = {"irmas": 44100 * 2 * 2, "esc50": 44100 * 2}


ESC50_FOLD_SPLITS = {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}


HELD_OUT = 0.1  # share of IRMAS recordings (or OpenMIC training keys) in val, and of IRMAS recordings in test


@dataclass
class Downloads:
    """Where real datasets go and how they are fetched: cache folder, byte ledger, mirror, progress bars."""

    cache: Path
    ledger: download.Ledger
    base_url: str | None = None
    progress: bool = True
    timeout: float = 60.0

    @classmethod
    def from_params(cls, dp: DownloadParams, progress: bool = True) -> Downloads:
        cache = Path(dp.cache_dir).expanduser() if dp.cache_dir else cache_dir() / "datasets"
        return cls(cache, download.Ledger(cache / "ledger.json", dp.budget_bytes), dp.base_url, progress)

    def folder(self, dataset: str) -> Path:
        """The dataset's folder in the cache."""
        return self.cache / dataset

    def url(self, official: str) -> str:
        """The official URL, or the same path on the mirror named by base_url."""
        if not self.base_url:
            return official
        parts = urllib.parse.urlsplit(official)
        return self.base_url.rstrip("/") + urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))

    def files(self, dataset: str) -> dict[str, RemoteFile]:
        """The dataset's files at their URLs (on the mirror, if any) with the size and md5 its Zenodo record lists."""
        source = SOURCES[dataset]
        listed = self._zenodo_listing(source.record) if source.record else {}
        files = {}
        for remote in source.files:
            if source.record:
                if remote.name not in listed:
                    raise DownloadError(
                        f"Zenodo record {source.record} no longer lists {remote.name}: the dataset moved. "
                        f"See {source.home} and update SOURCES in audiokd_lib/data/sources.py."
                    )
                size, md5 = listed[remote.name]
                if remote.md5 and md5 != remote.md5:
                    raise download.ChecksumError(
                        f"Zenodo record {source.record} lists md5 {md5} for {remote.name}, but this project "
                        f"expects {remote.md5}: the record changed. Nothing was downloaded; check {source.home} "
                        "and update SOURCES in audiokd_lib/data/sources.py."
                    )
                remote = replace(remote, size=size, md5=md5)
            files[remote.name] = replace(remote, url=self.url(remote.url))
        return files

    def _zenodo_listing(self, record: int) -> dict[str, tuple[int, str]]:
        """{file name: (size, md5)} as the Zenodo API lists the record's files."""
        with urllib.request.urlopen(self.url(ZENODO_API.format(record=record)), timeout=self.timeout) as response:
            body = response.read()
        self.ledger.charge(len(body), f"zenodo-{record}.json")
        return {
            entry.get("key") or entry["filename"]: (int(entry.get("size", entry.get("filesize"))),
                                                    entry["checksum"].removeprefix("md5:"))
            for entry in json.loads(body)["files"]
        }

    def stream(self, remote: RemoteFile, folder: Path) -> download.ArchiveStream:
        """Read a remote archive front to back (resuming from what an earlier read left in the cache)."""
        return download.ArchiveStream(remote.url, folder / remote.name, md5=remote.md5, size=remote.size,
                                      ledger=self.ledger, progress=self.progress, timeout=self.timeout)

    @contextlib.contextmanager
    def open_zip(self, remote: RemoteFile, folder: Path) -> Iterator[tuple[zipfile.ZipFile, download.RangeFile | None]]:
        """Open a remote zip to read members over Range requests; where the server refuses them, download it whole."""
        local = folder / remote.name
        if not local.is_file():
            try:
                raw = download.RangeFile(remote.url, self.ledger, remote.name, self.timeout)
            except download.RangeNotSupported:
                download.download(remote.url, local, md5=remote.md5, size=remote.size, ledger=self.ledger,
                                  progress=self.progress, timeout=self.timeout)
            else:
                with raw, zipfile.ZipFile(raw) as zf:
                    yield zf, raw
                return
        with zipfile.ZipFile(local) as zf:
            yield zf, None

    def extract(self, zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], folder: Path, remote: RemoteFile,
                raw: download.RangeFile | None) -> list[str]:
        """Extract zip members under `folder` (within the budget); return their paths relative to it."""
        download.extract_zip_members(zf, members, folder, remote.name, raw, self.ledger, self.progress)
        return [info.filename for info in members]


def archive_check(remote: RemoteFile, raw: download.RangeFile | None) -> dict:
    """What was checked of a zip: its md5 when downloaded whole, else every member's CRC-32."""
    whole = raw is None and remote.md5 is not None
    return {"size": remote.size, "md5": remote.md5,
            "check": "md5 of the whole archive" if whole else "CRC-32 of each member read"}


def stream_check(remote: RemoteFile, stream: download.ArchiveStream, checked: bool) -> dict:
    """What was checked of a streamed archive: the md5 only if it was read to the end."""
    if checked:
        check = "md5 of the whole archive"
    elif stream.complete:
        check = "read whole, but no md5 is published"
    else:
        check = "stopped once the subset was complete: a part of an archive cannot be checked against its md5"
    return {"size": remote.size, "md5": remote.md5, "bytes_read": stream.position, "check": check}


def cached_bytes(target: Path) -> int:
    """How much of an archive is in the cache already (whole, or a .part)."""
    part = target.with_name(target.name + ".part")
    return target.stat().st_size if target.is_file() else part.stat().st_size if part.is_file() else 0


class Quota:
    """Take items in the order offered while one of their classes still needs items (files_per_class each)."""

    def __init__(self, classes_of: dict[str, set[str]], per_class: int | None):
        self.classes_of = classes_of
        available = Counter(c for classes in classes_of.values() for c in classes)
        self.quota = {c: min(per_class or n, n) for c, n in available.items()}
        self.counts = dict.fromkeys(self.quota, 0)
        self.taken: list[str] = []

    def wants(self, key: str) -> bool:
        return any(self.counts[c] < self.quota[c] for c in self.classes_of.get(key, ()))

    def take(self, key: str) -> None:
        self.taken.append(key)
        for c in self.classes_of[key]:
            self.counts[c] += 1

    def done(self) -> bool:
        return all(self.counts[c] >= q for c, q in self.quota.items())


def choose_classes(classes: list[str] | str, available: Iterable[str], dataset: str) -> list[str]:
    """The classes a subset asks for, checked against the dataset's."""
    available = sorted(set(available))
    if classes == "all":
        return available
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise ValueError(f"data.downloads.{dataset}.classes: {unknown} not in {dataset}; its classes: {', '.join(available)}")
    return list(classes)


def hash_order(names: Iterable[str]) -> list[str]:
    """A fixed pseudo-random order (by a hash of each name): the same names always come in the same order."""
    return sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())


def hash_bucket(key: str) -> float:
    """A number in [0, 1) fixed by `key`, to split by hash."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def is_member(member: str, path: str) -> bool:
    """Whether an archive member is the file `path`, under whatever top folder the archive adds."""
    return member == path or member.endswith("/" + path)


def metadata_path(member: str, paths: dict[str, set[str]]) -> str | None:
    """The metadata Path an archive member is: the end of its name (the archive may add a top folder)."""
    parts = PurePosixPath(member).parts
    return next((path for i in range(len(parts)) if (path := "/".join(parts[i:])) in paths), None)


def is_too_long(path: Path, max_seconds: float | None) -> bool:
    return max_seconds is not None and sf.info(path).duration > max_seconds


def subset_request(subset: SubsetParams) -> dict:
    return json.loads(json.dumps(subset.model_dump()))


def up_to_date(root: Path, request: dict) -> dict | None:
    """The manifest of a subset downloaded before with the same request, if all its files are still there."""
    path = root / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("request") != request or not all((root / f).is_file() for f in manifest["files"]):
        return None
    return manifest


def save_manifest(root: Path, dataset: str, request: dict, classes: list[str], clips: dict[str, list[str]],
                   metadata: dict[str, str], archives: dict[str, dict], fetched: int, too_long: list[str],
                   annotations: list[str] = ()) -> dict:
    """Write manifest.json (atomically): the request, what was taken (paths relative to `root`), and what it cost."""
    source = SOURCES[dataset]
    manifest = {
        "dataset": dataset, "title": source.title, "licence": source.licence, "home": source.home,
        "record": source.record, "request": request, "classes": classes, "clips": clips, "metadata": metadata,
        "annotations": list(annotations),
        "files": sorted({*metadata.values(), *annotations, *(p for paths in clips.values() for p in paths)}),
        "archives": archives, "fetched_bytes": fetched, "too_long": too_long,
    }
    write_json(root / "manifest.json", manifest)
    return manifest


def read_manifest(root: str | Path, dataset: str) -> dict:
    """The manifest of the subset downloaded into `root`."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {dataset} subset here yet; run notebook 01_data with data.dataset: {dataset}")
    return json.loads(path.read_text())
