"""The student: a torchvision MobileNet reading one-channel log-mel spectrograms (notebook 04).

`student.arch` picks MobileNetV3 small or large, or MobileNetV2, and `student.width_mult` scales every
layer's channels. Two changes make the ImageNet network an audio model: the first convolution takes one
channel, and BatchNorm's running statistics follow the batches ten times faster (momentum 0.1).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from audiokd_lib.audio.features import LogMel, NormStats
from audiokd_lib.core.params import Params, StudentParams
from audiokd_lib.models.classifier import Classifier, Normalise

STUDENT_BUILDERS = {
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
    "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
}


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
