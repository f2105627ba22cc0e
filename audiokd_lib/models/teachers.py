"""The large pretrained teachers: EfficientAT's mn04 (a MobileNetV3) and AST (a transformer).

A teacher is only useful if it hears what it was trained to hear, so loading one means two things:
the weights must land in exactly the network they were trained in, and the audio must reach it
through exactly the front end it was trained on.

- mn04_as (EfficientAT, AudioSet, 527 classes) was trained in its authors' own MobileNetV3 code.
  torchvision's MobileNetV3 is the same network once three details match (one input channel, a
  true sigmoid in the squeeze-excitation gates, renamed keys): `convert_efficientat_state_dict`
  does the renaming, `efficientat_mobilenet` builds the matching network.
- AST comes through Hugging Face transformers: `load_ast` swaps its AudioSet head for one with our
  classes, and `ASTFrontend` wraps the checkpoint's own feature extractor so its inputs are right.

Fine-tuning a teacher on a small data set usually trains only the top: `set_trainable` freezes the
rest. transformers is imported only when AST is used: it takes seconds to import.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.ops.misc import SqueezeExcitation

from audiokd_lib.audio.features import LogMel
from audiokd_lib.core.params import FeatureParams, Params
from audiokd_lib.models import teachers
from audiokd_lib.models.classifier import Classifier, Normalise

# The EfficientAT teacher's front end: a log-mel with the Kaldi filter bank, then (x + 4.5) / 5.
EFFICIENTAT_FEATURES = {"sample_rate": 32000, "n_fft": 1024, "win_length": 800, "hop_length": 320, "n_mels": 128,
                        "f_min": 0.0, "f_max": 15000.0, "mel_scale": "kaldi", "preemphasis": 0.97}


def check_efficientat_features(fp: FeatureParams) -> None:
    """The EfficientAT weights only make sense on the front end they were trained with."""
    wrong = {k: (getattr(fp, k), v) for k, v in EFFICIENTAT_FEATURES.items() if getattr(fp, k) != v}
    if wrong:
        listed = ", ".join(f"features.{k} is {got!r} (needs {need!r})" for k, (got, need) in wrong.items())
        raise ValueError(f"the EfficientAT teacher was trained on another front end: {listed}. Set these in the "
                         "profile's `features` section, or use teacher.kind: ast")


def efficientat_classifier(spec: dict[str, Any], net: nn.Module) -> Classifier:
    fp = FeatureParams(**spec["features"])
    return Classifier(spec, LogMel(fp), Normalise(-4.5, 5.0), net)


def pretrained_audioset(params: Params, progress: bool = True) -> Classifier:
    """The EfficientAT AudioSet tagger as published: 527 sigmoid outputs named by the AudioSet ontology."""
    from audiokd_lib.models.weights import AUDIOSET_LABELS, KNOWN, fetch

    tp = params.teacher
    if tp.checkpoint not in KNOWN:
        raise ValueError(f"teacher.checkpoint {tp.checkpoint!r} is not a known EfficientAT weights name; "
                         f"known: {', '.join(KNOWN)}")
    check_efficientat_features(params.features)
    net = teachers.load_mn04_audioset(fetch(KNOWN[tp.checkpoint], tp.weights_dir, download=tp.download,
                                            progress=progress))
    names = teachers.audioset_labels(fetch(AUDIOSET_LABELS, tp.weights_dir, download=tp.download, progress=progress))
    fp = params.features
    spec = {"kind": "efficientat", "checkpoint": tp.checkpoint, "classes": names, "multilabel": True,
            "features": fp.model_dump(), "sample_rate": fp.sample_rate, "clip_seconds": fp.clip_seconds,
            "identity": f"EfficientAT {tp.checkpoint} (MobileNetV3, AudioSet-pretrained)"}
    return efficientat_classifier(spec, net).eval()


def build_teacher(params: Params, classes: list[str], multilabel: bool = False, progress: bool = True,
                  seed: int | None = None) -> Classifier:
    """The profile's pretrained teacher with a new head for our classes, ready to fine-tune.

    `seed` fixes the new head's random weights, so the members of an ensemble differ by their seeds alone.
    """
    tp = params.teacher
    if seed is not None:
        torch.manual_seed(seed)
    if tp.kind == "efficientat":
        model = pretrained_audioset(params, progress)
        teachers.replace_head(model.net, len(classes))
        model.spec.update(classes=list(classes), multilabel=multilabel)
    else:
        net = teachers.load_ast(tp.checkpoint, classes)
        frontend = teachers.ASTFrontend.from_pretrained(tp.checkpoint)
        spec = {"kind": "ast", "checkpoint": tp.checkpoint, "classes": list(classes), "multilabel": multilabel,
                "clip_seconds": params.features.clip_seconds, "sample_rate": frontend.sample_rate,
                "ast_config": net.config.to_dict(), "extractor": frontend.extractor.to_dict(),
                "identity": f"AST {tp.checkpoint}"}
        model = Classifier(spec, frontend, nn.Identity(), ASTLogits(net))
    teachers.set_trainable(model.net.model if tp.kind == "ast" else model.net, tp.finetune, tp.last_blocks)
    return model


class ASTLogits(nn.Module):
    """AST returns an output object; the course's models return plain logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(input_values=features).logits


