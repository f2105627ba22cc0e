"""Retrieval scores: recall@k and mean average precision of rankings, with optional query-time re-ranking.

recall@k here is the share of queries with at least one relevant item among their first k results (the
"recall@K" of the metric-learning literature, e.g. Musgrave et al. 2020); mAP averages scikit-learn's
average precision of each query's ranking over the whole catalogue.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import average_precision_score

# A re-ranker: (query vector, catalogue vectors, exact order of the catalogue) -> new order.
Reranker = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def retrieval_scores(queries: np.ndarray, query_groups: np.ndarray, catalogue: np.ndarray,
                     catalogue_groups: np.ndarray, ks: tuple[int, ...] = (1, 5, 10), exclude_self: bool = False,
                     rerank: Reranker | None = None) -> dict[str, float]:
    """{recall@k..., mAP, distinct@K} of every query against the catalogue by inner product (exact).

    Relevant: catalogue items of the query's group. `exclude_self`: queries are the catalogue (same
    order) and an item never retrieves itself. `rerank` reorders each query's ranking (PRF, MMR).
    distinct@K: different groups among the first K = max(ks) results (what MMR raises). Queries
    without a relevant item are left out.
    """
    sims = queries @ catalogue.T
    relevant = query_groups[:, None] == catalogue_groups[None, :]
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
        np.fill_diagonal(relevant, False)
    order = np.argsort(-sims, axis=1, kind="stable")
    if rerank is not None:
        keep = np.ones(catalogue.shape[0], bool)
        orders = []
        for i, q in enumerate(queries):
            if exclude_self:
                keep[:] = True
                keep[i] = False
            orders.append(rerank(q, catalogue, order[i][keep[order[i]]]))
        if exclude_self:  # the query's own item goes last, where it cannot count
            orders = [np.append(o, i) for i, o in enumerate(orders)]
        order = np.stack(orders)
    has = relevant.any(axis=1)
    hits = np.take_along_axis(relevant, order, axis=1)[has]
    top = max(ks)
    out = {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
    rank_score = -np.argsort(order, axis=1)[has].astype(float)  # higher for earlier results
    out["mAP"] = float(np.mean([average_precision_score(r, s) for r, s in zip(relevant[has], rank_score)]))
    out[f"distinct@{top}"] = float(np.mean([len(set(catalogue_groups[o[:top]])) for o in order[has]]))
    return out


def expand_query(query: np.ndarray, results: np.ndarray) -> np.ndarray:
    """Pseudo-relevance feedback's new query: the query and its first results (rows) averaged, re-normalised
    (Rocchio's formula with every weight equal)."""
    expanded = query + results.sum(axis=0)
    return (expanded / max(float(np.linalg.norm(expanded)), 1e-12)).astype(np.float32)


def prf(k: int) -> Reranker:
    """Pseudo-relevance feedback: the query expanded by its k first results, and the catalogue searched again."""

    def rerank(query: np.ndarray, catalogue: np.ndarray, order: np.ndarray) -> np.ndarray:
        sims = catalogue[order] @ expand_query(query, catalogue[order[:k]])
        return order[np.argsort(-sims, kind="stable")]

    return rerank


def mmr(lam: float, top: int = 10, pool: int = 50) -> Reranker:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): the first `top` results chosen one by one
    from the `pool` nearest, each maximising lam x similarity to the query - (1 - lam) x its largest
    similarity to a result already chosen; the rest keep their order."""

    def rerank(query: np.ndarray, catalogue: np.ndarray, order: np.ndarray) -> np.ndarray:
        return mmr_order(query, catalogue[order[:pool]], lam, top, order)

    return rerank


def mmr_order(query: np.ndarray, candidates: np.ndarray, lam: float, top: int, ids: np.ndarray) -> np.ndarray:
    """`ids` (whose first len(candidates) rows are `candidates`) reordered by MMR for the first `top`."""
    relevance = candidates @ query
    chosen: list[int] = []
    redundancy = np.full(len(candidates), -np.inf)
    for _ in range(min(top, len(candidates))):
        score = lam * relevance - (1 - lam) * np.where(np.isinf(redundancy), 0.0, redundancy)
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        chosen.append(best)
        redundancy = np.maximum(redundancy, candidates @ candidates[best])
    picked = set(chosen)
    rest = [i for i in range(len(ids)) if i not in picked]
    return ids[np.array(chosen + rest, dtype=int)]
