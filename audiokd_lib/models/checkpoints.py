"""Checkpoints that are enough to use a model alone: weights plus the `spec` that rebuilds it.

A checkpoint stores the network's weights together with a `spec` (architecture, class names, front-end
settings, normalisation, how it was pruned), so `audiokd classify` can rebuild any model of the course
from the file alone, a channel-pruned student at its pruned widths and a teacher ensemble with the specs
of all its members included. Our checkpoints hold only tensors, strings, numbers and lists, so they are
read with PyTorch's safe, weights-only loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from audiokd_lib.audio.features import LogMel
from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.params import FeatureParams, StudentParams
from audiokd_lib.models import ensemble, teachers
from audiokd_lib.models.classifier import Classifier, Normalise
from audiokd_lib.models.students import student_net
from audiokd_lib.models.teachers import ASTLogits, efficientat_classifier


def save_checkpoint(model: Classifier, path: str | Path, **extra: Any) -> Path:
    """Write spec + weights (+ anything in `extra`, e.g. metrics) atomically; return the path."""
    return write_checkpoint(path, model.spec, model.state_dict(), **extra)


def write_checkpoint(path: str | Path, spec: dict[str, Any], state_dict: dict[str, Any], **extra: Any) -> Path:
    """Write any network's spec + weights atomically (the beat trackers and embedding models use it too)."""
    with atomic_path(path) as tmp:
        torch.save({"spec": spec, "state_dict": state_dict, **extra}, tmp)
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


def read_kind(path: str | Path, kind: str, what: str, notebook: str) -> dict[str, Any]:
    """The spec and weights of a checkpoint whose spec is of `kind` (a beat tracker, an embedding model);
    a missing file or a checkpoint of another kind is an error naming `what` it should be and the
    `notebook` that writes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} here; train one in {notebook} (make run)")
    saved = read_checkpoint(path, what)
    if not isinstance(saved["spec"], dict) or saved["spec"].get("kind") != kind:
        raise ValueError(f"{path} is not a {what} checkpoint ({notebook} writes them)")
    return saved


def load_checkpoint(path: str | Path) -> Classifier:
    """Rebuild a Classifier saved by :func:`save_checkpoint`, in eval mode, on the CPU.

    A channel-pruned model (spec "pruning" of kind "structured") comes back at its pruned widths, and
    an ensemble (kind "ensemble") with every member its spec lists.
    """
    saved = read_checkpoint(path)
    spec, state_dict = saved["spec"], saved["state_dict"]
    try:
        model = build_model(spec)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if spec["kind"] == "ensemble":
        for index, (member_spec, head) in enumerate(zip(spec["members"], model.net.members)):
            if member_spec.get("pruning", {}).get("kind") == "structured":
                _shrink_to(head.net, state_dict, prefix=f"net.members.{index}.net.")
    elif spec.get("pruning", {}).get("kind") == "structured":
        _shrink_to(model.net, state_dict, prefix="net.")
    model.load_state_dict(state_dict)
    return model.eval()


def build_model(spec: dict[str, Any]) -> Classifier:
    """The untrained Classifier a spec describes, at the spec's full widths; weights come from a checkpoint."""
    classes = spec["classes"]
    if spec["kind"] == "student":
        sp = StudentParams(arch=spec["arch"], width_mult=spec["width_mult"], bn_momentum=spec["bn_momentum"])
        fp = FeatureParams(**spec["features"])
        n_mels = fp.n_mels
        return Classifier(spec, LogMel(fp), Normalise(torch.zeros(n_mels), torch.ones(n_mels)),
                          student_net(sp, len(classes)))
    if spec["kind"] == "efficientat":
        return efficientat_classifier(spec, teachers.replace_head(teachers.efficientat_mobilenet(), len(classes)))
    if spec["kind"] == "ast":
        from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

        net = ASTForAudioClassification(ASTConfig.from_dict(spec["ast_config"]))
        frontend = teachers.ASTFrontend(ASTFeatureExtractor.from_dict(spec["extractor"]))
        return Classifier(spec, frontend, nn.Identity(), ASTLogits(net))
    if spec["kind"] == "ensemble":
        return ensemble.assemble(spec, [build_model(member) for member in spec["members"]])
    raise ValueError(f"unknown model kind {spec['kind']!r}")


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
