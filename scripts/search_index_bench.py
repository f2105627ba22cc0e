"""Exact against approximate FAISS indexes as the catalogue grows, on one thread: notebook 10's benchmark alone.

    python scripts/search_index_bench.py full                      # 10^3 to 10^6 vectors (full.yaml)
    python scripts/search_index_bench.py full --set search.index.ef_search=256   # a setting changed

Prints one row per (catalogue size, index): build seconds, median ms for one query, and the share of
the exact top 10 the index returns, on synthetic clustered unit vectors of the profile's embedding size.
"""

from __future__ import annotations

import argparse

from audiokd_lib.core.params import profile_params
from audiokd_lib.search.index import benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="profile name or params file, e.g. full")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings changed as `audiokd run --set` takes them, e.g. search.index.ef_search=256")
    args = parser.parse_args()
    params = profile_params(args.profile, args.set)
    print(benchmark(params.search.index, params.search.embedding_dim, seed=params.seed).round(4).to_string(index=False))


if __name__ == "__main__":
    main()
