"""Bound propagation internals for `robustnas.certify`: fx tracing + intervals (graph.py), CROWN (crown.py)."""

from robustnas.bounds.crown import backward_lower, tighten
from robustnas.bounds.graph import BoundGraph, Step, TracedModel

__all__ = ["BoundGraph", "Step", "TracedModel", "backward_lower", "tighten"]
