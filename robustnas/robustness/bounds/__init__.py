"""Bound propagation internals for `robustnas.robustness.certify`: fx tracing + intervals (graph.py), CROWN (crown.py),
forward linear bounds (forward.py)."""

from robustnas.robustness.bounds.crown import backward_lower, tighten
from robustnas.robustness.bounds.forward import ForwardBounds
from robustnas.robustness.bounds.graph import BoundGraph, Step, TracedModel

__all__ = ["BoundGraph", "ForwardBounds", "Step", "TracedModel", "backward_lower", "tighten"]
