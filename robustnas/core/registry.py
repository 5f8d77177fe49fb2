"""The one registry shape: a name -> entry table for one kind of thing (search spaces, search methods), filled
by `add` when a module is imported and read by `lookup`, which turns an unknown name into one line for the user."""

from __future__ import annotations

from typing import Generic, TypeVar

from robustnas.core.errors import UserError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, kind: str, field: str = ""):
        super().__init__()
        self.kind = kind  # "search space", "search method": how the one-line error names an entry
        self.field = field  # the file field that names an entry ("space" of a genotype), quoted in the error

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
            what = f"{self.field!r} is {name!r}, an unknown {self.kind}" if self.field else f"unknown {self.kind} {name!r}"
            raise UserError(f"{what}; known: {', '.join(sorted(self))}") from None
