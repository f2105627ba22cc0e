"""ESC-50 (GitHub karolpiczak/ESC-50, CC BY-NC 3.0): 2,000 environmental sounds, a backup for debugging."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from audiokd_lib.core.params import SubsetParams
from audiokd_lib.data.download import DownloadError
from audiokd_lib.data.sources import (
    ESC50_FOLD_SPLITS,
    WAV_BYTES_PER_SECOND,
    Downloads,
    Quota,
    archive_check,
    choose_classes,
    hash_order,
    is_member,
    read_manifest,
    save_manifest,
    subset_request,
    up_to_date,
)


def download_esc50(dl: Downloads, subset: SubsetParams) -> dict:
    """Read ESC-50's zip by range: its meta/esc50.csv, then `files_per_class` clips per category (e.g. dog, rain)."""
    root, request = dl.folder("esc50"), subset_request(subset)
    if (manifest := up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    remote = dl.files("esc50")["master.zip"]
    max_bytes = None if subset.max_seconds is None else 44 + subset.max_seconds * WAV_BYTES_PER_SECOND["esc50"]
    with dl.open_zip(remote, root) as (zf, raw):
        members = {info.filename: info for info in zf.infolist()}
        csv = [name for name in members if is_member(name, "meta/esc50.csv")]
        if len(csv) != 1:
            raise DownloadError(f"{remote.name} has {len(csv)} meta/esc50.csv files, expected one: not the ESC-50 repository")
        (csv_name,) = dl.extract(zf, [members[csv[0]]], root, remote, raw)
        meta = pd.read_csv(root / csv_name)
        chosen = choose_classes(subset.classes, meta["category"], "esc50")
        audio = csv_name.removesuffix("meta/esc50.csv") + "audio/"
        category = {audio + f: c for f, c in zip(meta["filename"], meta["category"])
                    if c in chosen and audio + f in members and (max_bytes is None or members[audio + f].file_size <= max_bytes)}
        quota = Quota({name: {c} for name, c in category.items()}, subset.files_per_class)
        for name in hash_order(category):
            if quota.wants(name):
                quota.take(name)
        taken = dl.extract(zf, [members[name] for name in quota.taken], root, remote, raw)
        check = archive_check(remote, raw)
    return save_manifest(root, "esc50", request, chosen, {"clips": taken}, {"metadata": csv_name},
                          {remote.name: check}, dl.ledger.spent - spent, [])


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
