"""Runs: the teacher's cached soft labels refuse stale data, the verdict, classify by role name."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from scipy import stats

from audiokd_lib.audio.features import NormStats
from audiokd_lib.audio.loading import save_audio
from audiokd_lib.cli import main
from audiokd_lib.compress import soft_labels
from audiokd_lib.core import tracking
from audiokd_lib.core.params import KDParams, load_params
from audiokd_lib.experiment import evaluation, report, results, runs
from audiokd_lib.models import checkpoints, students, teachers
from audiokd_lib.training import FeatureSet, fit, predict

CLASSES = ["Flute", "Oboe", "Violin"]


def tiny_model(params, seed=None):
    stats = NormStats(torch.full((128,), -6.0), torch.full((128,), 3.0), 1, [], "f", "d")
    model = students.build_student(params, CLASSES, stats, seed=seed).eval()
    model.spec["identity"] = "a tiny stand-in teacher"
    return model


def feature_set(n: int, name: str) -> FeatureSet:
    return FeatureSet(torch.randn(n, 1, 128, 20), torch.arange(n) % 3, [f"{name}{i}" for i in range(n)], CLASSES, "fp")


def test_teacher_logits_are_refused_for_other_clips_or_another_teacher(smoke_profile):
    params = load_params(smoke_profile)
    teacher = tiny_model(params)
    checkpoint = checkpoints.save_checkpoint(teacher, soft_labels.teacher_logits_path(params).with_name("model.pt"))
    sets = {"train": feature_set(6, "a"), "val": feature_set(3, "b")}
    soft_labels.cache_teacher_logits(params, teacher, checkpoint, sets)
    logits, identity = soft_labels.load_teacher_logits(params, sets)
    assert identity == "a tiny stand-in teacher" and logits["train"].shape == (6, 3)
    assert torch.allclose(logits["val"], predict(teacher, sets["val"]))

    changed = {**sets, "val": feature_set(3, "c")}
    with pytest.raises(ValueError, match="split 'val' belong to other clips"):
        soft_labels.load_teacher_logits(params, changed)
    torch.nn.init.zeros_(teacher.net.classifier[-1].weight)
    checkpoints.save_checkpoint(teacher, checkpoint)  # the teacher was fine-tuned again
    with pytest.raises(ValueError, match="another teacher checkpoint"):
        soft_labels.load_teacher_logits(params, sets)


def test_welch_test_on_hand_worked_numbers():
    table = pd.DataFrame({"variant": ["baseline"] * 3 + ["kd-cached"] * 3 + ["kd-consistent"] * 3,
                          "score": [0.70, 0.72, 0.74, 0.80, 0.81, 0.82, 0.71, 0.73, 0.75]})
    comparison = results.compare_to_baseline(table, "score")
    cached = comparison.loc["kd-cached"]
    # By hand: variances 0.0004 and 0.0001 over 3 seeds; se = sqrt(0.0004/3 + 0.0001/3) = 0.012910,
    # t = 0.09 / se = 6.971; Welch-Satterthwaite df = se^4 / ((0.0004/3)^2/2 + (0.0001/3)^2/2) = 2.941.
    assert cached["difference"] == pytest.approx(0.09)
    assert cached["Welch t"] == pytest.approx(6.971, abs=1e-3)
    half_width = cached["95% CI high"] - cached["difference"]
    assert half_width == pytest.approx(stats.t.ppf(0.975, 2.941) * 0.012910, rel=1e-3)
    assert comparison.loc["kd-consistent", "difference"] == pytest.approx(0.01)
    first, second = results.verdict(comparison, "score", target=0.03).splitlines()
    assert "kd-cached" in first and "a gain that holds, and meets the +0.030 target" in first
    assert "kd-consistent" in second and "includes zero" in second
    single = results.compare_to_baseline(table.groupby("variant").head(1), "score")
    assert "too few seeds" in results.verdict(single, "score")


def test_classify_finds_a_profiles_latest_model_by_role(smoke_profile, tmp_path, capsys):
    params = load_params(smoke_profile)
    checkpoint = checkpoints.save_checkpoint(tiny_model(params), tmp_path / "model.pt")
    with tracking.start_run(params, "student-kd", "student-kd-cached-seed0"):
        tracking.log_artifacts([checkpoint])
    t = torch.arange(32000) / 32000
    wave = save_audio(tmp_path / "tone.wav", 0.3 * torch.sin(2 * torch.pi * 440 * t)[None], 32000)
    assert main(["classify", str(wave), "--model", "student-kd", "--profile", str(smoke_profile)]) == 0
    assert capsys.readouterr().out.startswith(str(wave))
    assert main(["classify", str(wave), "--model", "teacher", "--profile", str(smoke_profile)]) == 1
    assert "03_teacher" in capsys.readouterr().err


def test_an_ast_teacher_trains_and_reloads_through_the_same_path(smoke_profile, tmp_path):
    """The full profile's teacher path, on a tiny random AST saved with save_pretrained."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(0)
    folder = tmp_path / "tiny-ast"
    ASTForAudioClassification(ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_length=64, num_mel_bins=16, frequency_stride=16,
                                        time_stride=8, patch_size=16)).save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=16, max_length=64, sampling_rate=16000).save_pretrained(folder)
    base = load_params(smoke_profile)
    params = base.model_copy(update={"teacher": base.teacher.model_copy(update={
        "kind": "ast", "checkpoint": str(folder), "finetune": "last_blocks", "last_blocks": 1})})
    teacher = teachers.build_teacher(params, CLASSES)
    assert teacher.sample_rate == 16000 and "AST" in teachers.teacher_identity(teacher)
    waves = torch.randn(12, 16000) * 0.1
    feats = torch.cat([teacher.features(w[None]) for w in waves])
    data = FeatureSet(feats, torch.arange(12) % 3, [f"c{i}" for i in range(12)], CLASSES, "fp")
    tp = params.teacher.train.model_copy(update={"epochs": 1, "batch_size": 4})
    result = fit(teacher, data, data, tp, params, 0, tmp_path / "run", progress=False)
    assert len(result.history) == 1
    path = checkpoints.save_checkpoint(teacher, tmp_path / "teacher.pt")
    again = checkpoints.load_checkpoint(path)
    assert torch.allclose(teacher.eval()(waves[:2]), again(waves[:2]), atol=1e-5)


