"""Real datasets against a loopback server: archives in the official layouts, built here from generated audio."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import ROOT, FileServer, write_profile

from audiokd_lib.core import losses, metrics
from audiokd_lib.core.params import IrmasSubsetParams, SubsetParams, load_params
from audiokd_lib.data import download, irmas, openmic, real, sources, tables, tinysol
from audiokd_lib.data.notes import TINYSOL_COLUMNS
from audiokd_lib.data.sources import Downloads

rng = np.random.default_rng(0)


def audio(seconds: float, channels: int = 1, rate: int = 44100, fmt: str = "WAV") -> bytes:
    """Noise (which barely compresses, like music) encoded as WAV (16-bit) or OGG."""
    frames = (0.1 * rng.standard_normal((round(seconds * rate), channels))).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, frames, rate, format=fmt, subtype="PCM_16" if fmt == "WAV" else "VORBIS")
    return buffer.getvalue()


def tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def zip_file(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buffer.getvalue()


def publish(server: FileServer, dataset: str, files: dict[str, bytes], md5: dict[str, str] | None = None) -> None:
    """Serve a dataset's files at their official paths, and its Zenodo record's listing at the API's path."""
    source = sources.SOURCES[dataset]
    for remote in source.files:
        server.files[urllib.parse.urlsplit(remote.url).path] = files[remote.name]
    if source.record:
        listing = [{"key": name, "size": len(body),
                    "checksum": "md5:" + (md5 or {}).get(name, hashlib.md5(body).hexdigest())}
                   for name, body in files.items()]
        server.files[f"/api/records/{source.record}"] = json.dumps({"files": listing}).encode()


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    yield srv
    srv.stop()


@pytest.fixture
def unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our test archives are not the published ones: trust the (test) record's md5 instead of the pinned values."""
    monkeypatch.setattr(sources, "SOURCES", {
        name: replace(source, files=tuple(replace(f, md5=None) for f in source.files))
        for name, source in sources.SOURCES.items()
    })


def downloads(tmp_path: Path, server: FileServer, budget: int = 10**9) -> Downloads:
    cache = tmp_path / "cache"
    return Downloads(cache, download.Ledger(cache / "ledger.json", budget), server.base, progress=False)


# --------------------------------------------------------------------------- TinySOL

TINYSOL_INSTRUMENTS = [("Winds", "Flute", "Fl", "Flute"), ("Strings", "Violin", "Vn", "Violin"),
                       ("Brass", "Bass_Tuba", "BTb", "Bass Tuba")]


def tinysol_files(notes: int = 8) -> dict[str, bytes]:
    """TinySOL_metadata.csv and TinySOL.tar.gz, instruments one after another in the archive as in the real one."""
    rows, members = [], {}
    for family, folder, abbr, full in TINYSOL_INSTRUMENTS:
        for i in range(notes):
            path = f"{family}/{folder}/ordinario/{abbr}-ord-C{i}-mf-N-N.wav"
            rows.append([path, i % 5, family, abbr, full, "ord", "ordinario", f"C{i}", 24 + 12 * i, "mf", 2, 0, "",
                         "FALSE"])
            members[f"TinySOL/{path}"] = audio(0.3)
    csv = pd.DataFrame(rows, columns=TINYSOL_COLUMNS).to_csv(index=False).encode()
    return {"TinySOL_metadata.csv": csv, "TinySOL.tar.gz": tar_gz(members)}


TINYSOL_ARCHIVE = "/records/3685367/files/TinySOL.tar.gz"


def test_tinysol_subset_stops_the_stream_early_and_is_cached(server, unpinned, tmp_path):
    files = tinysol_files()
    publish(server, "tinysol", files)
    dl = downloads(tmp_path, server)
    subset = SubsetParams(classes=["Fl", "Vn"], files_per_class=2)
    manifest = tinysol.download_tinysol(dl, subset)
    archive = manifest["archives"]["TinySOL.tar.gz"]
    assert archive["bytes_read"] < archive["size"] / 2 and "stopped" in archive["check"]  # no tuba was read
    assert dl.ledger.spent < archive["size"] / 2 + len(files["TinySOL_metadata.csv"]) + 1000
    table = tinysol.load_tinysol(dl.folder("tinysol"))
    assert table["label"].value_counts().to_dict() == {"Flute": 2, "Violin": 2}
    assert table["split"].tolist() == [tinysol.TINYSOL_FOLD_SPLITS[f] for f in table["fold"]]
    assert all(Path(p).is_file() for p in table["path"]) and set(table["source"]) == {"tinysol"}
    requests = len(server.requests)
    assert tinysol.download_tinysol(dl, subset) == manifest and len(server.requests) == requests  # no network


