"""Command line (also `python -m audiokd_lib ...`).

  audiokd run --params params/quick.yaml [--from 03]          run a profile's notebooks with papermill
              [--set kd.temperature=4 train.epochs=30]       ... with settings changed (a=1,2: one run each)
  audiokd mlflow [--profile quick] [--port 5000]              the MLflow UI on a profile's store (127.0.0.1)
  audiokd report [--profile quick]                            executed notebooks as HTML pages
  torchrun ... -m audiokd_lib fit JOB                         one process of a data-parallel run (torchrun starts it)
  audiokd classify FILE... --model MODEL [--profile quick]    top classes of any audio file
  audiokd bench [--models MODEL...] [--profile quick]         latency, throughput, memory of models side by side
  audiokd separate FILE... --out DIR [--model MODEL]          stems of the instruments a classifier hears
  audiokd beats FILE... --out DIR [--clicks]                  beats and downbeats as CSV (and clicks over the music)
  audiokd index DIR... --out INDEX [--kind flat|ivf|hnsw]     a similarity-search index of audio files (notebook 10)
  audiokd search FILE --index INDEX [--top 10] [--prf] [--mmr L]   the indexed recordings most like FILE
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from audiokd_lib.core.params import ParamsError
from audiokd_lib.experiment.pipeline import NotebookFailed, run_notebooks


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="audiokd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks of a profile with papermill")
    run.add_argument("--params", default="params/quick.yaml", help="profile file (default: %(default)s)")
    run.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                     help="change settings without editing the file, in Hydra's override grammar, e.g. "
                          "kd.temperature=4 train.epochs=30; KEY=a,b,c runs one profile per value (a sweep)")
    run.add_argument("--from", dest="start", metavar="NOTEBOOK",
                     help="resume from this notebook (e.g. 02_features or 02)")
    report = commands.add_parser("report", help="every executed notebook of a profile as HTML (outputs/<profile>/report)")
    report.add_argument("--profile", default="quick", help="profile name or params file (default: %(default)s)")
    ui = commands.add_parser("mlflow", help="the MLflow UI on a profile's store, on this machine only")
    ui.add_argument("--profile", default="quick", help="profile name or params file (default: %(default)s)")
    ui.add_argument("--port", type=int, default=5000)
    fit = commands.add_parser("fit", help="one process of a run trained data-parallel: started by torchrun on "
                                          "a job file that training writes when distributed.processes > 1")
    fit.add_argument("job", metavar="JOB", help="the run's job.pt")
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
    separate = commands.add_parser("separate", help="separate audio files into stems; keep those of the "
                                                    "instruments a multi-label classifier hears")
    separate.add_argument("files", nargs="+", metavar="INPUT", help="audio files (wav, flac, ogg, mp3, ...)")
    separate.add_argument("--out", required=True, help="output folder: one sub-folder per input, named after it")
    separate.add_argument("--separator", help="demucs, crnn (the profile's trained CRNN) or a CRNN checkpoint "
                                              "(default: the profile's separation.separator)")
    separate.add_argument("--model", help="multi-label instrument classifier: a model.pt, or a role with --profile; "
                                          "without one, every stem is written")
    separate.add_argument("--profile", default="quick",
                          help="profile (name or .yaml) giving the separation settings (default: %(default)s)")
    separate.add_argument("--threshold", type=float, help="probability at which an instrument counts as heard "
                                                          "(default: the profile's separation.threshold)")
    separate.add_argument("--all-stems", action="store_true", help="write every stem; the manifest still says "
                                                                   "which instruments were heard")
    separate.add_argument("--overwrite", action="store_true", help="replace existing output folders of these inputs")
    beats = commands.add_parser("beats", help="beats and downbeats of audio files, by notebook 09's causal student")
    beats.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, mp3, ...)")
    beats.add_argument("--out", required=True, help="output folder: NAME.beats.csv (and NAME.clicks.wav) per input")
    beats.add_argument("--model", help="a beat model.pt (default: the profile's distilled student, "
                                       "outputs/<profile>/models/beats-student-kd/model.pt)")
    beats.add_argument("--profile", default="quick", help="profile (name or .yaml) giving the model and the "
                                                        "decoder's settings (default: %(default)s)")
    beats.add_argument("--clicks", action="store_true", help="also write the input with a click on every beat")
    beats.add_argument("--overwrite", action="store_true", help="replace existing outputs of these inputs")
    index = commands.add_parser("index", help="embed audio files segment by segment into a search index")
    index.add_argument("inputs", nargs="+", metavar="DIR", help="folders (searched recursively) or audio files")
    index.add_argument("--out", required=True, metavar="INDEX", help="the index folder to write")
    index.add_argument("--model", help="an embedding model.pt (default: the student notebook 10 ships, "
                                       "outputs/<profile>/models/search-student/model.pt)")
    index.add_argument("--profile", default="quick", help="profile (name or .yaml) giving the default model and "
                                                        "the approximate indexes' settings (default: %(default)s)")
    index.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                       help="flat: exact; ivf, hnsw: approximate, for large catalogues (default: %(default)s)")
    index.add_argument("--overwrite", action="store_true", help="replace an existing index folder")
    search = commands.add_parser("search", help="the indexed recordings that sound most like an audio file")
    search.add_argument("file", metavar="FILE", help="the query recording")
    search.add_argument("--index", required=True, help="an index folder written by `audiokd index`")
    search.add_argument("--model", help="the embedding model.pt (default: the one the index records)")
    search.add_argument("--top", type=int, default=10, help="recordings to list (default: %(default)s)")
    search.add_argument("--prf", nargs="?", type=int, const=3, default=0, metavar="K",
                        help="pseudo-relevance feedback: average the query with its first K results and search "
                             "again (K default 3)")
    search.add_argument("--mmr", type=float, metavar="LAMBDA",
                        help="re-rank for diversity by maximal marginal relevance (1: relevance only, 0: novelty only)")
    search.add_argument("--json", action="store_true", help="print the results as one JSON list")
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            _run(args)
        elif args.command == "report":
            from audiokd_lib.core.params import profile_params
            from audiokd_lib.experiment.pipeline import write_report

            for page in write_report(profile_params(args.profile)):
                print(page)
        elif args.command == "mlflow":
            return _mlflow_ui(args)
        elif args.command == "fit":
            from audiokd_lib.experiment.workers import fit_job_file

            fit_job_file(args.job)
        elif args.command == "classify":
            return _classify(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "separate":
            return _separate(args)
        elif args.command == "beats":
            return _beats(args)
        elif args.command == "index":
            return _index(args)
        elif args.command == "search":
            return _search(args)
    except (ParamsError, NotebookFailed, ValueError, FileNotFoundError, LookupError) as err:
        print(f"audiokd: {err}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    """Run a profile, or with --set the profile changed on the command line: once, or once per swept value.

    Each changed profile's settings are saved as outputs/<profile>/params/<profile>.yaml, which the
    notebooks read and MLflow stores with every run. A sweep names each profile after its changes
    (quick-kd.temperature=2) so their outputs never mix, and ends with their tables side by side.
    """
    from audiokd_lib.core.params import expand_sweeps, load_params, write_effective
    from audiokd_lib.experiment.report import compare_profiles

    if not args.overrides:
        run_notebooks(args.params, start=args.start)
        _print_table(args.params)
        return
    base = load_params(args.params)
    runs = expand_sweeps(args.overrides)
    effective = []
    for overrides in runs:
        name = f"{base.profile}-{'-'.join(overrides)}".replace("/", "_") if len(runs) > 1 else None
        params = load_params(args.params, overrides, profile=name)
        effective.append(write_effective(params, args.params, overrides))
        print(f"profile {params.profile}: {args.params} with {' '.join(overrides)}")
        run_notebooks(effective[-1], start=args.start)
    if len(runs) == 1:
        _print_table(str(effective[0]))
    else:
        import pandas as pd

        with pd.option_context("display.width", 250, "display.max_columns", None, "display.precision", 3):
            print(f"\nthe sweep side by side:\n{compare_profiles([load_params(f) for f in effective])}")


def _mlflow_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI for a profile's store on 127.0.0.1 (no one else on the network sees it)."""
    import subprocess

    from audiokd_lib.core import tracking
    from audiokd_lib.core.params import profile_params

    params = profile_params(args.profile)
    if not (params.output_dir / "mlflow.db").is_file():
        raise FileNotFoundError(f"{params.output_dir / 'mlflow.db'}: no MLflow store yet; run the profile first "
                                f"(make run PROFILE={params.profile})")
    print(f"MLflow UI for profile {params.profile}: http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking.tracking_uri(params),
               "--host", "127.0.0.1", "--port", str(args.port)]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def _print_table(params_file: str) -> None:
    """After a run, the table the notebooks built, read back from the profile's MLflow store."""
    import pandas as pd

    from audiokd_lib.core.params import load_params
    from audiokd_lib.experiment.results import results_table

    table = results_table(load_params(params_file))
    if len(table):
        with pd.option_context("display.width", 250, "display.max_columns", None, "display.precision", 3):
            print(f"\nmodels in the MLflow store (newest run per model):\n{table.drop(columns=['role'])}")


