"""Real recordings: subsets of TinySOL, IRMAS, OpenMIC-2018 and ESC-50, downloaded once within a byte budget.

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
mask for `train.masked_bce` and `metrics.masked_multilabel_metrics`, which skip the unknown pairs.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import soundfile as sf

from . import download
from .download import DownloadError, megabytes
from .files import write_json
from .params import DownloadParams, IrmasSubsetParams, Params, SubsetParams
from .render import OPENMIC_CLASSES, read_tinysol_metadata
from .weights import cache_dir

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
    # GitHub builds this zip of the repository on request: it has no published size or checksum.
    "esc50": Source("ESC-50", None, "CC BY-NC 3.0 (clips from freesound.org)", "https://github.com/karolpiczak/ESC-50",
                    (RemoteFile("master.zip", "https://github.com/karolpiczak/ESC-50/archive/master.zip"),)),
}

IRMAS_CLASSES = {
    "cel": "cello", "cla": "clarinet", "flu": "flute", "gac": "acoustic_guitar", "gel": "electric_guitar",
    "org": "organ", "pia": "piano", "sax": "saxophone", "tru": "trumpet", "vio": "violin", "voi": "voice",
}
# Both store 16-bit PCM WAV at 44.1 kHz (IRMAS in stereo), so a member's size gives its length.
WAV_BYTES_PER_SECOND = {"irmas": 44100 * 2 * 2, "esc50": 44100 * 2}
TINYSOL_FOLD_SPLITS = {0: "test", 1: "val", 2: "train", 3: "train", 4: "train"}
ESC50_FOLD_SPLITS = {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
HELD_OUT = 0.1  # share of IRMAS recordings (or OpenMIC training keys) in val, and of IRMAS recordings in test
OPENMIC_METADATA = {"labels": "openmic-2018-aggregated-labels.csv", "train": "partitions/split01_train.csv",
                    "test": "partitions/split01_test.csv"}
_OPENMIC_AUDIO = re.compile(r"(^|/)audio/\d+/(\d+_\d+)\.ogg$")


# --------------------------------------------------------------------------- fetching


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
                        f"See {source.home} and update SOURCES in audiokd_lib/datasets.py."
                    )
                size, md5 = listed[remote.name]
                if remote.md5 and md5 != remote.md5:
                    raise download.ChecksumError(
                        f"Zenodo record {source.record} lists md5 {md5} for {remote.name}, but this project "
                        f"expects {remote.md5}: the record changed. Nothing was downloaded; check {source.home} "
                        "and update SOURCES in audiokd_lib/datasets.py."
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


def _archive_check(remote: RemoteFile, raw: download.RangeFile | None) -> dict:
    """What was checked of a zip: its md5 when downloaded whole, else every member's CRC-32."""
    whole = raw is None and remote.md5 is not None
    return {"size": remote.size, "md5": remote.md5,
            "check": "md5 of the whole archive" if whole else "CRC-32 of each member read"}


def _stream_check(remote: RemoteFile, stream: download.ArchiveStream, checked: bool) -> dict:
    """What was checked of a streamed archive: the md5 only if it was read to the end."""
    if checked:
        check = "md5 of the whole archive"
    elif stream.complete:
        check = "read whole, but no md5 is published"
    else:
        check = "stopped once the subset was complete: a part of an archive cannot be checked against its md5"
    return {"size": remote.size, "md5": remote.md5, "bytes_read": stream.position, "check": check}


def _cached_bytes(target: Path) -> int:
    """How much of an archive is in the cache already (whole, or a .part)."""
    part = target.with_name(target.name + ".part")
    return target.stat().st_size if target.is_file() else part.stat().st_size if part.is_file() else 0


# --------------------------------------------------------------------------- choosing a subset


class _Quota:
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


def _choose_classes(classes: list[str] | str, available: Iterable[str], dataset: str) -> list[str]:
    """The classes a subset asks for, checked against the dataset's."""
    available = sorted(set(available))
    if classes == "all":
        return available
    unknown = [c for c in classes if c not in available]
    if unknown:
        raise ValueError(f"data.downloads.{dataset}.classes: {unknown} not in {dataset}; its classes: {', '.join(available)}")
    return list(classes)


