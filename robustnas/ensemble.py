"""Ensembles as ordinary nn.Modules, so every attack runs white-box through the whole ensemble.

Two constructions (METHODS.md section 3, Devaguptapu et al. 2021):
- `LogitEnsemble`: independently trained models whose logits are averaged (ensembles of random genotypes).
- `FeatureEnsemble`: copies of one architecture started from different initialisations (Kaiming-normal,
  Xavier-normal, Kaiming-uniform); their final feature maps, globally pooled, are averaged and one linear
  classifier reads the average. Pooling is linear, so this equals averaging the feature maps and then
  pooling. The study trains the whole module end to end with the one Trainer (see docs/study.md).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from robustnas.errors import UserError

INITS: dict[str, Callable[[Tensor], Tensor]] = {
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
}


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every conv and linear weight by `scheme` (biases to zero; BatchNorm untouched)."""
    if scheme not in INITS:
        raise UserError(f"unknown initialisation {scheme!r}; known: {', '.join(INITS)}")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                INITS[scheme](m.weight)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def split_classifier(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(body, classifier): the model's last linear layer is taken out and replaced by an identity, so the
    body returns the pooled features the classifier read (every model here ends with pooling + one linear)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no linear classifier to split off")
    name, linear = linears[-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return model, linear


class LogitEnsemble(nn.Module):
    """The mean of the members' logits."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise UserError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


class FeatureEnsemble(nn.Module):
    """classifier(mean of the bodies' pooled features)."""

    def __init__(self, bodies: Sequence[nn.Module], classifier: nn.Linear):
        super().__init__()
        if len(bodies) < 1:
            raise UserError("an ensemble needs at least one member")
        self.bodies = nn.ModuleList(bodies)
        self.classifier = classifier

    def features(self, x: Tensor) -> Tensor:
        return torch.stack([b(x) for b in self.bodies]).mean(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def feature_ensemble(build: Callable[[], nn.Module], inits: Sequence[str], seed: int) -> FeatureEnsemble:
    """One member per initialisation scheme, member k built under seed + k and re-initialised by inits[k];
    the shared classifier is the first member's (so it starts under the first scheme)."""
    bodies, classifier = [], None
    for k, scheme in enumerate(inits):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            body, linear = split_classifier(init_weights(build(), scheme))
        bodies.append(body)
        classifier = classifier if classifier is not None else linear
    if classifier is None:
        raise UserError("a feature ensemble needs at least one initialisation scheme")
    return FeatureEnsemble(bodies, classifier)
