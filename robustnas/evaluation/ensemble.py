"""Ensembles as ordinary nn.Modules, so every attack runs white-box through the whole ensemble.

Two constructions (METHODS.md section 3, Devaguptapu et al. 2021; public code tdchaitanya/nas-robustness,
darts/model_ensemble.py):
- `LogitEnsemble`: independently trained models whose logits are averaged (ensembles of random genotypes).
- `FeatureEnsemble`: copies of one architecture started from different initialisations (Kaiming-normal,
  Xavier-normal, Kaiming-uniform); their final feature maps, globally pooled, are combined and one linear
  classifier reads the result. `combine="mean"` averages them (the public DARTSEnsembleAverage);
  `combine="one_by_one"` concatenates them and maps k*F features to F by a learned affine layer (the public
  DARTSEnsembleOneByOne's 1x1 convolution). Pooling is linear, so pooling first changes neither: the mean
  of the maps pooled is the mean of the pooled maps, and a 1x1 conv on the concatenated maps followed by
  pooling is the same affine layer on the pooled features. The study trains the whole module end to end.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from robustnas.core.errors import UserError
from robustnas.nets.size import count_params

# scheme -> f(weight, mode); mode is the Kaiming fan ("fan_out" in the public code), Xavier uses both fans
INITS: dict[str, Callable[[Tensor, str], Tensor]] = {
    "kaiming_normal": lambda w, mode: nn.init.kaiming_normal_(w, mode=mode, nonlinearity="relu"),
    "xavier_normal": lambda w, mode: nn.init.xavier_normal_(w),
    "kaiming_uniform": lambda w, mode: nn.init.kaiming_uniform_(w, mode=mode, nonlinearity="relu"),
}
INIT_MODES = ("fan_out", "fan_in")      # fan_out: the public code; fan_in: robustnas before issue 14
INIT_LAYERS = ("conv", "conv_linear")   # conv: the public code; conv_linear: robustnas before issue 14
COMBINES = ("mean", "one_by_one")


def init_weights(model: nn.Module, scheme: str, mode: str = "fan_out", layers: str = "conv") -> nn.Module:
    """Re-initialise `model` by `scheme`. layers="conv" (the public code): Conv2d weights only, BatchNorm
    weight 1 and bias 0; Linear layers and conv biases keep PyTorch's defaults. layers="conv_linear": Conv2d
    and Linear weights, their biases zeroed, BatchNorm untouched."""
    if scheme not in INITS:
        raise UserError(f"unknown initialisation {scheme!r}; known: {', '.join(INITS)}")
    if mode not in INIT_MODES or layers not in INIT_LAYERS:
        raise UserError(f"init mode {mode!r} / layers {layers!r}: use {INIT_MODES} / {INIT_LAYERS}")
    kinds = (nn.Conv2d,) if layers == "conv" else (nn.Conv2d, nn.Linear)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, kinds):
                INITS[scheme](m.weight, mode)
                if layers == "conv_linear" and m.bias is not None:
                    m.bias.zero_()
            elif layers == "conv" and isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
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
    """classifier(combined pooled features of the bodies): their mean, or (one_by_one) an affine map of
    their concatenation back to one body's width."""

    def __init__(self, bodies: Sequence[nn.Module], classifier: nn.Linear, combine: str = "mean"):
        super().__init__()
        if len(bodies) < 1:
            raise UserError("an ensemble needs at least one member")
        if combine not in COMBINES:
            raise UserError(f"unknown feature combination {combine!r}; known: {', '.join(COMBINES)}")
        self.bodies = nn.ModuleList(bodies)
        width = classifier.in_features
        self.combine = nn.Linear(len(bodies) * width, width) if combine == "one_by_one" else None
        self.classifier = classifier

    def features(self, x: Tensor) -> Tensor:
        feats = [b(x) for b in self.bodies]
        if self.combine is None:
            return torch.stack(feats).mean(0)
        return self.combine(torch.cat(feats, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def feature_ensemble(build: Callable[[], nn.Module], inits: Sequence[str], seed: int, combine: str = "mean",
                     mode: str = "fan_out", layers: str = "conv") -> FeatureEnsemble:
    """One member per initialisation scheme, member k built under seed + k and re-initialised by inits[k];
    the shared classifier is the first member's (at PyTorch's default under layers="conv", as the public
    code's fresh nn.Linear; under the first scheme with "conv_linear"); the one_by_one layer is built last,
    under seed + len(inits), at PyTorch's default (as the public code's)."""
    if not inits:
        raise UserError("a feature ensemble needs at least one initialisation scheme")
    bodies, classifier = [], None
    for k, scheme in enumerate(inits):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            body, linear = split_classifier(init_weights(build(), scheme, mode, layers))
        bodies.append(body)
        classifier = classifier if classifier is not None else linear
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + len(inits))
        return FeatureEnsemble(bodies, classifier, combine)


def feature_ensemble_params(member: nn.Module, k: int, combine: str = "mean") -> int:
    """Parameters of a feature ensemble of k copies of `member` (k bodies, one classifier, the combine
    layer), counted without building it; `member` is left whole."""
    linear = [m for m in member.modules() if isinstance(m, nn.Linear)][-1]
    width, head = linear.in_features, count_params(linear)
    extra = k * width * width + width if combine == "one_by_one" else 0
    return k * (count_params(member) - head) + head + extra
