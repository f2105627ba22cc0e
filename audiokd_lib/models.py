"""Models as one object: waveform in, logits out, and a checkpoint that is enough to use it alone.

Every model in the course (the teacher, the baseline student, the distilled students, later the
pruned ones) is a :class:`Classifier` made of three parts:

- a **front end** turning 32 kHz waveforms into features (a log-mel spectrogram for the MobileNets,
  AST's own Kaldi filter bank for AST), computed once per clip and cached for training;
- a fixed **normalisation** (per-mel-bin statistics of the training split for the students, the
  constants the pretrained teacher was trained with for the teacher);
- the **network** itself.

Training works on cached features (`model.head(features)`), and inference on audio (`model(wave)`).
A checkpoint stores the network's weights together with a `spec` (architecture, class names, front-end
settings, normalisation), so `audiokd classify` can rebuild the model from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from . import teachers
from .features import LogMel, NormStats
from .files import atomic_path
from .params import FeatureParams, Params, StudentParams

STUDENT_BUILDERS = {
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
}
# The EfficientAT teacher's front end: a log-mel with the Kaldi filter bank, then (x + 4.5) / 5.
EFFICIENTAT_FEATURES = {"sample_rate": 32000, "n_fft": 1024, "win_length": 800, "hop_length": 320, "n_mels": 128,
                        "f_min": 0.0, "f_max": 15000.0, "mel_scale": "kaldi", "preemphasis": 0.97}


class Normalise(nn.Module):
    """(x - shift) / scale, with per-mel-bin (n_mels,) or scalar shift and scale kept as buffers."""

    def __init__(self, shift: torch.Tensor | float = 0.0, scale: torch.Tensor | float = 1.0):
        super().__init__()
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).reshape(-1, 1))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class Classifier(nn.Module):
    """Front end + normalisation + network; `spec` says how to rebuild it from a checkpoint."""

    def __init__(self, spec: dict[str, Any], frontend: nn.Module, normalise: nn.Module, net: nn.Module):
        super().__init__()
        self.spec, self.frontend, self.normalise, self.net = spec, frontend, normalise, net

    @property
    def classes(self) -> list[str]:
        return self.spec["classes"]

    @property
    def sample_rate(self) -> int:
        return self.spec["sample_rate"]

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(batch, samples) waveforms -> (batch, 1, bins, frames) features, before normalisation."""
        return self.frontend(wave)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features; what training and evaluation on cached features call."""
        return self.net(self.normalise(features))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(wave))


# --------------------------------------------------------------------------- students


def student_net(sp: StudentParams, num_classes: int) -> nn.Module:
    """A torchvision MobileNet reading one-channel spectrograms, trained from scratch."""
    net = STUDENT_BUILDERS[sp.arch](width_mult=sp.width_mult, num_classes=num_classes)
    first = net.features[0][0]
    net.features[0][0] = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding, bias=False)
    # torchvision's MobileNetV3 uses BatchNorm momentum 0.01, tuned for 600-epoch ImageNet runs: in a
    # run of a few epochs the running statistics lag so far behind that validation sits at chance.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = sp.bn_momentum
    return net


PRUNABLE = (nn.Conv2d, nn.Linear)  # the layers whose weights pruning acts on (prune.py)


def prunable_layers(model: Classifier) -> list[nn.Module]:
    """Every convolution and linear layer of the network: what pruning removes weights from."""
    return [module for module in model.net.modules() if isinstance(module, PRUNABLE)]


def build_student(params: Params, classes: list[str], stats: NormStats, multilabel: bool = False,
                  seed: int | None = None) -> Classifier:
    """The student of the profile: log-mel front end, training-split normalisation, MobileNet.

    `seed` fixes the random initial weights, so a run's seed decides everything random about it.
    """
    if seed is not None:
        torch.manual_seed(seed)
    fp = params.features
    spec = {"kind": "student", "arch": params.student.arch, "width_mult": params.student.width_mult,
            "bn_momentum": params.student.bn_momentum, "classes": list(classes), "multilabel": multilabel,
            "features": fp.model_dump(), "sample_rate": fp.sample_rate, "clip_seconds": fp.clip_seconds}
    return Classifier(spec, LogMel(fp), Normalise(stats.mean, stats.std), student_net(params.student, len(classes)))


# --------------------------------------------------------------------------- teachers


def check_efficientat_features(fp: FeatureParams) -> None:
    """The EfficientAT weights only make sense on the front end they were trained with."""
    wrong = {k: (getattr(fp, k), v) for k, v in EFFICIENTAT_FEATURES.items() if getattr(fp, k) != v}
    if wrong:
        listed = ", ".join(f"features.{k} is {got!r} (needs {need!r})" for k, (got, need) in wrong.items())
        raise ValueError(f"the EfficientAT teacher was trained on another front end: {listed}. Set these in the "
                         "profile's `features` section, or use teacher.kind: ast")


def _efficientat(spec: dict[str, Any], net: nn.Module) -> Classifier:
    fp = FeatureParams(**spec["features"])
    return Classifier(spec, LogMel(fp), Normalise(-4.5, 5.0), net)


def pretrained_audioset(params: Params, progress: bool = True) -> Classifier:
    """The EfficientAT AudioSet tagger as published: 527 sigmoid outputs named by the AudioSet ontology."""
    from .weights import AUDIOSET_LABELS, KNOWN, fetch

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
    return _efficientat(spec, net).eval()


def build_teacher(params: Params, classes: list[str], multilabel: bool = False, progress: bool = True) -> Classifier:
    """The profile's pretrained teacher with a new head for our classes, ready to fine-tune."""
    tp = params.teacher
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
        model = Classifier(spec, frontend, nn.Identity(), _ASTLogits(net))
    teachers.set_trainable(model.net.model if tp.kind == "ast" else model.net, tp.finetune, tp.last_blocks)
    return model


