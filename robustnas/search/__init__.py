"""Search strategies. Every module of this package is imported here, so that each `@register`ed
strategy is known by name: a new method is one new file, nothing else changes."""

import importlib
import pkgutil

from robustnas.search.base import (STRATEGIES, SearchContext, SearchResult, Strategy, build_strategy, get_strategy,
                                   register)

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "SearchContext", "SearchResult", "Strategy", "build_strategy", "get_strategy", "register"]