def _classify(args: argparse.Namespace) -> int:
    """Classify each file; unreadable files are reported and make the exit status 1, silent ones do not."""
    from audiokd_lib.audio.loading import AudioLoadError
    from audiokd_lib.classify import classify_file, load_model

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
    from audiokd_lib.compress.bench import DEFAULT_MODELS, bench, describe
    from audiokd_lib.core.files import write_csv

    table, source = bench(args.models or DEFAULT_MODELS, args.profile, batch=args.batch, threads=args.threads,
                          repeats=args.repeats)
    print(describe(table, source))
    if args.csv:
        print(f"wrote {write_csv(args.csv, table.assign(input=source))}")


def _separate(args: argparse.Namespace) -> int:
    """Separate each file and write the stems of the instruments heard; bad files are reported, exit status 1."""
    from pathlib import Path

    from audiokd_lib.audio.loading import AudioLoadError, load_audio
    from audiokd_lib.classify import SILENCE_DBFS, classify_file, load_model
    from audiokd_lib.core.params import profile_params
    from audiokd_lib.separation.separator import open_separator, separate
    from audiokd_lib.separation.stem_selection import select_stems, write_selection

    params = profile_params(args.profile)
    sp = params.separation
    threshold = sp.threshold if args.threshold is None else args.threshold
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must lie between 0 and 1, got {threshold}")
    out = Path(args.out)
    tracks = _output_names(args.files, lambda track: out / track, args.overwrite)
    choice = args.separator or sp.separator
    separator = open_separator(choice, params)
    classifier = None
    if args.model:
        classifier = load_model(args.model, args.profile)
        if not classifier.spec["multilabel"]:
            raise ValueError(f"{args.model} is a single-label classifier (one instrument per file); choosing stems "
                             "needs a multi-label one (several instruments at once), or leave out --model")
    failed = 0
    for path, track in zip(args.files, tracks):
        try:
            wave = load_audio(path, separator.samplerate, mono=False)
        except AudioLoadError as err:
            failed += 1
            print(f"audiokd: {err}", file=sys.stderr)
            continue
        seconds = wave.shape[-1] / separator.samplerate
        if float(wave.abs().max()) < 10 ** (SILENCE_DBFS / 20):
            print(f"{path}: silent (peak below {SILENCE_DBFS:g} dBFS), nothing to separate; nothing written")
            continue
        separation = separate(separator, wave, separator.samplerate, sp.segment_seconds, sp.overlap,
                              progress=seconds > 60)
        scores = None
        if classifier is not None:
            prediction = classify_file(classifier, path, top_k=len(classifier.classes))
            scores = dict(prediction.top)
        selection = select_stems(scores, threshold, separator.sources, all_stems=args.all_stems)
        info = {"input": str(Path(path).resolve()), "seconds": round(seconds, 3),
                "separator": {"choice": choice, "class": type(separator).__name__},
                "segment_seconds": sp.segment_seconds, "overlap": sp.overlap,
                "classifier": None if classifier is None else {"model": args.model, "classes": classifier.classes}}
        folder = write_selection(out, track, separation, selection, info, overwrite=args.overwrite)
        written = ", ".join(selection.chosen) if selection.chosen else f"no stems (nothing reached {threshold:g})"
        print(f"{path}: {written} -> {folder}")
    return 1 if failed else 0


