"""The teachers: mn04 hears what it should, key conversion round-trips, AST loads offline, the ensemble averages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchaudio
from conftest import write_profile

from audiokd_lib.compress.distill import check_shared_frontend
from audiokd_lib.compress.export import head_module
from audiokd_lib.core import tracking
from audiokd_lib.core.metrics import complexity
from audiokd_lib.core.params import ParamsError, load_params
from audiokd_lib.experiment import evaluation, report, results, runs
from audiokd_lib.models.checkpoints import load_checkpoint, save_checkpoint
from audiokd_lib.models.ensemble import LogitMean, build_ensemble, ensemble_spec, seeds_text
from audiokd_lib.models.teachers import (
    OPENMIC_TO_AUDIOSET,
    ASTFrontend,
    audioset_labels,
    convert_efficientat_state_dict,
    efficientat_mobilenet,
    fit_calibration,
    load_ast,
    load_mn04_audioset,
    openmic_indices,
    openmic_logits,
    replace_head,
    set_trainable,
)
from audiokd_lib.models.weights import AUDIOSET_LABELS, MN04_AS, fetch
from audiokd_lib.training import FeatureSet

ROOT = Path(__file__).resolve().parent.parent


def weights_dir() -> Path:
    """$AUDIOKD_WEIGHTS (CI), else the shared offline copies beside the project, else skip."""
    if os.environ.get("AUDIOKD_WEIGHTS"):
        return Path(os.environ["AUDIOKD_WEIGHTS"])
    shared = ROOT.parent / "shared" / "weights"
    if not shared.is_dir():
        pytest.skip(f"no mn04 weights offline: set AUDIOKD_WEIGHTS to a folder holding {MN04_AS.name}")
    return shared


def mn04_frontend(waves: torch.Tensor) -> torch.Tensor:
    """EfficientAT's log-mel front end (shared/weights/README.md): 32 kHz (B, samples) -> (B, 1, 128, T)."""
    x = F.conv1d(waves[:, None], torch.tensor([[[-0.97, 1.0]]])).squeeze(1)  # pre-emphasis
    spec = torch.stft(x, 1024, hop_length=320, win_length=800, window=torch.hann_window(800, periodic=False),
                      center=True, return_complex=True)
    mel = torchaudio.compliance.kaldi.get_mel_banks(128, 1024, 32000, 0.0, 15000.0, vtln_low=100.0,
                                                     vtln_high=-500.0, vtln_warp_factor=1.0)[0]
    mel = F.pad(mel, (0, 1))  # 512 Kaldi bins -> the STFT's 513
    return ((torch.log(mel @ spec.abs() ** 2 + 1e-5) + 4.5) / 5)[:, None]


