"""The one registry shape: a name -> entry table for one kind of thing (search spaces, search methods), filled
by `add` when a module is imported and read by `lookup`, which turns an unknown name into one line for the user."""

from __future__ import annotations

from typing import Generic, TypeVar

from robustnas.core.errors import UserError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "search space", "search method": how the one-line error names an entry

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a second registration under one name is a programming error."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice ({self[name]!r}, {entry!r})")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}") from None