def teacher_identity(model: Classifier) -> str:
    """The name a table row, an MLflow tag and a cache file give the teacher."""
    return model.spec["identity"]


if TYPE_CHECKING:
    from transformers import ASTFeatureExtractor, ASTForAudioClassification


TRAINABLE_MODES = ("head", "last_blocks", "all")


# EfficientAT key -> torchvision key: its classifier has two extra modules before each Linear.
_CLASSIFIER_RENAMES = {"classifier.2.": "classifier.0.", "classifier.5.": "classifier.3."}


_SE_FC_WEIGHT = re.compile(r"\.fc[12]\.weight$")


def efficientat_mobilenet(num_classes: int = 527, width_mult: float = 0.4) -> nn.Module:
    """torchvision's MobileNetV3-Large made identical to EfficientAT's: mono input, sigmoid SE gates."""
    model = mobilenet_v3_large(width_mult=width_mult, num_classes=num_classes)
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(1, first.out_channels, 3, stride=2, padding=1, bias=False)
    for module in model.modules():
        if isinstance(module, SqueezeExcitation):
            module.scale_activation = nn.Sigmoid()  # torchvision's default for V3 is Hardsigmoid
    return model


def convert_efficientat_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename EfficientAT's keys to torchvision's and reshape its SE Linear weights to 1x1 convs."""
    converted = {}
    for key, value in state.items():
        key = key.replace(".conc_se_layers.0.", ".")
        for old, new in _CLASSIFIER_RENAMES.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        if _SE_FC_WEIGHT.search(key) and value.dim() == 2:
            value = value[:, :, None, None]
        converted[key] = value
    return converted


def load_mn04_audioset(path: str | Path) -> nn.Module:
    """The EfficientAT mn04 AudioSet tagger (527 classes) from its .pt file, in eval mode, on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = efficientat_mobilenet()
    model.load_state_dict(convert_efficientat_state_dict(state), strict=True)
    return model.eval()