def test_mn04_hears_a_sine_and_noise():
    folder = weights_dir()
    model = load_mn04_audioset(fetch(MN04_AS, weights_dir=folder, download=False))
    labels = audioset_labels(fetch(AUDIOSET_LABELS, weights_dir=folder, download=False))
    assert len(labels) == 527 and labels[0] == "Speech"
    assert sum(p.numel() for p in model.parameters()) == 983_599  # as in the weights README
    t = torch.arange(2 * 32000) / 32000
    sine = 0.5 * torch.sin(2 * torch.pi * 440.0 * t)
    noise = 0.3 * torch.randn(2 * 32000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = mn04_frontend(torch.stack([sine, noise]))
        probs = torch.sigmoid(model(features))
    assert features.shape == (2, 1, 128, 200)
    assert labels[int(probs[0].argmax())] == "Sine wave" and probs[0].max() > 0.5  # measured 0.92
    top3 = {labels[int(i)] for i in probs[1].topk(3).indices}  # measured: Static, White noise, Noise
    assert top3 & {"White noise", "Static", "Noise"}


def to_efficientat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of convert_efficientat_state_dict: torchvision keys and shapes -> EfficientAT's."""
    out = {}
    for key, value in state.items():
        if re.search(r"\.fc[12]\.(weight|bias)$", key):
            key = re.sub(r"\.(fc[12]\.)", r".conc_se_layers.0.\1", key)
            value = value[:, :, 0, 0] if value.dim() == 4 else value
        key = re.sub(r"^classifier\.0\.", "classifier.2.", re.sub(r"^classifier\.3\.", "classifier.5.", key))
        out[key] = value
    return out


def test_convert_state_dict_roundtrip():
    original = efficientat_mobilenet().state_dict()
    foreign = to_efficientat(original)
    assert "classifier.5.weight" in foreign and "features.4.block.2.conc_se_layers.0.fc1.weight" in foreign
    assert foreign["features.4.block.2.conc_se_layers.0.fc1.weight"].dim() == 2
    back = convert_efficientat_state_dict(foreign)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_tiny_ast_roundtrip(tmp_path: Path):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(0)
    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_length=64, num_mel_bins=16, frequency_stride=16, time_stride=8, patch_size=16,
                       id2label={i: f"old{i}" for i in range(5)}, label2id={f"old{i}": i for i in range(5)})
    ckpt = tmp_path / "ckpt"
    saved = ASTForAudioClassification(config)
    saved.save_pretrained(ckpt)
    ASTFeatureExtractor(num_mel_bins=16, max_length=64, sampling_rate=16000).save_pretrained(ckpt)

    names = ["cello", "flute", "oboe"]
    model = load_ast(ckpt, names).eval()
    assert model.classifier.dense.out_features == 3 and model.config.id2label == dict(enumerate(names))
    encoder_weight = "audio_spectrogram_transformer.layers.0.attention.q_proj.weight"
    assert torch.equal(model.state_dict()[encoder_weight], saved.state_dict()[encoder_weight])

    frontend = ASTFrontend.from_pretrained(ckpt)
    assert frontend.sample_rate == 16000
    waves = torch.randn(2, 16000) * 0.1
    features = frontend(waves)
    assert features.shape == (2, 64, 16)
    direct = frontend.extractor(list(waves.numpy()), sampling_rate=16000, return_tensors="pt")["input_values"]
    assert torch.equal(features, direct)
    with torch.no_grad():
        assert model(features).logits.shape == (2, 3)

    def starting(*prefixes: str) -> set[str]:
        return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}

    head = set_trainable(model, "head")
    assert trainable_names(model) == starting("classifier.")
    set_trainable(model, "last_blocks", last_blocks=1)  # the last encoder layer, and the layernorm after it
    last = starting("audio_spectrogram_transformer.layers.1.", "audio_spectrogram_transformer.layernorm.")
    assert trainable_names(model) == starting("classifier.") | last
    assert set_trainable(model, "all") == sum(p.numel() for p in model.parameters()) > head

    with pytest.raises(RuntimeError, match="teacher.checkpoint.*hub id or a local folder.*no folder"):
        load_ast(tmp_path / "missing", names)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="exists but"):
        ASTFrontend.from_pretrained(tmp_path / "empty")


def test_set_trainable_mobilenet():
    model = efficientat_mobilenet(num_classes=5)
    counts = [set_trainable(model, mode, last_blocks=2) for mode in ("head", "last_blocks", "all")]
    assert counts[0] < counts[1] < counts[2] == sum(p.numel() for p in model.parameters())
    set_trainable(model, "head")
    assert all(n.startswith("classifier.") for n in trainable_names(model))
    with pytest.raises(ValueError, match="'head', 'last_blocks', 'all'"):
        set_trainable(model, "encoder")
    with pytest.raises(ValueError, match="last_blocks"):
        set_trainable(model, "last_blocks", 0)


def test_replace_head_keeps_the_body():
    model = replace_head(efficientat_mobilenet(), 14).eval()
    assert model.classifier[-1].out_features == 14 and model.classifier[-1].in_features == 512
    with torch.no_grad():
        assert model(torch.randn(2, 1, 128, 100)).shape == (2, 14)