def test_tinysol_resumes_after_a_cut_connection_and_checks_the_md5(server, unpinned, tmp_path):
    files = tinysol_files()
    publish(server, "tinysol", files)
    dl = downloads(tmp_path, server)
    server.cut_after[TINYSOL_ARCHIVE] = 100_000
    with pytest.raises(download.DownloadError, match="run again to resume"):
        tinysol.download_tinysol(dl, SubsetParams())
    part = dl.folder("tinysol") / "TinySOL.tar.gz.part"
    assert part.stat().st_size == 100_000
    manifest = tinysol.download_tinysol(dl, SubsetParams())
    assert server.requests[-1] == (TINYSOL_ARCHIVE, "bytes=100000-")
    assert manifest["archives"]["TinySOL.tar.gz"]["check"] == "md5 of the whole archive"
    assert (dl.folder("tinysol") / "TinySOL.tar.gz").read_bytes() == files["TinySOL.tar.gz"] and not part.exists()
    assert len(tinysol.load_tinysol(dl.folder("tinysol"))) == 3 * 8
    paid = dl.ledger.spent - len(files["TinySOL_metadata.csv"]) - len(server.files["/api/records/3685367"]) * 2
    assert paid == len(files["TinySOL.tar.gz"])  # the first 100 kB were paid for once


def test_wrong_checksum_is_refused_and_nothing_kept(server, unpinned, tmp_path):
    publish(server, "tinysol", tinysol_files(), md5={"TinySOL_metadata.csv": "0" * 32})
    dl = downloads(tmp_path, server)
    with pytest.raises(download.ChecksumError, match="0{32}"):
        tinysol.download_tinysol(dl, SubsetParams())
    assert not list(dl.folder("tinysol").glob("TinySOL_metadata*"))


def test_record_disagreeing_with_the_pinned_md5_is_refused(server, tmp_path):
    publish(server, "tinysol", tinysol_files())  # our archive is not the published TinySOL
    with pytest.raises(download.ChecksumError, match="the record changed"):
        tinysol.download_tinysol(downloads(tmp_path, server), SubsetParams())
    assert [path for path, _ in server.requests] == ["/api/records/3685367"]


