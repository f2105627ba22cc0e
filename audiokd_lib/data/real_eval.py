"""Real recordings for the `real` column of every table: a report, never training data.

The quick profile learns from notes rendered by soundfonts. How far that carries to microphones and
rooms is measured on a few real recordings of TinySOL instruments: single notes, one-second
excerpts of orchestral parts recorded alone, and solo phrases, listed in `real_eval.csv` (shipped
with the package) with their TinySOL class, their OpenMIC class where one exists, a public URL at a
fixed commit, their SHA-256 and licence. They are too few to tune on, and they are never trained
on, used to pick a checkpoint or to set a threshold.

:func:`prepare` finds each file in a folder you name (`data.real_eval.dir`, then $AUDIOKD_REAL_EVAL,
laid out as `audio/<file>`), then in the cache, and downloads what is missing into the cache
(through a .part file, SHA-256 checked, charged to the download budget). A file that cannot be had
is listed with the reason, and the tables say the real column is incomplete or missing; nothing
fails because of it.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
from pathlib import Path

import pandas as pd

from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.params import Params
from audiokd_lib.data.download import DownloadError, download, file_digest
from audiokd_lib.data.sources import Downloads

MANIFEST = Path(__file__).with_name("real_eval.csv")
ENV = "AUDIOKD_REAL_EVAL"  # a folder holding audio/<file> for every row of the manifest (CI: ../shared/real_eval)
TABLE = "real_eval.csv"    # the profile's table of what was found, under outputs/<profile>/data/


def manifest() -> pd.DataFrame:
    """The recordings: file, label (TinySOL class), openmic_class, seconds, sha256, url, licence, note."""
    return pd.read_csv(MANIFEST, keep_default_na=False)


def search_dirs(params: Params) -> list[Path]:
    """Folders searched before the cache: data.real_eval.dir, then $AUDIOKD_REAL_EVAL."""
    found = [params.data.real_eval.dir, os.environ.get(ENV)]
    return [Path(folder).expanduser() for folder in found if folder]


def _local(row: pd.Series, folders: list[Path]) -> tuple[Path | None, str | None]:
    """A verified copy of the recording in one of the folders (status "ok"); None with what was wrong with
    a copy found; (None, None) when there is none."""
    for folder in folders:
        path = folder / row["file"]
        if path.is_file():
            digest = file_digest(path)
            if digest == row["sha256"]:
                return path, "ok"
            return None, (f"{path} has SHA-256 {digest[:12]}..., expected {row['sha256'][:12]}...: another "
                          f"version; replace it with {row['url']} (it is left untouched)")
    return None, None


def prepare(params: Params, progress: bool = True) -> pd.DataFrame:
    """Find or download every recording; save and return the table with `path` and `status` columns.

    `status` is "ok" for a verified file, else the reason it is missing. Once one download fails for
    want of a network, the others are not attempted (offline, each would wait for its own timeout).
    """
    table = manifest()
    settings = params.data.real_eval
    downloads = Downloads.from_params(params.data.downloads, progress=progress)
    cache = downloads.folder("real_eval")
    folders = [*search_dirs(params), cache]
    paths, statuses, offline = [], [], None
    for _, row in table.iterrows():
        path, status = _local(row, folders)
        if status is None:
            if not settings.download:
                status = f"not found in {', '.join(map(str, folders))} and data.real_eval.download is false"
            elif offline is not None:
                status = f"not attempted: an earlier download failed ({offline})"
            else:
                try:
                    path = _download(downloads, row, cache / row["file"])
                    status = "ok"
                except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError,
                        DownloadError) as err:
                    status = f"download failed: {err}"
                    if not isinstance(err, urllib.error.HTTPError):
                        offline = str(err)
        paths.append("" if path is None else str(path))
        statuses.append(status)
    table.insert(1, "path", paths)
    table["status"] = statuses
    table["split"] = "real"
    with atomic_path(params.output_dir / "data" / TABLE) as tmp:
        table.to_csv(tmp, index=False)
    return table


def _download(downloads: Downloads, row: pd.Series, target: Path) -> Path:
    """Download one recording (on the mirror, if data.downloads.base_url names one) and check its SHA-256."""
    return download(downloads.url(row["url"]), target, sha256=row["sha256"], ledger=downloads.ledger,
                    progress=downloads.progress, timeout=downloads.timeout)


def load_table(params: Params) -> pd.DataFrame | None:
    """The recordings notebook 01 found (status "ok"), or None when it found none or was not run."""
    path = params.output_dir / "data" / TABLE
    if not params.data.real_eval.enabled or not path.is_file():
        return None
    table = pd.read_csv(path, keep_default_na=False)
    table = table[table["status"] == "ok"]
    return table if len(table) else None


def summary(table: pd.DataFrame) -> str:
    """What was found, per source licence, and why anything is missing."""
    ok = table["status"] == "ok"
    found = (f"{ok.sum()} of {len(table)} real recordings available, {table.loc[ok, 'label'].nunique()} "
             f"instruments, {table.loc[ok, 'seconds'].sum():.0f} s in all")
    lines = [found]
    for licence, rows in table[ok].groupby("licence"):
        lines.append(f"  {len(rows):2d}  {licence}")
    for status, rows in table[~ok].groupby("status", sort=False):
        lines.append(f"  missing {len(rows)} ({', '.join(rows['file'].head(3))}{', ...' * (len(rows) > 3)}): {status}")
    return "\n".join(lines)