def test_every_openmic_class_has_its_audioset_output():
    from audiokd_lib.data.taxonomy import OPENMIC_CLASSES

    labels = audioset_labels(fetch(AUDIOSET_LABELS, weights_dir=weights_dir(), download=False))
    assert set(OPENMIC_TO_AUDIOSET) == set(OPENMIC_CLASSES)
    index = openmic_indices(labels, list(OPENMIC_CLASSES))
    assert [labels[i] for i in index] == [OPENMIC_TO_AUDIOSET[c] for c in OPENMIC_CLASSES]
    assert len(set(index)) == len(OPENMIC_CLASSES)
    logits = torch.arange(len(labels), dtype=torch.float32).repeat(3, 1)  # each logit is its own index
    picked = openmic_logits(logits, labels, ["voice", "bass", "violin"])
    assert picked.shape == (3, 3)
    assert picked[0].tolist() == [labels.index("Singing"), labels.index("Bass guitar"), labels.index("Violin, fiddle")]
    with pytest.raises(ValueError, match="not OpenMIC-2018 classes"):
        openmic_indices(labels, ["kazoo"])
    with pytest.raises(ValueError, match="not among the tagger's 100 outputs"):
        openmic_indices(labels[:100], ["piano"])


def test_calibration_moves_the_threshold_and_keeps_the_ranking():
    from audiokd_lib.core.metrics import classification_metrics

    gen = torch.Generator().manual_seed(0)
    targets = (torch.rand(300, 3, generator=gen) < 0.4).float()
    targets[:, 2] = 0  # a class no clip has
    logits = 2 * targets + torch.randn(300, 3, generator=gen) - 5  # ranks well, but every sigmoid is below 0.5
    scale, shift = fit_calibration(logits, targets)
    calibrated = scale * logits + shift
    assert (scale > 0).all() and torch.isfinite(shift).all()
    before = classification_metrics(targets.numpy(), logits.numpy(), ["a", "b", "c"], multilabel=True)
    after = classification_metrics(targets.numpy(), calibrated.numpy(), ["a", "b", "c"], multilabel=True)
    assert after["mAP"] == pytest.approx(before["mAP"], abs=1e-6)
    assert before["micro_f1"] == 0.0 and after["micro_f1"] > 0.6
    assert (calibrated[:, 2] < 0).all()  # the absent class stays absent


# --- The ensemble teacher: tiny students stand in for fine-tuned mn04 members. ---