def test_runs_trained_in_worker_processes_match_runs_trained_here(smoke_profile, tmp_path):
    """train_many: two worker processes give the same weights and MLflow rows as this process,
    and a second call reuses the finished runs instead of training them again."""
    params = load_params(smoke_profile)
    tp = params.train.model_copy(update={"epochs": 2, "batch_size": 8, "crop_seconds": None,
                                         "augment": ["gain", "specaugment"]})
    sets = {"train": feature_set(24, "t"), "val": feature_set(9, "v"), "test": feature_set(9, "x")}
    teacher = tiny_model(params)
    soft = predict(teacher, sets["train"])

    def jobs(prefix):
        return [runs.RunJob("student-kd", f"{prefix}-seed{seed}", tiny_model(params, seed), seed,
                            tags={"variant": prefix}, teacher_logits=soft,
                            kd=KDParams(temperature=3.0, alpha=0.7)) for seed in (0, 1)]

    torch.set_num_threads(params.threads)  # what the workers use
    here, there = jobs("here"), jobs("there")
    rows_here = runs.train_many(params, here, sets, tp=tp, workers=1, progress=False)
    rows = runs.train_many(params, there, sets, tp=tp, workers=2, progress=False)
    for a, b, row_here, row in zip(here, there, rows_here, rows):
        for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
            assert torch.allclose(x.float(), y.float(), atol=1e-5), name
        # The logged score is that of the weights the worker trained, and the same as when trained here.
        assert row["model"] == b.name
        assert row["test_macro_f1"] == pytest.approx(evaluation.scores(b.model, sets)["test_macro_f1"])
        assert row["test_macro_f1"] == pytest.approx(row_here["test_macro_f1"])
        assert not (params.output_dir / "models" / b.name / "fitted.pt").exists()
    again = jobs("there")
    rows_again = runs.train_many(params, again, sets, tp=tp, workers=2, progress=False)
    assert [r.name for r in rows_again] == [r.name for r in rows]  # the same MLflow runs, not new ones
    # The same settings from other starting weights (a student pruned from another parent) train anew.
    moved = jobs("there")
    for job in moved:
        with torch.no_grad():
            next(job.model.parameters()).mul_(0.5)
    rows_moved = runs.train_many(params, moved, sets, tp=tp, workers=1, progress=False)
    assert not {r.name for r in rows_moved} & {r.name for r in rows}


