"""One call for notebook 01: download a real dataset's subset (see :mod:`~audiokd_lib.data.sources`) and load its tables."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from audiokd_lib.core.params import Params, SubsetParams
from audiokd_lib.data.download import DownloadError, megabytes
from audiokd_lib.data.esc50 import download_esc50, load_esc50
from audiokd_lib.data.irmas import download_irmas, load_irmas
from audiokd_lib.data.openmic import download_openmic, load_openmic
from audiokd_lib.data.sources import Downloads
from audiokd_lib.data.tinysol import download_tinysol, load_tinysol

DOWNLOADERS: dict[str, Callable[[Downloads, SubsetParams], dict]] = {
    "tinysol": download_tinysol, "irmas": download_irmas, "openmic": download_openmic, "esc50": download_esc50,
}


def load_tables(dataset: str, root: str | Path) -> dict[str, pd.DataFrame]:
    """A downloaded subset's clip tables by name: "clips" (what notebooks 02-07 learn from) and others.

    The "clips" of TinySOL, IRMAS's training part and ESC-50 have one `label` a clip; OpenMIC's are
    multi-label (`labels`, and `labels_unknown` for the questions nobody answered).
    """
    if dataset == "tinysol":
        return {"clips": load_tinysol(root)}
    if dataset == "irmas":
        training, testing = load_irmas(root)
        return {"clips": training, "irmas_testing": testing}
    if dataset == "openmic":
        return {"clips": load_openmic(root)}
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
