"""The notebooks: .py/.ipynb pairs in sync and clean, and every notebook running under papermill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest
import soundfile as sf
from conftest import ROOT, write_profile

from audiokd_lib.core.params import load_params
from audiokd_lib.data import real_eval
from audiokd_lib.experiment import report, results, runs
from audiokd_lib.experiment.pipeline import notebook_names, run_notebooks
from audiokd_lib.models import checkpoints

NOTEBOOKS = ROOT / "notebooks"


def cell_sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("name", sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py")))
def test_pair_in_sync_and_without_outputs(name):
    ipynb = NOTEBOOKS / f"{name}.ipynb"
    assert ipynb.exists(), f"{ipynb} missing: run `make notebooks` (jupytext) to pair {name}.py"
    from_py = jupytext.read(NOTEBOOKS / f"{name}.py")
    paired = nbformat.read(ipynb, as_version=4)
    assert cell_sources(paired) == cell_sources(from_py), f"{name}: .ipynb differs from .py; run `make notebooks`"
    raw = json.loads(ipynb.read_text())
    assert not any(cell.get("outputs") for cell in raw["cells"]), f"{ipynb} carries outputs"
    assert any("parameters" in cell.metadata.get("tags", []) for cell in paired.cells), "no `parameters` cell"


def test_every_notebook_runs_with_the_smoke_profile(smoke_chain):
    """One papermill run of the whole chain, as CI's smoke profile does it, and what it must leave behind."""
    smoke_profile, executed = smoke_chain
    assert [r.name for r in executed] == notebook_names()
    params = load_params(smoke_profile)
    outputs = params.output_dir
    assert set(pd.read_csv(outputs / "data" / "clips.csv")["split"]) == {"train", "val", "test", "heldout", "transfer"}
    assert json.loads((outputs / "features" / "norm_stats.json").read_text())["clips"] > 0
    assert len(list((outputs / "figures").glob("*.png"))) >= 4
    check_results_table(params, pd.read_csv(outputs / "results.csv"))
    check_separated_stems(params, outputs / "separated")
    if os.environ.get(real_eval.ENV):  # 08 scored both detectors on the real solos
        detectors = results.results_table(params, ["detector"])
        assert len(detectors) == 2 and detectors["real recall"].between(0, 1).all()
    check_kd_sweep(smoke_profile)
    check_real_ablation(smoke_profile)
    check_beats(params, smoke_profile)
    check_search(params, smoke_profile)


def _headless_chromium():
    """A WebDriver on headless Chromium (Debian's `chromium` and `chromium-driver`), or a skip saying what is missing."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(`make test` does as root: scripts/install-system-deps.sh --browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # A test machine has no sound card and no user to click play: muted playback, allowed without a gesture.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--mute-audio",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


# In the page: wait for every <audio> element's metadata, play the first for a moment, report what happened.
PLAY_EVERY_PLAYER = """
const done = arguments[arguments.length - 1];
const players = [...document.querySelectorAll('audio')];
const ready = a => a.readyState >= 1 ? Promise.resolve() : new Promise((ok, fail) => {
  a.addEventListener('loadedmetadata', ok, {once: true});
  a.addEventListener('error', () => fail(new Error('cannot load: code ' + (a.error && a.error.code))), {once: true});
});
Promise.all(players.map(ready)).then(async () => {
  if (!players.length) return done({count: 0});
  await players[0].play();
  await new Promise(wait => setTimeout(wait, 500));
  done({count: players.length, durations: players.map(a => a.duration), played: players[0].currentTime,
        paused: players[0].paused});
}).catch(err => done({error: String(err)}));
"""


def test_the_report_plays_the_listening_player_in_a_browser(smoke_chain):
    """`make report`'s page of notebook 08 in headless Chromium, served from 127.0.0.1: it loads with no
    console error (nothing fetched from the internet), and its audio players load and play."""
    import functools
    import http.server
    import threading

    from audiokd_lib.experiment.pipeline import write_report

    profile, _ = smoke_chain
    pages = write_report(load_params(profile))
    folder = pages[0].parent
    assert [p.name for p in pages] == [f"{name}.html" for name in notebook_names()]
    driver = _headless_chromium()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        driver.set_script_timeout(60)
        driver.get(f"http://127.0.0.1:{server.server_port}/08_separation.html")
        heard = driver.execute_async_script(PLAY_EVERY_PLAYER)
        errors = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        driver.quit()
        server.shutdown()
    assert not errors, errors
    assert "error" not in heard, heard
    # 08 draws the first piece's table: the mixture, and each chosen stem beside its true group
    assert heard["count"] >= 1 and all(d > 0 for d in heard["durations"]), heard
    assert heard["played"] > 0 and not heard["paused"], heard


def check_kd_sweep(profile: Path) -> None:
    """scripts/kd_sweep.py on the data and teacher logits the chain left: one line per variant and seed."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "kd_sweep.py"), "--params", str(profile),
                           "--variants", "base", "kd+transfer:2:0.9"], capture_output=True, text=True, check=True)
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith(("base ", "kd+transfer"))]
    assert [line[0] for line in lines] == ["base", "kd+transfer:2:0.9"]
    assert all(0.0 <= float(score) <= 1.0 for line in lines for score in line[2:])


