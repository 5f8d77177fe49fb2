"""Search spaces, each registered by name (registry.py): DARTS cells (darts.py), the ARNAS three-cell
placement (arnas.py) and the TAM-NAS tiny blocks (tiny.py)."""

from robustnas.nets.spaces.arnas import ARNAS_PRIMITIVES, ArnasNetwork, ArnasSuperNet
from robustnas.nets.spaces.darts import PRIMITIVES, Genotype, MixedOp, Network, SearchCell, SuperNet, derive_cell
from robustnas.nets.spaces.registry import SPACES, Space, get_space, network_from_spec, parse_genotype, register
from robustnas.nets.spaces import tiny as _tiny  # noqa: F401  (registers the tiny space)

__all__ = [
    "ARNAS_PRIMITIVES",
    "ArnasNetwork",
    "ArnasSuperNet",
    "Genotype",
    "MixedOp",
    "Network",
    "PRIMITIVES",
    "SPACES",
    "SearchCell",
    "Space",
    "SuperNet",
    "derive_cell",
    "get_space",
    "network_from_spec",
    "parse_genotype",
    "register",
]
