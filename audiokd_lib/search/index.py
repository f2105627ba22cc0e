"""A FAISS catalogue of segment embeddings, searched with pseudo-relevance feedback and MMR (notebook 10
and `audiokd index` / `audiokd search`).

FAISS (Meta's similarity-search library) does what a search engine needs and a numpy dot product does
not: indexes that stay fast past a million items (inverted lists, HNSW graphs), batched building, and
one file format. An index is a folder:

- `index.faiss`: the FAISS index (inner product: the embeddings have unit length, so it is cosine);
- `vectors.npy`: the same vectors, for feedback and re-ranking (an IVF or HNSW index cannot give them back);
- `items.csv`: one row per vector: the file and the segment's start;
- `identity.json`: the model that made the vectors (path, sha256, spec). A query embedded by any other
  model is meaningless against these vectors, so :func:`SearchIndex.load` refuses it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from audiokd_lib.core.files import atomic_folder, cached, write_csv, write_json
from audiokd_lib.core.params import Params, SearchIndexParams
from audiokd_lib.core.tracking import settings_key
from audiokd_lib.search.metrics import expand_query, mmr_order

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aif", ".aiff", ".opus")


class IndexMismatch(ValueError):
    """The index was built by another model (or with other features) than the one asked to query it."""


def make_faiss(kind: str, dim: int, size: int, ip: SearchIndexParams) -> faiss.Index:
    """An empty inner-product index: `flat` (exact), `ivf` (inverted lists, trained by k-means) or `hnsw`."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        cells = max(1, min(ip.nlist, size // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = ip.nprobe
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, ip.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ip.ef_search
        return index
    raise ValueError(f"unknown index kind {kind!r}: flat, ivf or hnsw")