def check_beats(params, profile: Path) -> None:
    """Notebook 09 left its three models (MLflow runs with DBN scores, weights, the student's ONNX step);
    scripts/beats_ablation.py runs on its pieces: one JSON line per model."""
    from audiokd_lib.core import tracking

    beat_runs = tracking.runs_frame(params, "beats-student")
    assert sorted(beat_runs["model"]) == ["beats-student-kd", "beats-student-labels"]
    assert beat_runs["heldout_dbn_F"].between(0, 1).all() and beat_runs["test_dbn_downbeat_F"].between(0, 1).all()
    assert len(tracking.runs_frame(params, "beats-teacher")) == 1
    assert (params.output_dir / "models" / "beats-student-kd" / "step.onnx").is_file()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "beats_ablation.py"), str(profile), "--alphas", "0",
                           "0.5", "--seeds", "0"], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(line["model"], line["alpha"]) for line in lines] == [("teacher", None), ("student", 0.0), ("student", 0.5)]
    assert all(0.0 <= line["heldout downbeat F"] <= 1.0 for line in lines)


def check_search(params, profile: Path) -> None:
    """Notebook 10 left four embedding models in MLflow, the shipped student with its ONNX twin, and an index
    that the command line searches with that student: a catalogue segment finds its own recording first;
    scripts/search_ablation.py runs on its collection: one JSON line per model."""
    from audiokd_lib.core import tracking

    runs = tracking.runs_frame(params, "search-student")
    assert sorted(runs["model"]) == ["search-student-kd", "search-student-supcon", "search-student-triplet"]
    assert runs["twin_mAP"].between(0, 1).all() and runs["within_recall_at_5"].between(0, 1).all()
    assert len(tracking.runs_frame(params, "search-teacher")) == 1
    shipped = params.output_dir / "models" / "search-student"
    assert (shipped / "model.pt").is_file() and (shipped / "model.onnx").is_file()
    items = pd.read_csv(params.output_dir / "search" / "index" / "items.csv")
    query = items["path"].iloc[0]
    index = params.output_dir / "search" / "cli.index"
    for command in (["index", str(Path(query).parent), "--out", str(index), "--profile", str(profile)],
                    ["search", query, "--index", str(index), "--top", "3", "--json"]):
        done = subprocess.run([sys.executable, "-m", "audiokd_lib", *command], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["file"] == str(Path(query).resolve())
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "search_ablation.py"), str(profile), "--variants",
                           "none", "relational:0.5", "--seeds", "0"], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(line["model"], line["variant"]) for line in lines] == [("teacher", "-"), ("student", "none"),
                                                                    ("student", "relational:0.5")]
    assert all(0.0 <= line["twin_mAP"] <= 1.0 for line in lines)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "search_index_bench.py"), str(profile), "--set",
                           "search.index.ef_search=32"], capture_output=True, text=True, check=True)
    assert [line.split()[:2] for line in done.stdout.splitlines()[1:]] == [
        [str(size), kind] for size in params.search.index.sizes for kind in ("flat", "ivf", "hnsw")]