def _output_names(files: list[str], output_of, overwrite: bool) -> list[str]:
    """Each input's name (its file name without suffix), after refusing names two inputs share (their outputs
    would collide) and, without `overwrite`, outputs (`output_of(name)`) that exist already."""
    from pathlib import Path

    names = [Path(f).stem for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"several inputs are named {repeated}: their outputs would collide; rename them "
                         "or run them in separate calls")
    existing = [str(output_of(n)) for n in names if output_of(n).exists()]
    if existing and not overwrite:
        raise ValueError(f"outputs exist already: {existing}; pass --overwrite to replace them or choose "
                         "another --out")
    return names


def _beats(args: argparse.Namespace) -> int:
    """Track each file's beats and downbeats (the DBN on the whole file); unreadable files are reported and
    make the exit status 1; existing outputs are never replaced without --overwrite."""
    from pathlib import Path

    from audiokd_lib.audio.loading import AudioLoadError
    from audiokd_lib.beats import decode
    from audiokd_lib.beats import model as beatnet
    from audiokd_lib.beats.track import track_file, write_beats
    from audiokd_lib.core.params import profile_params

    params = profile_params(args.profile)
    model = beatnet.load(args.model or params.output_dir / "models" / "beats-student-kd" / "model.pt")
    dbn = decode.dbn_for(params.beats, model.frontend.fps)
    out = Path(args.out)
    names = _output_names(args.files, lambda name: out / f"{name}.beats.csv", args.overwrite)
    failed = 0
    for path, name in zip(args.files, names):
        try:
            wave, beats, downbeats = track_file(model, path, dbn, params.beats.bar_lengths)
        except AudioLoadError as err:
            failed += 1
            print(f"audiokd: {err}", file=sys.stderr)
            continue
        written = write_beats(out, name, beats, downbeats, wave if args.clicks else None, model.frontend.sample_rate)
        tempo = f", about {60 / float(np.median(np.diff(beats))):.0f} BPM" if len(beats) > 1 else ""
        print(f"{path}: {len(beats)} beats, {len(downbeats)} downbeats{tempo} -> {', '.join(map(str, written))}")
    return 1 if failed else 0