class _ASTLogits(nn.Module):
    """AST returns an output object; the course's models return plain logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(input_values=features).logits


def teacher_identity(model: Classifier) -> str:
    """The name a table row, an MLflow tag and a cache file give the teacher."""
    return model.spec["identity"]


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: Classifier, path: str | Path, **extra: Any) -> Path:
    """Write spec + weights (+ anything in `extra`, e.g. metrics) atomically; return the path."""
    with atomic_path(path) as tmp:
        torch.save({"spec": model.spec, "state_dict": model.state_dict(), **extra}, tmp)
    return Path(path)


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The dict an audiokd checkpoint holds ("spec", "state_dict", extras), on the CPU; `what` names it in errors.

    Our own checkpoints hold only tensors, strings, numbers and lists: the safe loader suffices.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved["spec"]
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise ValueError(f"{path}: not an audiokd {what} ({err})") from None
    return saved


def load_checkpoint(path: str | Path) -> Classifier:
    """Rebuild a Classifier saved by :func:`save_checkpoint`, in eval mode, on the CPU.

    A channel-pruned model (spec "pruning" of kind "structured") comes back at its pruned widths.
    """
    saved = read_checkpoint(path)
    spec = saved["spec"]
    classes = spec["classes"]
    if spec["kind"] == "student":
        sp = StudentParams(arch=spec["arch"], width_mult=spec["width_mult"], bn_momentum=spec["bn_momentum"])
        fp = FeatureParams(**spec["features"])
        n_mels = fp.n_mels
        model = Classifier(spec, LogMel(fp), Normalise(torch.zeros(n_mels), torch.ones(n_mels)),
                           student_net(sp, len(classes)))
    elif spec["kind"] == "efficientat":
        model = _efficientat(spec, teachers.replace_head(teachers.efficientat_mobilenet(), len(classes)))
    elif spec["kind"] == "ast":
        from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

        net = ASTForAudioClassification(ASTConfig.from_dict(spec["ast_config"]))
        frontend = teachers.ASTFrontend(ASTFeatureExtractor.from_dict(spec["extractor"]))
        model = Classifier(spec, frontend, nn.Identity(), _ASTLogits(net))
    else:
        raise ValueError(f"{path}: unknown model kind {spec['kind']!r}")
    if spec.get("pruning", {}).get("kind") == "structured":
        _shrink_to(model.net, saved["state_dict"], prefix="net.")
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def _shrink_to(net: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Give each conv, BatchNorm and linear layer of `net` the shapes its weights have in `state_dict`.

    A channel-pruned network is narrower than the one its spec builds. Each layer gets empty tensors of
    the saved shapes (load_state_dict fills them) and the channel counts its forward reads; a depthwise
    convolution (one group per channel) keeps groups equal to its channels.
    """
    for name, module in net.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            continue
        weight = state_dict[f"{prefix}{name}.weight"]
        if isinstance(module, nn.Conv2d):
            if module.groups > 1 and module.groups == module.in_channels:
                module.groups = weight.shape[0]
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features = weight.shape[0]
        else:
            module.out_features, module.in_features = weight.shape
        for key, tensor in list(module._parameters.items()):
            if tensor is not None:
                module._parameters[key] = nn.Parameter(torch.empty_like(state_dict[f"{prefix}{name}.{key}"]))
        for key, tensor in list(module._buffers.items()):
            if tensor is not None:
                module._buffers[key] = torch.empty_like(state_dict[f"{prefix}{name}.{key}"])
