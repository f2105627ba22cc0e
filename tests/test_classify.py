"""`audiokd classify`: windows, aggregation, silence, clear errors for bad files, and an ensemble teacher."""

from __future__ import annotations

import json

import pytest
import torch

from audiokd_lib.audio.loading import save_audio
from audiokd_lib.classify import classify_file, windows
from audiokd_lib.cli import main
from audiokd_lib.models import checkpoints
from audiokd_lib.models.ensemble import build_ensemble


@pytest.fixture
def checkpoint(tiny_student, tmp_path):
    return checkpoints.save_checkpoint(tiny_student(["Flute", "Oboe", "Violin"]), tmp_path / "model.pt")


def tone(seconds: float, amplitude: float = 0.3) -> torch.Tensor:
    t = torch.arange(round(seconds * 32000)) / 32000
    return (amplitude * torch.sin(2 * torch.pi * 440 * t))[None]


def test_windows_cover_the_file_with_half_overlap():
    wave = torch.arange(10.0)[None]
    chunks = windows(wave, 4)
    assert chunks.shape == (4, 4)  # starts 0, 2, 4, 6; the last one ends at 10
    assert chunks[-1].tolist() == [6, 7, 8, 9]
    assert windows(torch.ones(1, 3), 4).shape == (1, 4)  # shorter than a window: padded once


def test_long_file_is_classified_by_windows(checkpoint, tmp_path):
    model = checkpoints.load_checkpoint(checkpoint)
    path = save_audio(tmp_path / "long.wav", tone(3.5), 32000)
    prediction = classify_file(model, path, top_k=2)
    assert prediction.status == "ok" and prediction.windows == 6  # 1 s windows every 0.5 s
    assert len(prediction.top) == 2 and prediction.top[0][1] >= prediction.top[1][1]
    assert 0 < sum(p for _, p in prediction.top) <= 1 + 1e-6


def test_cli_reports_silence_and_bad_files(checkpoint, tmp_path, capsys):
    good = save_audio(tmp_path / "tone.flac", tone(1.2), 32000)
    silent = save_audio(tmp_path / "silent.wav", torch.zeros(1, 32000), 32000)
    assert main(["classify", str(good), str(silent), "--model", str(checkpoint), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["status"] for line in lines] == ["ok", "silent"]
    assert lines[0]["top"][0]["class"] in {"Flute", "Oboe", "Violin"}

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("not audio at all")
    for bad, message in ((tmp_path / "missing.wav", "no such audio file"), (empty, "empty"),
                         (text, "cannot be decoded")):
        assert main(["classify", str(bad), "--model", str(checkpoint)]) == 1
        err = capsys.readouterr().err
        assert bad.name in err and message in err


def test_cli_names_a_missing_model(tmp_path, capsys):
    assert main(["classify", "x.wav", "--model", str(tmp_path / "nope.pt")]) == 1
    assert "--profile" in capsys.readouterr().err


def test_an_ensemble_teacher_classifies_and_benches_like_any_model(tiny_student, tmp_path, capsys):
    members = [tiny_student(["Flute", "Oboe", "Violin"], seed=seed) for seed in (0, 1)]
    single = checkpoints.save_checkpoint(members[0], tmp_path / "member.pt")
    path = checkpoints.save_checkpoint(build_ensemble(members, [0, 1]), tmp_path / "ensemble.pt")
    wave = save_audio(tmp_path / "tone.wav", tone(2.0), 32000)
    prediction = classify_file(checkpoints.load_checkpoint(path), wave, top_k=3)
    with torch.no_grad():  # by hand: the members' logits averaged per window, then as any single-label model
        chunks = windows(tone(2.0), 32000)
        probs = torch.softmax((members[0](chunks) + members[1](chunks)) / 2, dim=1).mean(dim=0)
    assert prediction.status == "ok" and prediction.windows == 3
    assert dict(prediction.top) == pytest.approx({c: float(p) for c, p in zip(members[0].classes, probs)}, abs=1e-3)

    assert main(["classify", str(wave), "--model", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    assert main(["bench", "--models", str(single), str(path), "--repeats", "2", "--batch", "2"]) == 0
    assert "ensemble of 2 mobilenet_v3_small x0.5" in capsys.readouterr().out