def test_budget_refuses_before_downloading(server, unpinned, tmp_path):
    files = tinysol_files()
    publish(server, "tinysol", files)
    dl = downloads(tmp_path, server, budget=len(files["TinySOL.tar.gz"]) // 2)
    with pytest.raises(download.BudgetExceeded, match="budget_bytes") as err:
        tinysol.download_tinysol(dl, SubsetParams())  # every note: the whole archive
    assert "all of TinySOL.tar.gz" in str(err.value) and TINYSOL_ARCHIVE not in server.sent


def test_budget_stops_a_stream_and_a_bigger_budget_resumes_it(server, unpinned, tmp_path):
    files = tinysol_files()
    publish(server, "tinysol", files)
    size = len(files["TinySOL.tar.gz"])
    subset = SubsetParams(classes=["BTb"], files_per_class=1)  # the tubas come last in the archive
    with pytest.raises(download.BudgetExceeded, match="reached the byte budget"):
        tinysol.download_tinysol(downloads(tmp_path, server, budget=size // 2), subset)
    kept = (tmp_path / "cache/tinysol/TinySOL.tar.gz.part").stat().st_size
    assert size // 3 < kept <= size // 2 + download.CHUNK
    manifest = tinysol.download_tinysol(downloads(tmp_path, server, budget=2 * size), subset)
    assert server.requests[-1] == (TINYSOL_ARCHIVE, f"bytes={kept}-")
    assert manifest["archives"]["TinySOL.tar.gz"]["bytes_read"] > kept and len(manifest["clips"]["clips"]) == 1


# --------------------------------------------------------------------------- IRMAS

IRMAS_PARTS = {"IRMAS-TestingData-Part1.zip": "IRMAS-TestingData-Part1/Part1",
               "IRMAS-TestingData-Part2.zip": "IRMAS-TestingData-Part2/IRTestingData-Part2",
               "IRMAS-TestingData-Part3.zip": "IRMAS-TestingData-Part3/Part3"}


def irmas_files(per_class: int = 6) -> dict[str, bytes]:
    """IRMAS-TrainingData.zip (a folder per instrument code) and three testing zips (excerpts with .txt labels)."""
    training = {f"IRMAS-TrainingData/{code}/[{code}][nod][cla]{i // 2:04d}__{i % 2 + 1}.wav": audio(0.1, 2)
                for code in irmas.IRMAS_CLASSES for i in range(per_class)}
    files = {"IRMAS-TrainingData.zip": zip_file(training)}
    labels = [["cel", "voi"], ["pia"], ["gel", "voi"], ["pia", "vio"]]
    for n, (name, folder) in enumerate(IRMAS_PARTS.items()):
        members = {}
        for i, codes in enumerate(labels):
            members[f"{folder}/{n:02d} - Song-{i}.wav"] = audio(0.2, 2)
            members[f"{folder}/{n:02d} - Song-{i}.txt"] = "".join(f"{c}\t\n" for c in codes).encode()
        files[name] = zip_file(members)
    return files


def test_irmas_subset_fetches_only_its_members_by_range(server, unpinned, tmp_path):
    files = irmas_files()
    publish(server, "irmas", files)
    dl = downloads(tmp_path, server)
    subset = IrmasSubsetParams(classes=["cel", "pia"], files_per_class=2, testing_files=3)
    manifest = irmas.download_irmas(dl, subset)
    training_path = "/records/1290750/files/IRMAS-TrainingData.zip"
    assert server.sent[training_path] < 0.2 * len(files["IRMAS-TrainingData.zip"])
    assert all(ask and ask.startswith("bytes=") for path, ask in server.requests if path == training_path)
    assert manifest["archives"]["IRMAS-TrainingData.zip"]["check"] == "CRC-32 of each member read"
    assert dl.ledger.spent == sum(server.sent.values())
    training, testing = irmas.load_irmas(dl.folder("irmas"))
    assert training["label"].value_counts().to_dict() == {"cello": 2, "piano": 2}
    assert set(training["split"]) <= {"train", "val", "test"} and set(training["source"]) == {"irmas"}
    # An excerpt is kept when one of its labels is chosen; labels of other classes are dropped.
    assert len(testing) == 3 and set(testing["split"]) == {"test"}
    assert set(testing["labels"]) <= {"cello", "piano"} and all(testing["labels"])
    assert all(Path(p).is_file() for p in [*training["path"], *testing["path"]])


def test_irmas_budget_refuses_the_members_before_fetching_them(server, unpinned, tmp_path):
    files = irmas_files()
    publish(server, "irmas", files)
    dl = downloads(tmp_path, server, budget=200_000)  # the directory fits, 11 x 6 clips of 35 kB do not
    with pytest.raises(download.BudgetExceeded, match="66 files from IRMAS-TrainingData.zip"):
        irmas.download_irmas(dl, IrmasSubsetParams(files_per_class=None, testing_files=0))
    assert not list((dl.folder("irmas") / "IRMAS-TrainingData").rglob("*.wav"))


# --------------------------------------------------------------------------- OpenMIC-2018


def openmic_files(labels_first: bool) -> dict[str, bytes]:
    """openmic-2018-v1.0.0.tgz: audio/<key[:3]>/<key>.ogg, aggregated labels, split01 partitions."""
    keys = [f"{i:06d}_{1000 * i}" for i in range(12)]
    answers = []
    for i, key in enumerate(keys):
        answers.append((key, ["piano", "violin", "voice"][i % 3], 0.9, 3))  # a confident positive each
        answers.append((key, "drums", 0.1 if i % 2 else 0.5, 2))  # a negative, or undecided (unknown)
    labels = pd.DataFrame(answers, columns=["sample_key", "instrument", "relevance", "num_responses"])
    metadata = {"openmic-2018/openmic-2018-aggregated-labels.csv": labels.to_csv(index=False).encode(),
                "openmic-2018/partitions/split01_train.csv": "\n".join(keys[:8]).encode() + b"\n",
                "openmic-2018/partitions/split01_test.csv": "\n".join(keys[8:]).encode() + b"\n"}
    clips = {f"openmic-2018/audio/{key[:3]}/{key}.ogg": audio(0.5, 1, 22050, "OGG") for key in keys}
    members = {**metadata, **clips} if labels_first else {**clips, **metadata}
    return {"openmic-2018-v1.0.0.tgz": tar_gz(members)}


@pytest.mark.parametrize("labels_first", [True, False])
def test_openmic_keeps_unknown_labels_unknown(server, unpinned, tmp_path, labels_first):
    files = openmic_files(labels_first)
    publish(server, "openmic", files)
    dl = downloads(tmp_path, server)
    manifest = openmic.download_openmic(dl, SubsetParams(classes=["drums", "piano", "voice"], files_per_class=2))
    root = dl.folder("openmic")
    table = openmic.load_openmic(root)
    # The first two piano and voice clips in archive order; none is a drums positive, so drums never fills.
    assert sorted(table["labels"]) == ["piano", "piano", "voice", "voice"]
    assert len(list(root.rglob("*.ogg"))) == 4  # clips streamed before the labels and not chosen are deleted
    # Unknown: classes nobody was asked about, and drums where the answers split evenly (relevance 0.5).
    assert set(table["labels_unknown"]) == {"voice", "drums|voice", "piano", "drums|piano"}
    assert set(table["split"]) <= {"train", "val", "test"}
    targets, known = real.multilabel_targets(table, manifest["classes"])
    assert targets.shape == known.shape == (4, 3) and (targets[known == 0] == 0).all()
    drums = manifest["classes"].index("drums")
    assert (known[:, drums] == ~table["labels_unknown"].str.contains("drums")).all() and not targets[:, drums].any()
    assert targets.sum() == 4 and known.sum() == 4 + table["labels_unknown"].str.count("drums").rsub(1).sum()


def test_masked_loss_and_metrics_ignore_unknown_answers():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    known = torch.tensor([[True, False], [True, True], [True, True]])
    logits = torch.tensor([[2.0, 5.0], [-1.0, 1.0], [0.5, -3.0]])
    loss = losses.masked_bce(logits, targets, known)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])
    assert torch.isclose(loss, expected)
    assert torch.isclose(losses.masked_bce(logits + 9.0 * ~known, targets, known), loss)  # unknown: no effect
    scores = logits.numpy().copy()
    result = metrics.masked_multilabel_metrics(targets.numpy(), scores, known.numpy(), ["a", "b"])
    scores[0, 1] = -50.0  # a score where the answer is unknown
    assert metrics.masked_multilabel_metrics(targets.numpy(), scores, known.numpy(), ["a", "b"]) == result
    assert result["micro_f1"] == pytest.approx(1.0) and result["mAP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- safety


@pytest.mark.parametrize("members, links, refused", [
    ({"../evil.txt": b"x"}, {}, "outside"),
    ({}, {"openmic-2018/audio/000/link.ogg": "/etc/passwd"}, "absolute"),
    ({}, {"openmic-2018/link": "../../../outside"}, "outside"),
])
def test_archives_escaping_the_folder_are_refused(server, unpinned, tmp_path, members, links, refused):
    publish(server, "openmic", {"openmic-2018-v1.0.0.tgz": tar_gz(members, links)})
    dl = downloads(tmp_path, server)
    with pytest.raises(download.UnsafeArchive, match=refused):
        openmic.download_openmic(dl, SubsetParams())
    assert not (tmp_path / "cache" / "evil.txt").exists() and not (dl.folder("openmic") / "openmic-2018").exists()


def test_zip_members_escaping_or_inflating_are_refused(tmp_path):
    for name, size, why in [("../evil.wav", 10, "leaves"), ("/etc/x", 10, "leaves"), ("a.wav", 10**9, "inflates")]:
        info = zipfile.ZipInfo(name)
        info.file_size, info.compress_size = size, 1000
        with pytest.raises(download.UnsafeArchive, match=why):
            download.zip_member_target(info, tmp_path, "test.zip")
    link = zipfile.ZipInfo("link")
    link.external_attr = 0o120777 << 16
    with pytest.raises(download.UnsafeArchive, match="link"):
        download.zip_member_target(link, tmp_path, "test.zip")


# --------------------------------------------------------------------------- ESC-50, params, clip tables


def esc50_files() -> dict[str, bytes]:
    """master.zip as GitHub builds it: ESC-50-master/meta/esc50.csv and ESC-50-master/audio/*.wav."""
    rows, members = [], {}
    for target, category in enumerate(["dog", "rain", "clock_tick"]):
        for i in range(10):
            name = f"{i % 5 + 1}-{100 + i}-A-{target}.wav"
            rows.append([name, i % 5 + 1, target, category, False, 100 + i, "A"])
            members[f"ESC-50-master/audio/{name}"] = audio(0.1)
    meta = pd.DataFrame(rows, columns=["filename", "fold", "target", "category", "esc10", "src_file", "take"])
    return {"master.zip": zip_file({"ESC-50-master/meta/esc50.csv": meta.to_csv(index=False).encode(), **members})}


def test_esc50_through_params_without_range_support(tmp_path):
    server = FileServer(supports_range=False)  # GitHub's generated zips: the whole file or nothing
    try:
        publish(server, "esc50", esc50_files())
        profile = write_profile(tmp_path, (
            f"extends: {ROOT / 'params/quick.yaml'}\noutputs: {tmp_path / 'outputs'}\n"
            f"data:\n  dataset: esc50\n  downloads:\n    cache_dir: {tmp_path / 'cache'}\n    base_url: {server.base}\n"
            "    esc50: {classes: [dog, rain], files_per_class: 4}\n"))
        params = load_params(profile)
        real_data = real.prepare(params, progress=False)
    finally:
        server.stop()
    clips = real_data.tables["clips"]
    assert clips["label"].value_counts().to_dict() == {"dog": 4, "rain": 4}
    assert (clips["split"] == clips["fold"].map(sources.ESC50_FOLD_SPLITS)).all()
    assert server.ranges[-1] is None and "ESC-50" in real_data.summary()
    # Notebook 01 saves it as the clip table of notebooks 02-07, paths into the cache kept absolute.
    saved, pieces = tables.build_clip_tables(params, tables.SoundfontPlan({}, None), real_data)
    loaded = tables.load_clip_table(params, "clips")
    assert loaded["path"].tolist() == saved["path"].tolist() == clips["path"].tolist() and pieces.empty
    manifest = json.loads((tables.data_dir(params) / "manifest.json").read_text())
    assert manifest["dataset"] == "esc50" and manifest["download"]["request"]["files_per_class"] == 4


# --------------------------------------------------------------------------- Candombe (notebook 09's real beats)


def candombe_files(performances: int = 3, seconds: float = 9.0) -> dict[str, bytes]:
    """The two zips as on Zenodo: `time,bar.beat` CSVs and stereo FLACs whose clicks fall on the annotated beats."""
    from audiokd_lib.data.candombe import download_candombe  # noqa: F401  (the module under test imports cleanly)

    annotations, audio = {}, {}
    rate = 44100
    for k in range(performances):
        name = f"UC_{k:03d}"
        beats = np.arange(0.4 + 0.05 * k, seconds - 0.3, 0.5)
        annotations[f"candombe_annotations/csv/{name}.csv"] = "\n".join(
            f"{t:.4f},{i // 4 + 1}.{i % 4 + 1}" for i, t in enumerate(beats)).encode()
        wave = np.zeros((round(seconds * rate), 2), np.float32)
        for i, t in enumerate(beats):
            start = int(t * rate)
            wave[start:start + 600] += np.random.default_rng(i).normal(0, 0.8 if i % 4 == 0 else 0.3, (600, 1))
        buffer = io.BytesIO()
        sf.write(buffer, np.clip(wave, -1, 1), rate, format="FLAC")
        audio[f"candombe_audio/{name}.flac"] = buffer.getvalue()
    return {"candombe_annotations.zip": zip_file(annotations), "candombe_audio.zip": zip_file(audio)}


def test_candombe_subset_by_range_with_its_beats(tmp_path, server, unpinned):
    from audiokd_lib.beats.pieces import read_beats
    from audiokd_lib.data.candombe import download_candombe, load_candombe

    files = candombe_files()
    publish(server, "candombe", files)
    dl = downloads(tmp_path, server)
    manifest = download_candombe(dl, recordings=2)
    assert manifest["dataset"] == "candombe" and manifest["licence"] == "CC BY 4.0"
    assert len(manifest["clips"]["recordings"]) == 2 and len(manifest["annotations"]) == 2
    table = load_candombe(dl.folder("candombe"))
    assert len(table) == 2 and (table["split"] == "real").all()
    for row in table.itertuples():
        beats, downbeats = read_beats(row.beats_path)
        assert len(beats) == 17 and np.allclose(downbeats, beats[::4]) and sf.info(row.path).channels == 2
    requests = len(server.requests)
    assert download_candombe(dl, recordings=2) == manifest and len(server.requests) == requests  # cached
    assert len(load_candombe(dl.folder("candombe"))) == 2


def test_candombe_refuses_an_archive_without_its_recordings(tmp_path, server, unpinned):
    from audiokd_lib.data.candombe import download_candombe

    files = candombe_files(1)
    files["candombe_audio.zip"] = zip_file({"readme.txt": b"nothing here"})
    publish(server, "candombe", files)
    with pytest.raises(download.DownloadError, match="not the Candombe archive"):
        download_candombe(downloads(tmp_path, server), recordings=1)
