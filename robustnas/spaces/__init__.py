"""Search spaces: DARTS cells (darts.py) and the ARNAS three-cell placement (arnas.py)."""

from robustnas.spaces.arnas import ARNAS_PRIMITIVES, ArnasNetwork, ArnasSuperNet
from robustnas.spaces.darts import PRIMITIVES, Genotype, MixedOp, Network, SearchCell, SuperNet, derive_cell

__all__ = [
    "ARNAS_PRIMITIVES",
    "ArnasNetwork",
    "ArnasSuperNet",
    "Genotype",
    "MixedOp",
    "Network",
    "PRIMITIVES",
    "SearchCell",
    "SuperNet",
    "derive_cell",
]
