"""TinySOL (Zenodo 3685367, CC BY 4.0): 2,913 single notes of 14 instruments; its official folds."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pandas as pd

from audiokd_lib.core.params import SubsetParams
from audiokd_lib.data import download
from audiokd_lib.data.notes import read_tinysol_metadata
from audiokd_lib.data.sources import (
    Downloads,
    Quota,
    cached_bytes,
    choose_classes,
    is_too_long,
    metadata_path,
    read_manifest,
    save_manifest,
    stream_check,
    subset_request,
    up_to_date,
)

TINYSOL_FOLD_SPLITS = {0: "test", 1: "val", 2: "train", 3: "train", 4: "train"}


def download_tinysol(dl: Downloads, subset: SubsetParams) -> dict:
    """Fetch TinySOL's metadata, then stream TinySOL.tar.gz until every instrument has its notes.

    Classes are TinySOL's instrument abbreviations (BTb, Hn, ..., ASax). Notes go to audio/<Path>,
    the metadata's own paths, whatever folder the archive puts them under.
    """
    root, request = dl.folder("tinysol"), subset_request(subset)
    if (manifest := up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    files = dl.files("tinysol")
    meta, archive = files["TinySOL_metadata.csv"], files["TinySOL.tar.gz"]
    download.download(meta.url, root / meta.name, md5=meta.md5, size=meta.size, ledger=dl.ledger,
                      progress=dl.progress, timeout=dl.timeout)
    metadata = pd.read_csv(root / meta.name)
    chosen = choose_classes(subset.classes, metadata["Instrument (abbr.)"], "tinysol")
    rows = metadata[metadata["Instrument (abbr.)"].isin(chosen)]
    quota = Quota({path: {abbr} for path, abbr in zip(rows["Path"], rows["Instrument (abbr.)"])},
                   subset.files_per_class)
    everything = subset.classes == "all" and subset.files_per_class is None  # the whole archive, md5 and all
    if everything and archive.size is not None:
        dl.ledger.check(archive.size - cached_bytes(root / archive.name), f"all of {archive.name}")
    too_long, checked, stopped = [], False, False
    with dl.stream(archive, root) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in download.safe_tar_members(tar, root, archive.name):
            path = metadata_path(member.name, quota.classes_of)
            if path is None or not quota.wants(path):
                continue
            target = download.write_member(tar.extractfile(member), root / "audio" / path, root, archive.name,
                                           member.name)
            if is_too_long(target, subset.max_seconds):
                target.unlink()
                too_long.append(path)
                continue
            quota.take(path)
            if quota.done() and not everything:
                stopped = True
                break
        if not stopped or stream.position == archive.size:  # read to the end: the md5 can be checked
            checked = stream.finish()
    return save_manifest(
        root, "tinysol", request, chosen, {"clips": [f"audio/{p}" for p in quota.taken]}, {"metadata": meta.name},
        {meta.name: {"size": meta.size, "md5": meta.md5, "check": "md5 of the whole file"},
         archive.name: stream_check(archive, stream, checked)},
        dl.ledger.spent - spent, too_long,
    )


def load_tinysol(root: str | Path) -> pd.DataFrame:
    """The TinySOL subset as a clip table: read_tinysol_metadata's columns and a split from the official folds."""
    root = Path(root)
    manifest = read_manifest(root, "tinysol")
    table = read_tinysol_metadata(root / manifest["metadata"]["metadata"], audio_root=root / "audio")
    taken = {str((root / p).resolve()) for p in manifest["clips"]["clips"]}
    table = table[table["path"].isin(taken)].reset_index(drop=True)
    table["split"] = table["fold"].map(TINYSOL_FOLD_SPLITS)
    return table
