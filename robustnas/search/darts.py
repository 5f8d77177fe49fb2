"""DARTS (Liu, Simonyan & Yang, ICLR 2019): descend the validation cross-entropy in the alphas, first or
second order, with the weights trained on natural examples, or on PGD / FGSM-RS examples for an
adversarially trained supernet (the baseline that robust-NAS papers compare against)."""

from __future__ import annotations

from typing import Literal

from robustnas.search.base import register
from robustnas.search.supernet import SupernetConfig, SupernetSearch


class DartsConfig(SupernetConfig):
    """DARTS settings (SupernetConfig has the published values); `weight_adv` picks natural or
    adversarial weight training."""

    space: Literal["darts", "arnas"] = "darts"
    weight_adv: Literal["none", "pgd", "fgsm-rs"] = "none"  # DARTS: natural training


@register
class Darts(SupernetSearch):
    """The loop of SupernetSearch with its default alpha step: grad_alpha CE(x_val)."""

    name = "darts"
    Config = DartsConfig
