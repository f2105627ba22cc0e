"""Command line (also `python -m audiokd_lib ...`).

  audiokd run --params params/quick.yaml [--from 03]          run a profile's notebooks with papermill
  audiokd classify FILE... --model MODEL [--profile quick]    top classes of any audio file
  audiokd bench [--models MODEL...] [--profile quick]         latency, throughput, memory of models side by side
"""

from __future__ import annotations

import argparse
import json
import sys

from .params import ParamsError
from .runner import NotebookFailed, run_notebooks


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="audiokd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks of a profile with papermill")
    run.add_argument("--params", default="params/quick.yaml", help="profile file (default: %(default)s)")
    run.add_argument("--from", dest="start", metavar="NOTEBOOK",
                     help="resume from this notebook (e.g. 02_features or 02)")
    classify = commands.add_parser("classify", help="print the top classes of audio files")
    classify.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, mp3, ...)")
    classify.add_argument("--model", required=True,
                          help="a model.pt checkpoint, or a role (teacher, student-baseline, student-kd) "
                               "with --profile")
    classify.add_argument("--profile", help="profile whose newest run of that role to use, e.g. quick")
    classify.add_argument("--top", type=int, default=3, help="classes to show (default: %(default)s)")
    classify.add_argument("--json", action="store_true", help="print one JSON object per file")
    bench = commands.add_parser("bench", help="measure several models side by side on this machine")
    bench.add_argument("--models", nargs="+", metavar="MODEL",
                       help="model.pt checkpoints, or roles with --profile; ratios are to the first "
                            "(default: teacher student-baseline student-kd)")
    bench.add_argument("--profile", help="profile whose newest runs the roles name, and whose first test clip "
                                         "the models read (else synthetic noise), e.g. quick")
    bench.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    bench.add_argument("--batch", type=int, default=32, help="batch of the throughput figures (default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=30, help="timed runs per figure (default: %(default)s)")
    bench.add_argument("--csv", metavar="PATH", help="also write the table to this CSV file")
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            run_notebooks(args.params, start=args.start)
            _print_table(args.params)
        elif args.command == "classify":
            return _classify(args)
        elif args.command == "bench":
            _bench(args)
    except (ParamsError, NotebookFailed, ValueError, FileNotFoundError, LookupError) as err:
        print(f"audiokd: {err}", file=sys.stderr)
        return 1
    return 0


def _print_table(params_file: str) -> None:
    """After a run, the table the notebooks built, read back from the profile's MLflow store."""
    import pandas as pd

    from .params import load_params
    from .runs import results_table

    table = results_table(load_params(params_file))
    if len(table):
        with pd.option_context("display.width", 250, "display.max_columns", None, "display.precision", 3):
            print(f"\nmodels in the MLflow store (newest run per model):\n{table.drop(columns=['role'])}")


def _classify(args: argparse.Namespace) -> int:
    """Classify each file; unreadable files are reported and make the exit status 1, silent ones do not."""
    from .audio import AudioLoadError
    from .classify import classify_file, load_model

    model = load_model(args.model, args.profile)
    failed = 0
    for path in args.files:
        try:
            prediction = classify_file(model, path, args.top)
        except AudioLoadError as err:
            failed += 1
            if args.json:
                print(json.dumps({"file": path, "status": "error", "error": str(err)}))
            print(f"audiokd: {err}", file=sys.stderr)
            continue
        print(json.dumps(prediction.as_dict()) if args.json else prediction.describe())
    return 1 if failed else 0


def _bench(args: argparse.Namespace) -> None:
    """Measure the models, print the comparison, and write it as CSV when asked."""
    from .bench import DEFAULT_MODELS, bench, describe
    from .files import write_csv

    table, source = bench(args.models or DEFAULT_MODELS, args.profile, batch=args.batch, threads=args.threads,
                          repeats=args.repeats)
    print(describe(table, source))
    if args.csv:
        print(f"wrote {write_csv(args.csv, table.assign(input=source))}")