class Constant(torch.nn.Module):
    """A network that answers every clip with the same logits."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(features.shape[0], -1)


def members(tiny_student, seeds=(0, 1)):
    return [tiny_student(["Flute", "Oboe", "Violin"], seed=seed) for seed in seeds]


def one_clip(model) -> torch.Tensor:
    """Features of one clip of the smoke profile's length (batch 1)."""
    wave = 0.1 * torch.randn(1, round(model.spec["clip_seconds"] * model.sample_rate),
                             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.features(wave)


def test_ensemble_logits_are_the_mean_of_its_members(tiny_student):
    by_hand = LogitMean([Constant([1.0, 2.0, 3.0]), Constant([3.0, 0.0, -1.0])])
    assert by_hand(torch.zeros(2, 1, 4, 4)).tolist() == [[2.0, 1.0, 1.0]] * 2

    a, b = members(tiny_student)
    model = build_ensemble([a, b], [0, 1])
    waves = 0.1 * torch.randn(3, 32000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(waves), (a(waves) + b(waves)) / 2, atol=1e-6)
        features = model.features(waves)
        assert torch.allclose(model.head(features), (a.head(features) + b.head(features)) / 2, atol=1e-6)
        assert not torch.allclose(a(waves), b(waves))  # two seeds, two different members
    assert model.spec["kind"] == "ensemble" and model.spec["average"] == "logits"
    assert model.spec["identity"] == ("ensemble of 2 mobilenet_v3_small x0.5, each fine-tuned, seeds 0, 1, "
                                      "logits averaged")
    assert model.classes == a.classes and model.spec["features"] == a.spec["features"]
    check_shared_frontend(model, a)  # consistent distillation: the ensemble reads the students' features


def test_ensemble_checkpoint_round_trip_is_weights_only(tiny_student, tmp_path):
    model = build_ensemble(members(tiny_student), [3, 4])
    path = save_checkpoint(model, tmp_path / "ensemble.pt")
    saved = torch.load(path, weights_only=True)  # the safe loader reads it: only tensors, strings, numbers, lists
    assert [m["kind"] for m in saved["spec"]["members"]] == ["student", "student"] and saved["spec"]["seeds"] == [3, 4]
    again = load_checkpoint(path)
    assert isinstance(again.net, LogitMean) and len(again.net.members) == 2 and not again.training
    waves = 0.1 * torch.randn(2, 32000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(waves), again(waves))
    assert again.spec == model.spec


def test_ensemble_macs_and_params_are_its_members_summed(tiny_student, tmp_path):
    a, b = members(tiny_student)
    b = tiny_student(["Flute", "Oboe", "Violin"], seed=1, width_mult=0.75)  # members need not be alike
    model = build_ensemble([a, b], [0, 1])
    features = one_clip(model)
    cost = {}
    for name, m in (("a", a), ("b", b), ("ensemble", model)):
        cost[name] = complexity(head_module(m), features, save_checkpoint(m, tmp_path / f"{name}.pt"),
                                repeats=1, warmup=0, batch=2)
    assert cost["a"].macs != cost["b"].macs
    assert cost["ensemble"].macs == cost["a"].macs + cost["b"].macs
    assert cost["ensemble"].params == cost["a"].params + cost["b"].params


def test_ensemble_refuses_members_that_do_not_fit_together(tiny_student):
    a, b = members(tiny_student)
    with pytest.raises(ValueError, match="at least two members"):
        build_ensemble([a], [0])
    with pytest.raises(ValueError, match="2 members but 3 seeds"):
        build_ensemble([a, b], [0, 1, 2])
    with pytest.raises(ValueError, match=r"member 1 .* differs from member 0 in \['classes'\]"):
        build_ensemble([a, tiny_student(["Flute", "Oboe", "Tuba"])], [0, 1])
    ast_like = {key: value for key, value in a.spec.items() if key != "features"}
    with pytest.raises(ValueError, match="log-mel front end"):
        ensemble_spec([ast_like, ast_like], [0, 1])
    assert seeds_text([0, 1, 2]) == "seeds 0-2" and seeds_text([2, 7]) == "seeds 2, 7"


def test_teacher_seeds_are_checked(smoke_profile, tmp_path):
    for kind, seeds, message in (("efficientat", "[0, 0]", "repeats a seed"), ("ast", "[0, 1]", "one seed")):
        text = f"extends: {smoke_profile}\nteacher: {{kind: {kind}, train: {{seeds: {seeds}}}}}\n"
        with pytest.raises(ParamsError, match=message):
            load_params(write_profile(tmp_path, text, kind))


def test_the_ensemble_is_the_teacher_every_later_notebook_finds(tiny_student, smoke_profile):
    """Members are runs of role teacher too, but best_run, latest_run and the final table's reference
    teacher are the ensemble, logged last under the name `teacher`."""
    params = load_params(smoke_profile)
    a, b = members(tiny_student)
    frames = one_clip(a).shape[-1]
    sets = {split: FeatureSet(torch.randn(6, 1, 128, frames, generator=torch.Generator().manual_seed(i)),
                              torch.arange(6) % 3, [f"{split}{j}" for j in range(6)], a.classes, "fp")
            for i, split in enumerate(("train", "val", "test"))}
    for seed, member in ((0, a), (1, b)):
        runs.log_model(params, "teacher", f"teacher-seed{seed}", member, sets,
                       tags={"variant": "member", "member_of": "teacher", "teacher": "tiny"},
                       metrics={"val_macro_f1": 1.0})  # members that look perfect on validation
    model = build_ensemble([a, b], [0, 1])
    row = runs.log_model(params, "teacher", "teacher", model, sets, metrics=evaluation.scores(model, sets, ("val",)),
                         tags={"variant": "ensemble", "teacher": model.spec["identity"]})
    assert row["val_macro_f1"] < 1.0 and row["macs"] > 0
    assert results.best_run(params, "teacher")["model"] == "teacher"
    assert tracking.latest_run(params, "teacher")["model"] == "teacher"
    assert load_checkpoint(runs.checkpoint_path(params, "teacher")).spec == model.spec
    table = report.final_table(params)
    assert table["variant"].tolist() == ["ensemble", "member"] and table["seeds"].tolist() == [1, 2]
    assert table["MACs / teacher"].tolist() == [1.0, 0.5]
