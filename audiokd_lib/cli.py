"""Command line: `audiokd run --params params/quick.yaml` (also `python -m audiokd_lib run ...`)."""

from __future__ import annotations

import argparse
import sys

from .params import ParamsError
from .runner import NotebookFailed, run_notebooks


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="audiokd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks of a profile with papermill")
    run.add_argument("--params", default="params/quick.yaml", help="profile file (default: %(default)s)")
    run.add_argument("--from", dest="start", metavar="NOTEBOOK", help="resume from this notebook (e.g. 02_features or 02)")
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            run_notebooks(args.params, start=args.start)
    except (ParamsError, NotebookFailed, ValueError) as err:
        print(f"audiokd: {err}", file=sys.stderr)
        return 1
    return 0