def fill(index: faiss.Index, vectors: np.ndarray, batch: int = 8192, progress: bool = True) -> faiss.Index:
    """Train the index if it needs it, then add `vectors` in batches (with a progress bar)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        index.train(vectors)
    for start in tqdm(range(0, len(vectors), batch), desc="indexing", disable=not progress or len(vectors) <= batch):
        index.add(vectors[start:start + batch])
    return index


@dataclass
class SearchIndex:
    index: faiss.Index
    vectors: np.ndarray
    items: pd.DataFrame
    identity: dict[str, Any]

    @classmethod
    def build(cls, vectors: np.ndarray, items: pd.DataFrame, identity: dict[str, Any], kind: str = "flat",
              ip: SearchIndexParams | None = None, progress: bool = True) -> SearchIndex:
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} vectors but {len(items)} item rows")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = fill(make_faiss(kind, vectors.shape[1], len(vectors), ip or SearchIndexParams()), vectors,
                     progress=progress)
        return cls(index, vectors, items.reset_index(drop=True), identity)

    def save(self, folder: str | Path) -> Path:
        """Write the index folder as a whole: into a temporary folder beside it, then renamed (an existing
        folder is replaced only once the new one is complete; the caller decides whether it may be)."""
        with atomic_folder(folder) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "vectors.npy", self.vectors)
            write_csv(tmp / "items.csv", self.items)
            write_json(tmp / "identity.json", self.identity)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, expected: dict[str, Any] | None = None) -> SearchIndex:
        """Read an index folder; with `expected` (the querying model's :func:`~audiokd_lib.search.model.identity`),
        refuse an index whose vectors another model made."""
        folder = Path(folder)
        files = ("index.faiss", "vectors.npy", "items.csv", "identity.json")
        missing = [n for n in files if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: not a search index (missing {', '.join(missing)}); "
                                    "build one with `audiokd index DIR... --out INDEX`")
        index = cls(faiss.read_index(str(folder / "index.faiss")), np.load(folder / "vectors.npy"),
                    pd.read_csv(folder / "items.csv"), json.loads((folder / "identity.json").read_text()))
        if expected is not None:
            index.check(expected, folder)
        return index

    def check(self, expected: dict[str, Any], where: str | Path = "the index") -> None:
        """Refuse a querying model (its :func:`~audiokd_lib.search.model.identity`) other than the one that
        made the vectors."""
        if self.identity.get("sha256") != expected.get("sha256"):
            raise IndexMismatch(
                f"{where} was built with the model {self.identity.get('model')} "
                f"(sha256 {str(self.identity.get('sha256'))[:12]}), "
                f"not {expected.get('model')} (sha256 {str(expected.get('sha256'))[:12]}): embeddings of two models "
                "cannot be compared. Query it with the model it records, or rebuild it with `audiokd index`.")

    def search(self, query: np.ndarray, top: int = 10, prf_k: int = 0, mmr_lambda: float | None = None,
               pool: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item ids) of the `top` results of one unit-length query vector.

        `prf_k` > 0: pseudo-relevance feedback, the query and its first `prf_k` results averaged and
        searched again. `mmr_lambda`: the results re-ranked by MMR from the `pool` nearest.
        """
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        wanted = min(len(self.vectors), max(top, pool if mmr_lambda is not None else top, prf_k))
        _, ids = self.index.search(query, wanted)
        if prf_k:
            query = expand_query(query[0], self.vectors[ids[0][ids[0] >= 0][:prf_k]]).reshape(1, -1)
            _, ids = self.index.search(query, wanted)
        ids = ids[0][ids[0] >= 0]
        if mmr_lambda is not None:
            ids = mmr_order(query[0], self.vectors[ids], mmr_lambda, top, ids)
        ids = ids[:top]
        return self.vectors[ids] @ query[0], ids


def synthetic_catalogue(size: int, dim: int, rng: np.random.Generator, clusters: int = 1000) -> np.ndarray:
    """Unit vectors around random centres (as embeddings of many pieces are): the benchmark's catalogue."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(clusters, size=size)] + 0.5 * rng.standard_normal((size, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def benchmark(ip: SearchIndexParams, dim: int, seed: int = 0, kinds: tuple[str, ...] = ("flat", "ivf", "hnsw"),
              top: int = 10, progress: bool = True) -> pd.DataFrame:
    """Exact against approximate indexes as the catalogue grows, on one thread: build seconds, median ms
    for one query, and recall@top of the exact top results. One row per (size, kind)."""
    rng = np.random.default_rng(seed)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    rows = []
    try:
        for size in ip.sizes:
            vectors = synthetic_catalogue(size, dim, rng)
            queries = vectors[rng.integers(size, size=ip.queries)] + 0.3 * rng.standard_normal(
                (ip.queries, dim)).astype(np.float32) / np.sqrt(dim)
            queries = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), np.float32)
            truth = None
            for kind in tqdm(kinds, desc=f"{size:,} vectors", disable=not progress, leave=False):
                started = time.perf_counter()
                index = fill(make_faiss(kind, dim, size, ip), vectors, progress=False)
                built = time.perf_counter() - started
                found, took = [], []
                for q in queries:
                    started = time.perf_counter()
                    found.append(index.search(q[None], top)[1][0])
                    took.append(time.perf_counter() - started)
                found = np.stack(found)
                truth = found if kind == "flat" else truth
                recall = (np.mean([len(set(f) & set(t)) / top for f, t in zip(found, truth)])
                          if truth is not None else np.nan)
                rows.append({"size": size, "index": kind, "build s": built, "ms per query": 1000 * np.median(took),
                             f"recall@{top} of exact": recall})
    finally:
        faiss.omp_set_num_threads(threads)
    return pd.DataFrame(rows)


def scaling_benchmark(params: Params) -> pd.DataFrame:
    """:func:`benchmark` of the profile's `search.index` settings at its embedding size, kept in
    `outputs/<profile>/search/index-bench.pkl` with the key of those settings and the seed: measured again
    only when they change."""
    ip, dim, seed = params.search.index, params.search.embedding_dim, params.seed
    key = settings_key({"index": ip.model_dump(), "dim": dim, "seed": seed})
    return cached(params.output_dir / "search" / "index-bench.pkl", key, lambda: benchmark(ip, dim, seed=seed))


def audio_files(paths: list[str | Path]) -> list[Path]:
    """Audio files among `paths`: files as given, folders searched recursively (sorted)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found