def _hash_order(names: Iterable[str]) -> list[str]:
    """A fixed pseudo-random order (by a hash of each name): the same names always come in the same order."""
    return sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())


def _bucket(key: str) -> float:
    """A number in [0, 1) fixed by `key`, to split by hash."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def _is(member: str, path: str) -> bool:
    """Whether an archive member is the file `path`, under whatever top folder the archive adds."""
    return member == path or member.endswith("/" + path)


def _metadata_path(member: str, paths: dict[str, set[str]]) -> str | None:
    """The metadata Path an archive member is: the end of its name (the archive may add a top folder)."""
    parts = PurePosixPath(member).parts
    return next((path for i in range(len(parts)) if (path := "/".join(parts[i:])) in paths), None)


def _too_long(path: Path, max_seconds: float | None) -> bool:
    return max_seconds is not None and sf.info(path).duration > max_seconds


def _request(subset: SubsetParams) -> dict:
    return json.loads(json.dumps(subset.model_dump()))


def _up_to_date(root: Path, request: dict) -> dict | None:
    """The manifest of a subset downloaded before with the same request, if all its files are still there."""
    path = root / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("request") != request or not all((root / f).is_file() for f in manifest["files"]):
        return None
    return manifest


def _save_manifest(root: Path, dataset: str, request: dict, classes: list[str], clips: dict[str, list[str]],
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


# --------------------------------------------------------------------------- downloaders


def download_tinysol(dl: Downloads, subset: SubsetParams) -> dict:
    """Fetch TinySOL's metadata, then stream TinySOL.tar.gz until every instrument has its notes.

    Classes are TinySOL's instrument abbreviations (BTb, Hn, ..., ASax). Notes go to audio/<Path>,
    the metadata's own paths, whatever folder the archive puts them under.
    """
    root, request = dl.folder("tinysol"), _request(subset)
    if (manifest := _up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    files = dl.files("tinysol")
    meta, archive = files["TinySOL_metadata.csv"], files["TinySOL.tar.gz"]
    download.download(meta.url, root / meta.name, md5=meta.md5, size=meta.size, ledger=dl.ledger,
                      progress=dl.progress, timeout=dl.timeout)
    metadata = pd.read_csv(root / meta.name)
    chosen = _choose_classes(subset.classes, metadata["Instrument (abbr.)"], "tinysol")
    rows = metadata[metadata["Instrument (abbr.)"].isin(chosen)]
    quota = _Quota({path: {abbr} for path, abbr in zip(rows["Path"], rows["Instrument (abbr.)"])},
                   subset.files_per_class)
    everything = subset.classes == "all" and subset.files_per_class is None  # the whole archive, md5 and all
    if everything and archive.size is not None:
        dl.ledger.check(archive.size - _cached_bytes(root / archive.name), f"all of {archive.name}")
    too_long, checked, stopped = [], False, False
    with dl.stream(archive, root) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in download.safe_tar_members(tar, root, archive.name):
            path = _metadata_path(member.name, quota.classes_of)
            if path is None or not quota.wants(path):
                continue
            target = download.write_member(tar.extractfile(member), root / "audio" / path, root, archive.name,
                                           member.name)
            if _too_long(target, subset.max_seconds):
                target.unlink()
                too_long.append(path)
                continue
            quota.take(path)
            if quota.done() and not everything:
                stopped = True
                break
        if not stopped or stream.position == archive.size:  # read to the end: the md5 can be checked
            checked = stream.finish()
    return _save_manifest(
        root, "tinysol", request, chosen, {"clips": [f"audio/{p}" for p in quota.taken]}, {"metadata": meta.name},
        {meta.name: {"size": meta.size, "md5": meta.md5, "check": "md5 of the whole file"},
         archive.name: _stream_check(archive, stream, checked)},
        dl.ledger.spent - spent, too_long,
    )


def _is_wav(name: str) -> bool:
    """A WAV member, not one of the "._" resource-fork copies macOS zips carry along."""
    return name.endswith(".wav") and not PurePosixPath(name).name.startswith("._")


def _irmas_testing_labels(path: Path) -> list[str]:
    """IRMAS testing labels: one instrument code per line of the .txt beside an excerpt."""
    return [line.strip()[:3] for line in path.read_text().splitlines() if line.strip()[:3] in IRMAS_CLASSES]


def download_irmas(dl: Downloads, subset: IrmasSubsetParams) -> dict:
    """Read IRMAS's zips by range: `files_per_class` training clips per instrument, `testing_files` excerpts.

    Classes are IRMAS's codes (cel, cla, flu, gac, gel, org, pia, sax, tru, vio, voi). A training
    clip's class is its folder; a testing excerpt is kept if one of its labels (the .txt beside it,
    fetched first) is a chosen class.
    """
    root, request = dl.folder("irmas"), _request(subset)
    if (manifest := _up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    chosen = _choose_classes(subset.classes, IRMAS_CLASSES, "irmas")
    files = dl.files("irmas")
    max_bytes = None if subset.max_seconds is None else 44 + subset.max_seconds * WAV_BYTES_PER_SECOND["irmas"]
    archives: dict[str, dict] = {}
    training = files["IRMAS-TrainingData.zip"]
    with dl.open_zip(training, root) as (zf, raw):
        clips = {info.filename: info for info in zf.infolist() if _is_wav(info.filename)
                 and PurePosixPath(info.filename).parent.name in chosen
                 and (max_bytes is None or info.file_size <= max_bytes)}
        quota = _Quota({name: {PurePosixPath(name).parent.name} for name in clips}, subset.files_per_class)
        for name in _hash_order(clips):
            if quota.wants(name):
                quota.take(name)
        taken = dl.extract(zf, [clips[name] for name in quota.taken], root, training, raw)
        archives[training.name] = _archive_check(training, raw)
    testing, labels = [], []  # excerpts (.wav) and their labels (.txt)
    parts = [remote for name, remote in files.items() if name.startswith("IRMAS-TestingData")]
    if subset.testing_files:
        with contextlib.ExitStack() as stack:
            opened = {remote.name: (remote, *stack.enter_context(dl.open_zip(remote, root))) for remote in parts}
            excerpts = {}  # wav name -> (archive name, wav member, txt member)
            for name, (_, zf, _) in opened.items():
                members = {info.filename: info for info in zf.infolist()}
                for wav, info in members.items():
                    txt = members.get(wav.removesuffix(".wav") + ".txt")
                    if _is_wav(wav) and txt is not None and (max_bytes is None or info.file_size <= max_bytes):
                        excerpts[wav] = (name, info, txt)
            chosen_wavs: dict[str, list[zipfile.ZipInfo]] = {name: [] for name in opened}
            for wav in _hash_order(excerpts):
                if len(testing) == subset.testing_files:
                    break
                name, info, txt = excerpts[wav]
                remote, zf, raw = opened[name]
                dl.extract(zf, [txt], root, remote, raw)
                if set(_irmas_testing_labels(root / txt.filename)) & set(chosen):
                    chosen_wavs[name].append(info)
                    testing.append(wav)
                    labels.append(txt.filename)
            dl.ledger.check(sum(download.zip_span(i) for infos in chosen_wavs.values() for i in infos),
                            "the IRMAS testing excerpts")
            for name, infos in chosen_wavs.items():
                remote, zf, raw = opened[name]
                dl.extract(zf, infos, root, remote, raw)
                archives[name] = _archive_check(remote, raw)
    return _save_manifest(
        root, "irmas", request, chosen, {"clips": taken, "irmas_testing": testing}, {}, archives,
        dl.ledger.spent - spent, [], annotations=labels,
    )


def _openmic_quota(root: Path, metadata: dict[str, str], chosen: list[str], per_class: int | None) -> _Quota:
    """Which OpenMIC clips count for which class: the confident positives (relevance > 0.5) of the partitions."""
    labels = pd.read_csv(root / metadata["labels"], dtype={"sample_key": str})
    keys = set()
    for role in ("train", "test"):
        keys |= set(pd.read_csv(root / metadata[role], header=None, dtype=str)[0])
    positive = labels[(labels["relevance"] > 0.5) & labels["instrument"].isin(chosen) & labels["sample_key"].isin(keys)]
    return _Quota({key: set(rows["instrument"]) for key, rows in positive.groupby("sample_key")}, per_class)


def download_openmic(dl: Downloads, subset: SubsetParams) -> dict:
    """Stream openmic-2018-v1.0.0.tgz until every class has `files_per_class` clips it is a confident positive of.

    Labels and partitions are read as they stream past. Clips met before them are kept on trust
    and, once the labels are known, either counted or deleted, so nothing streamed twice.
    """
    root, request = dl.folder("openmic"), _request(subset)
    if (manifest := _up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    archive = dl.files("openmic")["openmic-2018-v1.0.0.tgz"]
    chosen = _choose_classes(subset.classes, OPENMIC_CLASSES, "openmic")
    everything = subset.classes == "all" and subset.files_per_class is None  # the whole archive, md5 and all
    if everything and archive.size is not None:
        dl.ledger.check(archive.size - _cached_bytes(root / archive.name), f"all of {archive.name}")
    metadata: dict[str, str] = {}
    quota: _Quota | None = None
    early: dict[str, str] = {}  # sample key -> path, of clips streamed before the labels
    paths: dict[str, str] = {}
    too_long, checked, stopped = [], False, False
    with dl.stream(archive, root) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in download.safe_tar_members(tar, root, archive.name):
            role = next((r for r, name in OPENMIC_METADATA.items() if _is(member.name, name)), None)
            audio = _OPENMIC_AUDIO.search(member.name)
            if role is not None:
                download.write_member(tar.extractfile(member), root / member.name, root, archive.name, member.name)
                metadata[role] = member.name
            elif audio is not None and (quota is None or quota.wants(audio.group(2))):
                key = audio.group(2)
                target = download.write_member(tar.extractfile(member), root / member.name, root, archive.name,
                                               member.name)
                if _too_long(target, subset.max_seconds):
                    target.unlink()
                    too_long.append(member.name)
                elif quota is None:
                    early[key] = member.name
                else:
                    quota.take(key)
                    paths[key] = member.name
            if quota is None and len(metadata) == len(OPENMIC_METADATA):
                quota = _openmic_quota(root, metadata, chosen, subset.files_per_class)
                for key, path in early.items():
                    if quota.wants(key):
                        quota.take(key)
                        paths[key] = path
                    else:
                        (root / path).unlink()
            if quota is not None and quota.done() and not everything:
                stopped = True
                break
        if not stopped or stream.position == archive.size:  # read to the end: the md5 can be checked
            checked = stream.finish()
    if quota is None:
        raise DownloadError(f"{archive.name} holds no {' / '.join(OPENMIC_METADATA.values())}: it is not OpenMIC-2018 "
                            f"v1.0.0; delete {root} and download again")
    return _save_manifest(root, "openmic", request, chosen, {"openmic": [paths[k] for k in quota.taken]}, metadata,
                          {archive.name: _stream_check(archive, stream, checked)}, dl.ledger.spent - spent, too_long)


def download_esc50(dl: Downloads, subset: SubsetParams) -> dict:
    """Read ESC-50's zip by range: its meta/esc50.csv, then `files_per_class` clips per category (e.g. dog, rain)."""
    root, request = dl.folder("esc50"), _request(subset)
    if (manifest := _up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    remote = dl.files("esc50")["master.zip"]
    max_bytes = None if subset.max_seconds is None else 44 + subset.max_seconds * WAV_BYTES_PER_SECOND["esc50"]
    with dl.open_zip(remote, root) as (zf, raw):
        members = {info.filename: info for info in zf.infolist()}
        csv = [name for name in members if _is(name, "meta/esc50.csv")]
        if len(csv) != 1:
            raise DownloadError(f"{remote.name} has {len(csv)} meta/esc50.csv files, expected one: not the ESC-50 repository")
        (csv_name,) = dl.extract(zf, [members[csv[0]]], root, remote, raw)
        meta = pd.read_csv(root / csv_name)
        chosen = _choose_classes(subset.classes, meta["category"], "esc50")
        audio = csv_name.removesuffix("meta/esc50.csv") + "audio/"
        category = {audio + f: c for f, c in zip(meta["filename"], meta["category"])
                    if c in chosen and audio + f in members and (max_bytes is None or members[audio + f].file_size <= max_bytes)}
        quota = _Quota({name: {c} for name, c in category.items()}, subset.files_per_class)
        for name in _hash_order(category):
            if quota.wants(name):
                quota.take(name)
        taken = dl.extract(zf, [members[name] for name in quota.taken], root, remote, raw)
        check = _archive_check(remote, raw)
    return _save_manifest(root, "esc50", request, chosen, {"clips": taken}, {"metadata": csv_name},
                          {remote.name: check}, dl.ledger.spent - spent, [])


DOWNLOADERS: dict[str, Callable[[Downloads, SubsetParams], dict]] = {
    "tinysol": download_tinysol, "irmas": download_irmas, "openmic": download_openmic, "esc50": download_esc50,
}


# --------------------------------------------------------------------------- loaders


def load_tinysol(root: str | Path) -> pd.DataFrame:
    """The TinySOL subset as a clip table: read_tinysol_metadata's columns and a split from the official folds."""
    root = Path(root)
    manifest = read_manifest(root, "tinysol")
    table = read_tinysol_metadata(root / manifest["metadata"]["metadata"], audio_root=root / "audio")
    taken = {str((root / p).resolve()) for p in manifest["clips"]["clips"]}
    table = table[table["path"].isin(taken)].reset_index(drop=True)
    table["split"] = table["fold"].map(TINYSOL_FOLD_SPLITS)
    return table


def load_irmas(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The IRMAS subset as two clip tables: training clips (single-label) and testing excerpts (multi-label)."""
    root = Path(root)
    manifest = read_manifest(root, "irmas")
    rows = []
    for rel in manifest["clips"]["clips"]:
        path = PurePosixPath(rel)
        # "[cel][cla]0001__2.wav": excerpt 2 of recording 0001; its excerpts share a split.
        recording = f"{path.parent.name}/{path.stem.rsplit('__', 1)[0]}"
        bucket = _bucket(recording)
        split = "test" if bucket < HELD_OUT else "val" if bucket < 2 * HELD_OUT else "train"
        rows.append({"path": str(root / rel), "label": IRMAS_CLASSES[path.parent.name], "instrument": path.parent.name,
                     "recording": recording, "split": split, "source": "irmas"})
    training = pd.DataFrame(rows, columns=["path", "label", "instrument", "recording", "split", "source"])
    chosen = set(manifest["classes"])
    testing = pd.DataFrame(
        [{"path": str(root / rel),
          "labels": "|".join(sorted(IRMAS_CLASSES[c] for c in set(_irmas_testing_labels(
              root / (rel.removesuffix(".wav") + ".txt"))) & chosen)),
          "split": "test", "source": "irmas", "sample_key": PurePosixPath(rel).stem}
         for rel in manifest["clips"]["irmas_testing"]],
        columns=["path", "labels", "split", "source", "sample_key"],
    )
    return training, testing


def load_openmic(root: str | Path) -> pd.DataFrame:
    """The OpenMIC subset as a multi-label clip table: positives in `labels`, unanswered classes in `labels_unknown`."""
    root = Path(root)
    manifest = read_manifest(root, "openmic")
    meta, classes = manifest["metadata"], manifest["classes"]
    answers = pd.read_csv(root / meta["labels"], dtype={"sample_key": str})
    answers = answers[answers["instrument"].isin(classes)]
    relevance = {(k, i): r for k, i, r in zip(answers["sample_key"], answers["instrument"], answers["relevance"])}
    test_keys = set(pd.read_csv(root / meta["test"], header=None, dtype=str)[0])
    rows = []
    for rel in manifest["clips"]["openmic"]:
        key = PurePosixPath(rel).stem
        answered = {c: relevance[key, c] for c in classes if (key, c) in relevance}
        split = "test" if key in test_keys else "val" if _bucket(key) < HELD_OUT else "train"
        rows.append({
            "path": str(root / rel),
            "labels": "|".join(c for c in classes if answered.get(c, 0.5) > 0.5),
            "labels_unknown": "|".join(c for c in classes if answered.get(c, 0.5) == 0.5),
            "split": split, "source": "openmic", "sample_key": key,
        })
    return pd.DataFrame(rows, columns=["path", "labels", "labels_unknown", "split", "source", "sample_key"])


def load_esc50(root: str | Path) -> pd.DataFrame:
    """The ESC-50 subset as a single-label clip table, split by the official folds."""
    root = Path(root)
    manifest = read_manifest(root, "esc50")
    csv_name = manifest["metadata"]["metadata"]
    meta = pd.read_csv(root / csv_name).set_index("filename")
    audio = csv_name.removesuffix("meta/esc50.csv") + "audio/"
    names = [rel.removeprefix(audio) for rel in manifest["clips"]["clips"]]
    return pd.DataFrame({
        "path": [str(root / audio / name) for name in names],
        "label": meta.loc[names, "category"].astype(str).to_numpy(),
        "fold": meta.loc[names, "fold"].astype("int64").to_numpy(),
        "split": meta.loc[names, "fold"].map(ESC50_FOLD_SPLITS).to_numpy(),
        "source": "esc50",
    })


def load_tables(dataset: str, root: str | Path) -> dict[str, pd.DataFrame]:
    """A downloaded subset's clip tables by name: "clips" (single-label, for notebooks 02-07) and multi-label ones."""
    if dataset == "tinysol":
        return {"clips": load_tinysol(root)}
    if dataset == "irmas":
        training, testing = load_irmas(root)
        return {"clips": training, "irmas_testing": testing}
    if dataset == "openmic":
        return {"openmic": load_openmic(root)}
    return {"clips": load_esc50(root)}


def multilabel_targets(table: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """0/1 targets and the mask of known answers, each (clips, classes), of a multi-label clip table.

    `labels` lists a clip's positives and `labels_unknown` (OpenMIC) the classes nobody answered for;
    every other class is a known negative. A table without `labels_unknown` is fully known.
    """
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(table), len(classes)), dtype=np.float32)
    known = np.ones((len(table), len(classes)), dtype=bool)
    columns = [("labels", targets, 1.0)] + ([("labels_unknown", known, False)] if "labels_unknown" in table else [])
    for column, matrix, value in columns:
        for row, names in enumerate(table[column]):
            for name in filter(None, str(names).split("|")):
                if name not in index:
                    raise ValueError(f"{column} of row {row} names {name!r}, which is not among the classes {classes}")
                matrix[row, index[name]] = value
    return targets, known


# --------------------------------------------------------------------------- one call for notebook 01


@dataclass
class RealData:
    """A downloaded subset and its clip tables ("clips" single-label, others multi-label), with its manifest."""

    dataset: str
    root: Path
    tables: dict[str, pd.DataFrame]
    manifest: dict

    def summary(self) -> str:
        """Describe the subset in a few lines: source, licence, tables, bytes."""
        m = self.manifest
        tables = ", ".join(f"{name} {len(t)} clips" for name, t in self.tables.items())
        archives = "; ".join(f"{name}: {a['check']}" for name, a in m["archives"].items())
        return (f"{m['title']} ({m['licence']}), cached in {self.root}\n  tables: {tables}\n"
                f"  fetched {megabytes(m['fetched_bytes'])} when downloaded; {archives}")


def prepare(params: Params, progress: bool = True) -> RealData:
    """Download the subset of data.dataset (or find it in the cache) and load its clip tables."""
    name = params.data.dataset
    if name not in DOWNLOADERS:
        raise ValueError(f"data.dataset is {name!r}, not a downloaded dataset ({', '.join(DOWNLOADERS)})")
    dl = Downloads.from_params(params.data.downloads, progress)
    try:
        manifest = DOWNLOADERS[name](dl, getattr(params.data.downloads, name))
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
        raise DownloadError(
            f"{name}: a download failed ({err}). What arrived is kept in {dl.folder(name)} and resumed next time. "
            "Without internet access, set data.downloads.base_url to a mirror holding the official paths."
        ) from err
    return RealData(name, dl.folder(name), load_tables(name, dl.folder(name)), manifest)