def check_real_ablation(profile: Path) -> None:
    """scripts/real_ablation.py on the chain's data: one JSON line of scores per variant."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_ablation.py"), "--profile", str(profile),
                           "student", "-", "eq,reverb"], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["variant"] for line in lines] == ["-", "eq,reverb"]
    assert all(0.0 <= line["heldout_macro_f1"] <= 1.0 for line in lines)
    if os.environ.get(real_eval.ENV):
        assert all(0.0 <= line["real_accuracy"] <= 1.0 for line in lines)


def check_results_table(params, table: pd.DataFrame) -> None:
    """Notebook 07's table: every role of the chain, scores that are scores, costs that shrink where they should."""
    assert set(table["role"]) == set(report.ROLES)
    by_role = {role: rows.reset_index(drop=True) for role, rows in table.groupby("role")}
    transfer = {"kd-cached+transfer"} if params.data.transfer_soundfonts else set()
    assert set(by_role["student-kd"]["variant"]) == {f"kd-{mode}" for mode in params.kd.modes} | transfer
    assert by_role["student-baseline"]["seeds"].tolist() == [len(params.train.seeds)]
    score = report.main_score(table)
    for column in (score, "test macro-F1"):
        assert table[column].between(0, 1).all(), column  # no NaN either
    if os.environ.get(real_eval.ENV):  # the recordings are at hand (CI): every classifier has its real scores
        for column in ("real acc", "real macro-F1"):
            assert table[column].between(0, 1).all(), column
    else:
        print("real columns not checked: set", real_eval.ENV, "to a folder of the real recordings")
    baseline, kd = by_role["student-baseline"].iloc[0], by_role["student-kd"].iloc[0]
    assert kd["MACs"] == baseline["MACs"] and kd["params"] == baseline["params"]  # same network, other loss
    assert by_role["teacher"]["MACs / teacher"].tolist() == [1.0]

    pruned = by_role["student-pruned"].set_index("pruning")  # the kind its checkpoint says
    assert set(pruned.index) == {"unstructured", "structured"}
    # Zeros still cost dense MACs; removed channels do not.
    assert pruned.loc["unstructured", "MACs"] == kd["MACs"]
    assert pruned.loc["unstructured", "non-zero params"] < (1 - params.prune.sparsity + 0.05) * kd["params"]
    # LAMP takes fewer of the convolutions' weights, which cost a MAC at every position: MACs fall less.
    assert pruned.loc["unstructured", "non-zero MACs"] < (1 - params.prune.sparsity / 3) * kd["MACs"]
    assert pruned.loc["structured", "MACs"] < 0.6 * kd["MACs"]
    for role, suffix in (("student-rekd", "re-KD"), ("student-finetuned", "labels")):
        expected = sorted(f"{variant} + {suffix}" for variant in by_role["student-pruned"]["variant"])
        assert sorted(by_role[role]["variant"]) == expected
        retrained = by_role[role].set_index("pruning")
        assert (retrained["MACs"] == pruned.loc[retrained.index, "MACs"]).all()  # re-training keeps the shape
    # The control: the structured architecture, re-initialised, distilled on the same budget.
    structured = pruned.loc["structured", "variant"]
    assert by_role["student-scratch"]["variant"].tolist() == [f"{structured}, from scratch + KD"]
    assert by_role["student-scratch"]["MACs"].tolist() == [pruned.loc["structured", "MACs"]]
    [control] = results.results_table(params, ["student-scratch"])["model"]
    assert "reinitialised" in checkpoints.load_checkpoint(runs.checkpoint_path(params, control)).spec["pruning"]
    final = report.final_student(params)  # chosen by what its checkpoint says, not by its name
    assert final["role"] == "student-rekd" and report.pruning_of(final) == {
        "kind": "structured", "ratio": params.prune.channel_ratio, "importance": params.prune.importance}


def check_separated_stems(params, separated: Path) -> None:
    """Notebook 08's folders: the chosen stems as readable WAV files, and a manifest that explains them."""
    folders = sorted(f for f in separated.iterdir() if f.is_dir() and not f.name.startswith("."))
    heldout = pd.read_csv(params.output_dir / "data" / "pieces.csv").query("split == 'heldout'")
    assert folders and {f.name for f in folders} <= set(heldout["sample_key"])
    threshold = params.separation.threshold
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["track"] == folder.name and manifest["threshold"] == threshold
        assert set(manifest["scores"]) == set(manifest["classifier"]["classes"])
        assert all(0 <= p <= 1 for p in manifest["scores"].values())
        stems, chosen = manifest["stems"], manifest["chosen"]
        assert set(manifest["reasons"]) == set(stems) and set(chosen) <= set(stems)
        heard = {manifest["mapping"].get(c) for c, p in manifest["scores"].items() if p >= threshold}
        assert set(chosen) == heard & set(stems), "a stem is handed over exactly when one of its instruments is heard"
        assert manifest["files"] == {stem: f"{stem}.wav" for stem in chosen}
        assert sorted(p.name for p in folder.glob("*.wav")) == sorted(manifest["files"].values())
        for name in manifest["files"].values():
            info = sf.info(folder / name)
            assert info.samplerate == manifest["sample_rate"] and info.frames > 0 and info.subtype == "FLOAT"