def audioset_labels(path: str | Path) -> list[str]:
    """The AudioSet class names (display_name column of class_labels_indices.csv), in index order."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"index", "display_name"} <= rows[0].keys():
        raise ValueError(f"{path}: expected AudioSet's class-label CSV, with columns index,mid,display_name")
    rows.sort(key=lambda row: int(row["index"]))
    if [int(row["index"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: the index column should run 0..{len(rows) - 1} without gaps")
    return [row["display_name"] for row in rows]


# OpenMIC-2018's 20 instrument classes were themselves chosen from the AudioSet ontology (Humphrey et
# al., ISMIR 2018): each has the AudioSet class it was defined from, named here by its display_name in
# class_labels_indices.csv. An AudioSet tagger can therefore be read as an OpenMIC classifier
# zero-shot, by keeping only these outputs (:func:`openmic_logits`).
OPENMIC_TO_AUDIOSET = {
    "accordion": "Accordion",
    "banjo": "Banjo",
    "bass": "Bass guitar",
    "cello": "Cello",
    "clarinet": "Clarinet",
    "cymbals": "Cymbal",
    "drums": "Drum kit",
    "flute": "Flute",
    "guitar": "Guitar",
    "mallet_percussion": "Marimba, xylophone",
    "mandolin": "Mandolin",
    "organ": "Organ",
    "piano": "Piano",
    "saxophone": "Saxophone",
    "synthesizer": "Synthesizer",
    "trombone": "Trombone",
    "trumpet": "Trumpet",
    "ukulele": "Ukulele",
    "violin": "Violin, fiddle",
    "voice": "Singing",
}


def openmic_indices(audioset_names: list[str], classes: list[str]) -> list[int]:
    """The position in an AudioSet tagger's outputs of the AudioSet class behind each OpenMIC class."""
    unknown = [c for c in classes if c not in OPENMIC_TO_AUDIOSET]
    if unknown:
        raise ValueError(f"{unknown} are not OpenMIC-2018 classes; known: {sorted(OPENMIC_TO_AUDIOSET)}")
    index = {name: i for i, name in enumerate(audioset_names)}
    missing = [OPENMIC_TO_AUDIOSET[c] for c in classes if OPENMIC_TO_AUDIOSET[c] not in index]
    if missing:
        raise ValueError(f"AudioSet classes {missing} are not among the tagger's {len(audioset_names)} outputs: "
                         "is its label list AudioSet's class_labels_indices.csv?")
    return [index[OPENMIC_TO_AUDIOSET[c]] for c in classes]


def openmic_logits(audioset_logits: torch.Tensor, audioset_names: list[str], classes: list[str]) -> torch.Tensor:
    """(clips, 527) AudioSet logits -> (clips, len(classes)) logits of those OpenMIC classes, zero-shot.

    Only a selection: each OpenMIC class takes its AudioSet class's logit unchanged, so the sigmoid of
    the result is the tagger's own probability that the instrument is heard.
    """
    return audioset_logits[..., openmic_indices(audioset_names, classes)]


