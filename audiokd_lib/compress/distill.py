"""Knowledge distillation (Hinton et al., 2015): the loss, and the teacher's soft targets.

The student learns from the teacher's *softened* outputs as well as from the labels. Two ways to
get the teacher's logits for a batch (notebook 05): `cached` (computed once on the clean clips by
:mod:`audiokd_lib.compress.soft_labels`, then mixed with the inputs by mixup as probabilities) and
`consistent` (Beyer et al., 2022: the teacher sees exactly the augmented batch the student sees).
The training loop that calls these is :func:`audiokd_lib.training.fit`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from audiokd_lib.core.losses import hard_loss
from audiokd_lib.models.classifier import Classifier


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                      alpha: float, multilabel: bool = False) -> torch.Tensor:
    """Hinton distillation: alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * hard loss.

    The T^2 factor keeps the soft term's gradients on the same scale as the hard term's when T
    changes (soft gradients shrink as 1/T^2). For multi-label data every class is its own yes/no
    question: BCE against the teacher's sigmoid(z_t / T), mixed with the hard-label BCE.
    """
    t = temperature
    if multilabel:
        soft = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t))
    else:
        soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard_loss(student, targets, multilabel)


def soft_targets(teacher_logits: torch.Tensor, temperature: float, multilabel: bool) -> torch.Tensor:
    """The teacher's probabilities at temperature T: what mixup may mix (logits cannot be mixed)."""
    return torch.sigmoid(teacher_logits / temperature) if multilabel else F.softmax(teacher_logits / temperature, 1)


def logits_at(probs: torch.Tensor, temperature: float, multilabel: bool) -> torch.Tensor:
    """Logits z with softmax(z / T) (or sigmoid(z / T)) equal to `probs`: the inverse of soft_targets."""
    probs = probs.clamp(1e-7, 1 - 1e-7)
    return temperature * (torch.logit(probs) if multilabel else probs.log())


def check_shared_frontend(teacher: Classifier, student: Classifier) -> None:
    """Consistent distillation feeds the student's augmented features to the teacher: they must match."""
    if teacher.spec.get("features") != student.spec.get("features"):
        raise ValueError(f"consistent distillation needs a teacher that reads the student's features; "
                         f"{teacher.spec['identity']} has its own front end. Use kd.modes: [cached] for it")