def openmic_archive(keys: list[str]) -> dict[str, bytes]:
    """openmic-2018-v1.0.0.tgz in the official layout: tones of one or two instruments a clip, partial labels."""
    import io

    import numpy as np
    from test_datasets import tar_gz

    pitch = {"piano": 262.0, "violin": 659.0, "voice": 392.0}
    answers, members = [], {}
    for i, key in enumerate(keys):
        playing = [["piano"], ["violin"], ["voice"], ["piano", "violin"]][i % 4]
        for name in pitch:  # every instrument answered except, in every third clip, the last one not playing
            silent = [n for n in pitch if n not in playing]
            if name in playing:
                answers.append((key, name, 0.9, 3))
            elif not (i % 3 == 0 and name == silent[-1]):
                answers.append((key, name, 0.1, 3))
        t = np.arange(16000) / 16000
        wave = sum(np.sin(2 * np.pi * pitch[n] * (1 + k) * t) / (1 + k) for n in playing for k in range(3))
        buffer = io.BytesIO()
        sf.write(buffer, (0.1 * wave).astype(np.float32), 16000, format="OGG", subtype="VORBIS")
        members[f"openmic-2018/audio/{key[:3]}/{key}.ogg"] = buffer.getvalue()
    labels = pd.DataFrame(answers, columns=["sample_key", "instrument", "relevance", "num_responses"])
    members["openmic-2018/openmic-2018-aggregated-labels.csv"] = labels.to_csv(index=False).encode()
    members["openmic-2018/partitions/split01_train.csv"] = "\n".join(keys[:-8]).encode() + b"\n"
    members["openmic-2018/partitions/split01_test.csv"] = "\n".join(keys[-8:]).encode() + b"\n"
    return {"openmic-2018-v1.0.0.tgz": tar_gz(members)}


@pytest.mark.slow
def test_the_multilabel_chain_runs_on_openmic(tmp_path, monkeypatch):
    """Notebooks 01-08 with data.dataset openmic: multi-label teacher and students, masked answers, the
    final student choosing stems. The archive is served from 127.0.0.1 at its official path."""
    import dataclasses
    import urllib.parse

    from conftest import FileServer, write_profile
    from test_datasets import publish

    from audiokd_lib.data import real, sources

    monkeypatch.setattr(sources, "SOURCES", {  # our archive is not the published one: trust the test record's md5
        name: dataclasses.replace(source, files=tuple(dataclasses.replace(f, md5=None) for f in source.files))
        for name, source in sources.SOURCES.items()})
    server = FileServer()
    keys = [f"{i:06d}_{1000 * i}" for i in range(48)]
    publish(server, "openmic", openmic_archive(keys))
    profile = write_profile(tmp_path, (
        f"extends: {ROOT / 'params' / 'smoke_openmic.yaml'}\noutputs: {tmp_path / 'outputs'}\n"
        f"data:\n  downloads: {{cache_dir: {tmp_path / 'cache'}, base_url: {server.base}}}\n"), "smoke_openmic")
    params = load_params(profile)
    try:  # the download, in this process (where the md5 is unpinned); notebook 01 then finds it in the cache
        real.prepare(params, progress=False)
    finally:
        server.stop()
    assert urllib.parse.urlsplit(sources.SOURCES["openmic"].files[0].url).path in {p for p, _ in server.requests}
    run_notebooks(profile, log=lambda *_: None)
    clips = pd.read_csv(params.output_dir / "data" / "clips.csv", keep_default_na=False)
    assert "labels_unknown" in clips and (clips["labels_unknown"] != "").any()
    table = pd.read_csv(params.output_dir / "results.csv")
    assert set(table["role"]) == set(report.ROLES) and report.main_score(table) == "test mAP"
    assert table["test mAP"].between(0, 1).all()
    final = report.final_student(params)
    student = checkpoints.load_checkpoint(runs.checkpoint_path(params, final["model"]))
    assert student.spec["multilabel"] and student.classes == ["piano", "violin", "voice"]
    check_separated_stems(params, params.output_dir / "separated")
    manifest = json.loads(next((params.output_dir / "separated").glob("*/manifest.json")).read_text())
    assert manifest["classifier"]["run_id"] == final["run_id"]  # the course's final student chose the stems


@pytest.mark.slow
def test_notebook_09_scores_real_annotated_recordings(tmp_path):
    """With beats.real_dataset: candombe, 09 downloads performances (served here from 127.0.0.1 in the
    official layout) under data.downloads' rules and scores every model on them as `real`."""
    from conftest import FileServer
    from test_datasets import candombe_files, publish

    from audiokd_lib.core import tracking
    from audiokd_lib.data import sources

    server = FileServer()
    try:
        # The record lists the md5 values the project pins; members are read by range and checked by CRC-32.
        publish(server, "candombe", candombe_files(2), md5={f.name: f.md5 for f in sources.SOURCES["candombe"].files})
        profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'out'}\n"
                                          "notebooks: [09_beats]\n"
                                          "beats: {real_dataset: candombe, real_recordings: 2}\n"
                                          f"data: {{downloads: {{cache_dir: {tmp_path / 'cache'}, "
                                          f"base_url: '{server.base}'}}}}\n", "beats-real")
        run_notebooks(profile, log=lambda *_: None)
    finally:
        server.stop()
    params = load_params(profile)
    scored = tracking.runs_frame(params, "beats-student")
    assert len(scored) == 2 and scored["real_dbn_F"].between(0, 1).all()
    assert tracking.runs_frame(params, "beats-teacher")["real_dbn_downbeat_F"].between(0, 1).all()
