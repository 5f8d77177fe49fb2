"""Bound propagation internals for `robustnas.robustness.certify`: fx tracing + intervals (graph.py), CROWN (crown.py),
forward linear bounds (forward.py), zonotopes (zonotope.py)."""

from robustnas.robustness.bounds.crown import backward_lower, tighten
from robustnas.robustness.bounds.forward import ForwardBounds
from robustnas.robustness.bounds.graph import BoundGraph, Step, TracedModel
from robustnas.robustness.bounds.zonotope import ZonotopeBounds

__all__ = ["BoundGraph", "ForwardBounds", "Step", "TracedModel", "ZonotopeBounds", "backward_lower", "tighten"]
