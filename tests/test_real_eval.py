"""The real recordings of the `real` column: fetched and checked, cut into windows like `audiokd classify`, scored."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, FileServer, write_profile

from audiokd_lib.audio.loading import save_audio
from audiokd_lib.classify import classify_file
from audiokd_lib.core import metrics
from audiokd_lib.core.params import load_params
from audiokd_lib.data import real_eval
from audiokd_lib.experiment import evaluation
from audiokd_lib.training import cached_windows, predict_files

OFFICIAL = "https://raw.githubusercontent.com/owner/repo/0123abcd/sounds"


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.3) -> torch.Tensor:
    t = torch.arange(round(seconds * 32000)) / 32000
    return (amplitude * torch.sin(2 * torch.pi * freq * t))[None]


@pytest.fixture
def recordings(tmp_path, monkeypatch):
    """Three recordings (a short, a long, a silent-tailed one) served on 127.0.0.1 under their official paths,
    a manifest naming them, and a profile whose mirror is that server."""
    sounds = {"flute.wav": tone(0.7, 880), "oboe.wav": tone(2.6, 440), "violin.wav": torch.cat([tone(1.0), 0 * tone(3.0)], 1)}
    files, rows = {}, []
    for (name, wave), label in zip(sounds.items(), ["Flute", "Oboe", "Violin"]):
        data = save_audio(tmp_path / "src" / name, wave, 32000).read_bytes()
        files[f"/owner/repo/0123abcd/sounds/{name}"] = data
        rows.append({"file": f"audio/{name}", "label": label, "openmic_class": label.lower() if label != "Oboe" else "",
                     "seconds": wave.shape[-1] / 32000, "sha256": hashlib.sha256(data).hexdigest(),
                     "url": f"{OFFICIAL}/{name}", "licence": "CC BY 4.0 (test)", "note": ""})
    manifest = tmp_path / "real_eval.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    monkeypatch.setattr(real_eval, "MANIFEST", manifest)
    monkeypatch.delenv(real_eval.ENV, raising=False)
    server = FileServer(files)
    profile = write_profile(tmp_path, f"extends: {ROOT / 'params' / 'smoke.yaml'}\noutputs: {tmp_path / 'outputs'}\n"
                            f"data:\n  downloads: {{cache_dir: {tmp_path / 'cache'}, base_url: {server.base}}}\n",
                            "smoke")
    yield load_params(profile), server
    server.stop()


def test_recordings_are_downloaded_once_checked_and_tabled(recordings):
    params, server = recordings
    table = real_eval.prepare(params, progress=False)
    assert (table["status"] == "ok").all() and table["split"].eq("real").all()
    assert [path.endswith(f) for path, f in zip(table["path"], table["file"])] == [True] * 3
    assert len(server.requests) == 3
    real_eval.prepare(params, progress=False)  # found in the cache: nothing fetched again
    assert len(server.requests) == 3
    assert list(real_eval.load_table(params)["label"]) == ["Flute", "Oboe", "Violin"]


def test_a_local_folder_comes_first_and_a_wrong_copy_is_refused_not_touched(recordings, tmp_path, monkeypatch):
    params, server = recordings
    folder = tmp_path / "mine" / "audio"
    folder.mkdir(parents=True)
    for name in ("flute.wav", "oboe.wav"):
        (folder / name).write_bytes(server.files[f"/owner/repo/0123abcd/sounds/{name}"])
    (folder / "violin.wav").write_bytes(b"not the recording")
    monkeypatch.setenv(real_eval.ENV, str(folder.parent))
    table = real_eval.prepare(params, progress=False).set_index("file")
    assert not server.requests  # the folder's two good copies are used; the bad one is not replaced
    assert table.loc["audio/flute.wav", "path"] == str(folder / "flute.wav")
    assert "SHA-256" in table.loc["audio/violin.wav", "status"] and table.loc["audio/violin.wav", "path"] == ""
    assert (folder / "violin.wav").read_bytes() == b"not the recording"
    assert list(real_eval.load_table(params)["label"]) == ["Flute", "Oboe"]


def test_offline_the_first_failure_stops_the_rest_and_the_table_says_why(recordings):
    params, server = recordings
    server.stop()
    table = real_eval.prepare(params, progress=False)
    assert table["status"].iloc[0].startswith("download failed")
    assert table["status"].iloc[1:].str.startswith("not attempted").all()
    assert real_eval.load_table(params) is None
    assert "missing 2" in real_eval.summary(table)


def test_a_download_with_another_hash_is_rejected(recordings):
    params, server = recordings
    server.files["/owner/repo/0123abcd/sounds/oboe.wav"] = b"changed upstream"
    table = real_eval.prepare(params, progress=False).set_index("file")
    assert "sha256" in table.loc["audio/oboe.wav", "status"]
    assert table.loc["audio/flute.wav", "status"] == "ok"  # a changed file is no reason to stop the others


def test_real_windows_are_judged_as_classify_judges_a_file(recordings, tiny_student):
    params, _ = recordings
    table = real_eval.prepare(params, progress=False)
    model = tiny_student(["Flute", "Oboe", "Violin"])
    data = cached_windows(params, table, model, "test", model.classes, progress=False)
    # 1 s windows (the smoke profile's clips) every 0.5 s: 0.7 s gives one padded window, 2.6 s five;
    # 1 s of tone then 3 s of silence gives seven, of which the five silent ones are left out
    assert model.spec["clip_seconds"] == 1.0
    assert data.groups.bincount().tolist() == [1, 5, 2]
    y, scores = predict_files(model, data)
    assert y.tolist() == [0, 1, 2]
    for path, row in zip(table["path"], scores):
        by_class = dict(classify_file(model, path, top_k=3).top)
        assert np.allclose(np.exp(row), [by_class[c] for c in model.classes], atol=1e-5)
    again = cached_windows(params, table, model, "test", model.classes, progress=False)  # from the cache
    assert torch.equal(again.groups, data.groups) and torch.allclose(again.features, data.features)


def test_real_scores_leave_the_run_key_alone(recordings, tiny_student):
    params, _ = recordings
    table = real_eval.prepare(params, progress=False)
    model = tiny_student(["Flute", "Oboe", "Violin"])
    real = cached_windows(params, table, model, "test", model.classes, progress=False)
    others = {"test": real}
    assert evaluation.sets_fingerprint({**others, "real": real}) == evaluation.sets_fingerprint(others)
    found = evaluation.scores(model, {"real": real}, splits=("real",))
    assert set(found) == {"real_accuracy", "real_macro_f1"}  # three classes: no top-3 accuracy


def test_macro_f1_over_the_classes_present():
    y = np.array([0, 0, 1])
    scores = np.eye(4)[[0, 1, 1]]  # right, wrong (says 1), right
    everything = metrics.classification_metrics(y, scores, list("abcd"), False)
    present = metrics.classification_metrics(y, scores, list("abcd"), False, present_only=True)
    # class a: P 1, R 0.5, F1 2/3; class b: P 0.5, R 1, F1 2/3; c and d are absent and never predicted
    assert present["macro_f1"] == pytest.approx(2 / 3)
    assert everything["macro_f1"] == pytest.approx(1 / 3)
    assert present["accuracy"] == everything["accuracy"] == pytest.approx(2 / 3)


def test_solo_detection_counts_false_alarms_and_misses():
    found = metrics.solo_detection(["flute", "violin", "bass"], [["flute", "voice"], [], ["bass"]])
    assert found == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                     "named_per_recording": pytest.approx(1.0)}
    assert np.isnan(metrics.solo_detection(["flute"], [[]])["precision"])
    with pytest.raises(ValueError, match="2 recordings but 1"):
        metrics.solo_detection(["a", "b"], [["a"]])


def test_the_shipped_manifest_names_every_recording_with_hash_url_and_licence():
    table = real_eval.manifest()
    assert len(table) == 19 and table["file"].is_unique
    assert table["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert table["url"].str.startswith("https://raw.githubusercontent.com/").all() and table["licence"].str.len().gt(0).all()
    from audiokd_lib.data.notes import TINYSOL_INSTRUMENTS
    assert set(table["label"]) <= {i.name for i in TINYSOL_INSTRUMENTS.values()}


def test_unreadable_recordings_leave_the_real_column_out_with_a_warning(recordings, tiny_student):
    params, _ = recordings
    table = real_eval.prepare(params, progress=False)
    for path in table["path"]:
        with open(path, "wb") as broken:  # the cache damaged after the check
            broken.write(b"not audio")
    model = tiny_student(["Flute", "Oboe", "Violin"])
    no_clips = pd.DataFrame(columns=["path", "label", "split"])
    with pytest.warns(UserWarning, match="no real column: no readable, non-silent recordings"):
        assert evaluation.feature_sets(params, no_clips, model, splits=("real",), progress=False) == {}