def test_a_feature_set_travels_to_a_worker_as_its_cache_file(tmp_path):
    import pickle

    features = torch.randn(5, 1, 128, 20).half()
    cache = tmp_path / "train.pt"
    torch.save({"features": features}, cache)
    data = FeatureSet(features.float(), torch.arange(5) % 3, [f"c{i}" for i in range(5)], CLASSES, "fp",
                      cache_file=str(cache))
    blob = pickle.dumps(data)
    assert len(blob) < features.numel()  # no feature payload
    back = pickle.loads(blob)
    assert torch.equal(back.features, data.features) and back.paths == data.paths


def test_headline_checks_the_course_targets(smoke_profile, tmp_path):
    params = load_params(smoke_profile).model_copy(update={"outputs": str(tmp_path)})
    row = {"teacher": "an ensemble", "params": 1000, "latency ms": 2.0, "latency ms/clip @32": 1.0, "seeds": 3}
    table = pd.DataFrame([
        {**row, "role": "teacher", "variant": "ensemble", "MACs": 80e6, "heldout macro-F1": 0.86},
        {**row, "role": "student-baseline", "variant": "baseline", "MACs": 10e6, "heldout macro-F1": 0.70},
        {**row, "role": "student-kd", "variant": "kd-cached", "MACs": 10e6, "heldout macro-F1": 0.72},
        {**row, "role": "student-kd", "variant": "kd-cached+transfer", "MACs": 10e6, "heldout macro-F1": 0.76},
        {**row, "role": "student-rekd", "variant": "structured 35% + re-KD", "pruning": "structured", "MACs": 5e6,
         "heldout macro-F1": 0.78,
         "latency ms": 1.0, "latency ms/clip @32": 0.5, "params": 300},
    ])
    teacher, kd, final = report.headline(params, table).splitlines()
    assert "8.0x the baseline" in teacher and "(target at least 5x: **met**)" in teacher
    assert "16.0x the final student's (target at least 20x: **not met**)" in teacher
    assert "(kd-cached+transfer)" in kd and "+6.0 points (target at least +3: **met**" in kd
    assert "keeps 91% of the teacher's" in final and "1/16 of its MACs (target at most 1/20: **not met**)" in final
    assert (params.output_dir / "headline.md").read_text().count("\n- ") == 3



def test_a_result_is_computed_once_per_key(tmp_path):
    from audiokd_lib.core.files import cached

    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"score": [0.5 * len(calls)]})

    path = tmp_path / "result.pkl"
    first = cached(path, "key-a", compute)
    pd.testing.assert_frame_equal(cached(path, "key-a", compute), first)  # read back, not computed
    assert len(calls) == 1
    assert cached(path, "key-b", compute)["score"].item() == 1.0 and len(calls) == 2  # other inputs: again
    path.write_bytes(b"half a file")  # whatever is there, a file that does not read is computed again
    assert cached(path, "key-b", compute)["score"].item() == 1.5 and len(calls) == 3
    export = tmp_path / "model.onnx"  # a file the computation writes besides its value: reused while it exists
    assert cached(path, "key-b", compute, needs=[export])["score"].item() == 2.0 and len(calls) == 4