def fit_calibration(logits: torch.Tensor, targets: torch.Tensor, decay: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class Platt scaling: (scale, shift) such that sigmoid(scale * logits + shift) fits `targets`.

    A zero-shot tagger ranks clips well, but its probabilities follow AudioSet's priors and recording
    conditions, not those of new data: on the rendered pieces mn04 gives almost every instrument that
    plays less than 0.5. Two numbers per class, fitted by BCE on the multi-hot `targets` (clips, classes)
    of the training split, move its logits to this data. The scale is kept positive (it is fitted as a
    logarithm), so no class's ranking of clips changes and neither does mAP. `decay` pulls the log-scale
    and the shift towards 0, so a class with no positive clip gets a finite shift, not -infinity.
    """
    logits, targets = logits.detach().double(), targets.detach().double()
    log_scale = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    shift = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale, shift], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = (nn.functional.binary_cross_entropy_with_logits(log_scale.exp() * logits + shift, targets)
                 + decay * (log_scale.pow(2).mean() + shift.pow(2).mean()))
        value.backward()
        return value

    optimizer.step(loss)
    return log_scale.detach().exp().float(), shift.detach().float()


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give a torchvision MobileNetV2/V3 a fresh last Linear layer with `num_classes` outputs."""
    last = model.classifier[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError(f"replace_head: model.classifier[-1] should be nn.Linear, not {type(last).__name__}")
    head = nn.Linear(last.in_features, num_classes)
    nn.init.normal_(head.weight, 0.0, 0.01)  # torchvision's own init: near-uniform first predictions
    nn.init.zeros_(head.bias)
    model.classifier[-1] = head
    return model


def set_trainable(model: nn.Module, mode: str, last_blocks: int = 2) -> int:
    """Freeze all but the head ("head"), the head and the last blocks ("last_blocks"), or nothing ("all").

    The blocks are `model.features` for a torchvision MobileNet and the encoder layers for AST (whose
    final layernorm trains with them). Returns the number of trainable parameters.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"set_trainable: mode {mode!r} is not one of {TRAINABLE_MODES}")
    if hasattr(model, "audio_spectrogram_transformer"):
        base = model.audio_spectrogram_transformer
        blocks, with_blocks = list(base.layers), [base.layernorm]
    elif isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "classifier"):
        blocks, with_blocks = list(model.features), []
    else:
        raise TypeError(
            f"set_trainable: {type(model).__name__} is neither a torchvision MobileNet "
            "(features + classifier) nor a transformers ASTForAudioClassification"
        )
    model.requires_grad_(mode == "all")
    model.classifier.requires_grad_(True)
    if mode == "last_blocks":
        if not 1 <= last_blocks <= len(blocks):
            raise ValueError(f"set_trainable: last_blocks must be in 1..{len(blocks)}, got {last_blocks}")
        for module in blocks[-last_blocks:] + with_blocks:
            module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _looks_like_path(checkpoint: str | Path) -> bool:
    """A hub id is "name" or "owner/name"; anything else can only be meant as a local folder."""
    text = str(checkpoint)
    return isinstance(checkpoint, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1


def _from_pretrained(cls: type, checkpoint: str | Path, **kwargs):
    """cls.from_pretrained(checkpoint), with a message that says what to do when it cannot be loaded."""
    folder = Path(checkpoint).expanduser()
    cause: OSError | None = None
    if folder.is_dir():
        try:
            return cls.from_pretrained(folder, **kwargs)
        except OSError as err:
            cause, reason = err, f"the folder {folder} exists but lacks files save_pretrained writes ({err})"
    elif _looks_like_path(checkpoint):
        reason = f"no folder {folder} exists"
    else:
        try:
            return cls.from_pretrained(str(checkpoint), **kwargs)
        except OSError as err:
            cause = err
            reason = f"no such folder exists and the Hugging Face hub could not be reached ({err})"
    raise RuntimeError(
        f"cannot load {cls.__name__} from teacher.checkpoint {str(checkpoint)!r}, "
        f"which is a Hugging Face hub id or a local folder: {reason}. To work offline, download the "
        "checkpoint where the hub can be reached (e.g. `hf download <hub id> --local-dir <folder>`, or "
        "save_pretrained of both the model and its feature extractor), copy that folder here and set "
        "teacher.checkpoint to it."
    ) from cause


def load_ast(checkpoint: str | Path, class_names: list[str]) -> ASTForAudioClassification:
    """An AST checkpoint (hub id or local folder) with a new, randomly initialised head for `class_names`.

    The checkpoint's own head (527 AudioSet classes) does not fit and is re-initialised; transformers
    prints a load report listing exactly those weights.
    """
    from transformers import ASTForAudioClassification

    # num_labels follows from id2label; passing it as well makes transformers 5 warn about the old label map.
    return _from_pretrained(
        ASTForAudioClassification,
        checkpoint,
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
        ignore_mismatched_sizes=True,
    )


class ASTFrontend(nn.Module):
    """AST's own feature extractor as a module: (batch, samples) waves -> (batch, max_length, mel bins).

    The extractor computes Kaldi fbanks, pads or cuts them to max_length frames and normalises them with
    its mean and std, clip by clip and outside autograd: exactly the inputs AST was trained on.
    """

    def __init__(self, extractor: ASTFeatureExtractor):
        super().__init__()
        self.extractor = extractor
        self.sample_rate = int(extractor.sampling_rate)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> ASTFrontend:
        """The feature extractor saved with a checkpoint (hub id or local folder)."""
        from transformers import ASTFeatureExtractor

        return cls(_from_pretrained(ASTFeatureExtractor, checkpoint))

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.dim() == 3 and waves.shape[1] == 1:
            waves = waves.squeeze(1)
        if waves.dim() != 2:
            raise ValueError(f"ASTFrontend: waves should be (batch, samples), not {tuple(waves.shape)}")
        clips = list(waves.detach().to("cpu", torch.float32).numpy())
        features = self.extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt")["input_values"]
        return features.to(waves.device)