def _index(args: argparse.Namespace) -> int:
    """Embed every audio file under the inputs into a new index; unreadable files are reported, skipped and
    make the exit status 1; an existing index is replaced only with --overwrite."""
    from pathlib import Path

    import pandas as pd
    from tqdm.auto import tqdm

    from audiokd_lib.audio.loading import AudioLoadError
    from audiokd_lib.core.params import profile_params
    from audiokd_lib.search.export import embed_file, runtime
    from audiokd_lib.search.index import SearchIndex, audio_files
    from audiokd_lib.search.model import identity

    params = profile_params(args.profile)
    model_path = Path(args.model or params.output_dir / "models" / "search-student" / "model.pt")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists already; pass --overwrite to replace it or choose another --out")
    embedder, files = runtime(model_path), audio_files(args.inputs)
    if not files:
        raise ValueError(f"no audio files ({', '.join(('wav', 'flac', 'ogg', 'mp3', '...'))}) under {args.inputs}")
    vectors, rows, failed = [], [], 0
    for path in tqdm(files, desc="embedding", disable=len(files) < 5):
        try:
            found, starts = embed_file(embedder, path)
        except AudioLoadError as err:
            failed += 1
            print(f"audiokd: {err} (skipped)", file=sys.stderr)
            continue
        vectors.append(found)
        rows += [{"file": str(path.resolve()), "start": round(start, 3)} for start in starts]
    if not rows:
        raise ValueError("none of the inputs could be read; nothing indexed")
    built = SearchIndex.build(np.concatenate(vectors), pd.DataFrame(rows), identity(model_path, embedder.spec),
                              args.kind, params.search.index)
    built.save(out)
    print(f"{len(files) - failed} files, {len(rows)} segments -> {out} ({args.kind}, model {model_path})")
    return 1 if failed else 0


def _search(args: argparse.Namespace) -> int:
    """Search each segment of FILE; list the indexed files by their best-matching segment."""
    from pathlib import Path

    from audiokd_lib.audio.loading import AudioLoadError
    from audiokd_lib.search.export import embed_file, runtime
    from audiokd_lib.search.index import SearchIndex
    from audiokd_lib.search.model import identity

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, not {args.top}")
    if args.mmr is not None and not 0 <= args.mmr <= 1:
        raise ValueError(f"--mmr must lie between 0 and 1, not {args.mmr}")
    index = SearchIndex.load(args.index)
    model_path = Path(args.model or index.identity.get("model", ""))
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: the index's model is not there; pass --model with the model.pt "
                                "that built it")
    embedder = runtime(model_path)
    index.check(identity(model_path, embedder.spec), args.index)
    try:
        queries, starts = embed_file(embedder, args.file)
    except AudioLoadError as err:
        raise ValueError(str(err)) from err
    best: dict[str, dict] = {}
    for query, start in zip(queries, starts):
        scores, ids = index.search(query, args.top * 4, prf_k=args.prf, mmr_lambda=args.mmr)
        for score, i in zip(scores, ids):
            item = index.items.iloc[int(i)]
            if item["file"] not in best or score > best[item["file"]]["score"]:
                best[item["file"]] = {"file": item["file"], "score": round(float(score), 4),
                                      "segment_start": float(item["start"]), "query_start": round(start, 3)}
    results = sorted(best.values(), key=lambda r: -r["score"])[:args.top]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for rank, r in enumerate(results, 1):
            print(f"{rank:3d}  {r['score']:.3f}  {r['file']}  (at {r['segment_start']:.1f} s; query at "
                  f"{r['query_start']:.1f} s)")
    return 0
