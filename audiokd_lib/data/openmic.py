"""OpenMIC-2018 (Zenodo 1432913, CC BY 4.0): 10 s clips with partial labels for 20 instruments."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path, PurePosixPath

import pandas as pd

from audiokd_lib.core.params import SubsetParams
from audiokd_lib.data import download
from audiokd_lib.data.download import DownloadError
from audiokd_lib.data.sources import (
    HELD_OUT,
    Downloads,
    Quota,
    cached_bytes,
    choose_classes,
    hash_bucket,
    is_member,
    is_too_long,
    read_manifest,
    save_manifest,
    stream_check,
    subset_request,
    up_to_date,
)
from audiokd_lib.data.taxonomy import OPENMIC_CLASSES

OPENMIC_METADATA = {"labels": "openmic-2018-aggregated-labels.csv", "train": "partitions/split01_train.csv",
                    "test": "partitions/split01_test.csv"}


_OPENMIC_AUDIO = re.compile(r"(^|/)audio/\d+/(\d+_\d+)\.ogg$")


def _openmic_quota(root: Path, metadata: dict[str, str], chosen: list[str], per_class: int | None) -> Quota:
    """Which OpenMIC clips count for which class: the confident positives (relevance > 0.5) of the partitions."""
    labels = pd.read_csv(root / metadata["labels"], dtype={"sample_key": str})
    keys = set()
    for role in ("train", "test"):
        keys |= set(pd.read_csv(root / metadata[role], header=None, dtype=str)[0])
    positive = labels[(labels["relevance"] > 0.5) & labels["instrument"].isin(chosen) & labels["sample_key"].isin(keys)]
    return Quota({key: set(rows["instrument"]) for key, rows in positive.groupby("sample_key")}, per_class)


def download_openmic(dl: Downloads, subset: SubsetParams) -> dict:
    """Stream openmic-2018-v1.0.0.tgz until every class has `files_per_class` clips it is a confident positive of.

    Labels and partitions are read as they stream past. Clips met before them are kept on trust
    and, once the labels are known, either counted or deleted, so nothing streamed twice.
    """
    root, request = dl.folder("openmic"), subset_request(subset)
    if (manifest := up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    archive = dl.files("openmic")["openmic-2018-v1.0.0.tgz"]
    chosen = choose_classes(subset.classes, OPENMIC_CLASSES, "openmic")
    everything = subset.classes == "all" and subset.files_per_class is None  # the whole archive, md5 and all
    if everything and archive.size is not None:
        dl.ledger.check(archive.size - cached_bytes(root / archive.name), f"all of {archive.name}")
    metadata: dict[str, str] = {}
    quota: Quota | None = None
    early: dict[str, str] = {}  # sample key -> path, of clips streamed before the labels
    paths: dict[str, str] = {}
    too_long, checked, stopped = [], False, False
    with dl.stream(archive, root) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in download.safe_tar_members(tar, root, archive.name):
            role = next((r for r, name in OPENMIC_METADATA.items() if is_member(member.name, name)), None)
            audio = _OPENMIC_AUDIO.search(member.name)
            if role is not None:
                download.write_member(tar.extractfile(member), root / member.name, root, archive.name, member.name)
                metadata[role] = member.name
            elif audio is not None and (quota is None or quota.wants(audio.group(2))):
                key = audio.group(2)
                target = download.write_member(tar.extractfile(member), root / member.name, root, archive.name,
                                               member.name)
                if is_too_long(target, subset.max_seconds):
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
    return save_manifest(root, "openmic", request, chosen, {"openmic": [paths[k] for k in quota.taken]}, metadata,
                          {archive.name: stream_check(archive, stream, checked)}, dl.ledger.spent - spent, too_long)


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
        split = "test" if key in test_keys else "val" if hash_bucket(key) < HELD_OUT else "train"
        rows.append({
            "path": str(root / rel),
            "labels": "|".join(c for c in classes if answered.get(c, 0.5) > 0.5),
            "labels_unknown": "|".join(c for c in classes if answered.get(c, 0.5) == 0.5),
            "split": split, "source": "openmic", "sample_key": key,
        })
    return pd.DataFrame(rows, columns=["path", "labels", "labels_unknown", "split", "source", "sample_key"])
