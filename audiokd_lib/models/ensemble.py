"""Several fine-tuned teachers as one Classifier that averages their logits (notebook 03).

One fine-tuned mn04 is barely larger than the student it should teach. Averaging several copies
fine-tuned from different seeds gives a stronger and better-calibrated teacher (Lakshminarayanan et
al., 2017): EfficientAT's MobileNets were distilled from an ensemble of PaSST transformers, and the
CP-JKU DCASE 2023 system from six teachers. The ensemble is a :class:`Classifier` like every other
model, so evaluation, MACs, `audiokd classify`, `audiokd bench`, the cached soft labels and consistent
distillation (which calls `head` on augmented features) all take it unchanged.

Its members must read the same front end: `head` receives one feature tensor for all of them. Each
member keeps its own normalisation inside the ensemble's network, so students can be members too
(the tests use tiny ones). The spec lists every member's spec, which is what
:func:`audiokd_lib.models.checkpoints.load_checkpoint` rebuilds them from.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from audiokd_lib.models.classifier import Classifier

# What every member must agree on; the ensemble's own spec takes these from its members.
SHARED_KEYS = ("classes", "multilabel", "features", "sample_rate", "clip_seconds")


class MemberHead(nn.Module):
    """One member's normalisation and network: features in, logits out."""

    def __init__(self, normalise: nn.Module, net: nn.Module):
        super().__init__()
        self.normalise, self.net = normalise, net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(features))


class LogitMean(nn.Module):
    """The mean of the members' logits.

    Logits, not probabilities, are averaged, as for the PaSST ensemble EfficientAT distils from (its
    released teacher predictions are averaged logits). The mean of logits is itself a logit vector, so
    every later step reads it as it reads any model's output: softmax(mean / T) at a distillation
    temperature T is the renormalised geometric mean of the members' tempered distributions, and for
    multi-label data sigmoid(mean) is the geometric mean of their odds. Averaged probabilities would
    have to be turned back into logits (log p) before they could be tempered, cached or scored.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(features) for member in self.members]).mean(dim=0)


def member_name(spec: dict[str, Any]) -> str:
    """A member's identity, or its architecture for a model that has none (a student)."""
    return spec.get("identity") or f"{spec['arch']} x{spec['width_mult']}"


def seeds_text(seeds: list[int]) -> str:
    """[0, 1, 2] -> "seeds 0-2"; [0, 5] -> "seeds 0, 5"."""
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]}-{seeds[-1]}"
    return "seed " + str(seeds[0]) if len(seeds) == 1 else "seeds " + ", ".join(map(str, seeds))


def ensemble_identity(member_specs: list[dict[str, Any]], seeds: list[int]) -> str:
    """The name a table row, an MLflow tag and the soft-label cache give the ensemble."""
    names = list(dict.fromkeys(member_name(spec) for spec in member_specs))
    what = names[0] if len(names) == 1 else "; ".join(names)
    return f"ensemble of {len(member_specs)} {what}, each fine-tuned, {seeds_text(seeds)}, logits averaged"


def ensemble_spec(member_specs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The spec that rebuilds an ensemble: its members' specs, with what they share copied to the top."""
    if len(member_specs) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(member_specs)}")
    if len(seeds) != len(member_specs):
        raise ValueError(f"{len(member_specs)} members but {len(seeds)} seeds")
    first = member_specs[0]
    if first.get("features") is None:
        raise ValueError(f"ensemble members must read the log-mel front end; {member_name(first)} has its own "
                         "(an AST teacher): use one seed for it")
    for index, spec in enumerate(member_specs[1:], start=1):
        differ = [key for key in SHARED_KEYS if spec.get(key) != first.get(key)]
        if differ:
            raise ValueError(f"ensemble member {index} ({member_name(spec)}) differs from member 0 in {differ}: "
                             "members must share classes and front end")
    return {"kind": "ensemble", "average": "logits", "members": [copy.deepcopy(s) for s in member_specs],
            "seeds": list(seeds), **{key: copy.deepcopy(first[key]) for key in SHARED_KEYS},
            "identity": ensemble_identity(member_specs, seeds)}


def assemble(spec: dict[str, Any], members: list[Classifier]) -> Classifier:
    """The ensemble Classifier of `spec` around these members (used as they are, not copied)."""
    heads = [MemberHead(member.normalise, member.net) for member in members]
    return Classifier(spec, members[0].frontend, nn.Identity(), LogitMean(heads))


def build_ensemble(members: list[Classifier], seeds: list[int]) -> Classifier:
    """One Classifier averaging the logits of `members` (fine-tuned from `seeds`), in eval mode.

    The members are copied: training one of them further later does not change the ensemble.
    """
    spec = ensemble_spec([member.spec for member in members], seeds)
    return assemble(spec, [copy.deepcopy(member) for member in members]).eval()
