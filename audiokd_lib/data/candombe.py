"""Candombe (Zenodo 6533068, CC BY 4.0): real recordings with beat and downbeat annotations (notebook 09).

35 studio performances of Afro-Uruguayan Candombe drumming, three to five drums each, over two hours
in all, with every beat and downbeat annotated by an expert (Nunes, Rocamora, Jure and Biscainho,
ISMIR 2015). The audio is a zip of FLAC files, the annotations a zip of CSV files whose rows are
`time,bar.beat` (1.1, 1.2, 1.3, 1.4, 2.1, ...: a beat ending in .1 is a downbeat), as mirdata reads them.

Both zips are read by range: the annotations whole (they are small), then `recordings` performances
chosen in a fixed pseudo-random order, so a subset costs its own bytes and the same setting always
gives the same recordings. Each performance's annotations are rewritten as `beats/<name>.csv` (time,
position), the format of notebook 09's rendered pieces.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

import pandas as pd

from audiokd_lib.core.files import atomic_path
from audiokd_lib.data.download import DownloadError
from audiokd_lib.data.sources import Downloads, archive_check, hash_order, read_manifest, save_manifest, up_to_date


def _positions(path: Path) -> pd.DataFrame:
    """time, position (1 = downbeat) from a `time,bar.beat` annotation file."""
    rows = []
    with open(path, newline="") as handle:
        for line in csv.reader(handle):
            if len(line) >= 2 and line[0].strip():
                rows.append((float(line[0]), int(line[1].strip().split(".")[1])))
    if not rows:
        raise DownloadError(f"{path}: no `time,bar.beat` rows; not a Candombe annotation file")
    return pd.DataFrame(rows, columns=["time", "position"])


def download_candombe(dl: Downloads, recordings: int) -> dict:
    """The annotations, and `recordings` performances with their annotations, into the cache; the manifest."""
    root, request = dl.folder("candombe"), {"recordings": recordings}
    if (manifest := up_to_date(root, request)) is not None:
        return manifest
    spent, files, checks = dl.ledger.spent, dl.files("candombe"), {}
    remote = files["candombe_annotations.zip"]
    with dl.open_zip(remote, root) as (zf, raw):
        members = [info for info in zf.infolist() if info.filename.lower().endswith(".csv")]
        annotations = dl.extract(zf, members, root, remote, raw)
        checks[remote.name] = archive_check(remote, raw)
    by_name = {PurePosixPath(name).stem: name for name in annotations}
    remote = files["candombe_audio.zip"]
    with dl.open_zip(remote, root) as (zf, raw):
        audio = {PurePosixPath(info.filename).stem: info for info in zf.infolist()
                 if info.filename.lower().endswith(".flac") and PurePosixPath(info.filename).stem in by_name}
        if not audio:
            raise DownloadError(f"{remote.name} holds no FLAC file named like an annotation: not the Candombe archive")
        chosen = hash_order(audio)[:recordings]
        taken = dl.extract(zf, [audio[name] for name in chosen], root, remote, raw)
        checks[remote.name] = archive_check(remote, raw)
    converted = []
    for name in chosen:
        target = root / "beats" / f"{name}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            _positions(root / by_name[name]).to_csv(tmp, index=False)
        converted.append(str(target.relative_to(root)))
    return save_manifest(root, "candombe", request, [], {"recordings": taken}, {}, checks,
                          dl.ledger.spent - spent, [], annotations=converted)


def load_candombe(root: str | Path) -> pd.DataFrame:
    """The downloaded performances as a table notebook 09 reads: sample_key, path, beats_path, split `real`."""
    root = Path(root)
    manifest = read_manifest(root, "candombe")
    audio = sorted(manifest["clips"]["recordings"], key=lambda p: PurePosixPath(p).stem)
    return pd.DataFrame({"sample_key": [PurePosixPath(p).stem for p in audio],
                         "path": [str(root / p) for p in audio],
                         "beats_path": [str(root / "beats" / f"{PurePosixPath(p).stem}.csv") for p in audio],
                         "split": "real"})
