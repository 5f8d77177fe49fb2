"""robustnas: search, adversarially train and honestly evaluate robust architectures."""

import os as _os

# OpenMP's worker threads sleep when a parallel region ends instead of spinning (libgomp's default spins up to
# 300,000 iterations). These networks run thousands of tiny parallel regions a step, and beside one busy
# process on 2 cores the spinning made a 2-thread run 2.8-4.9x slower, passive 1.1-1.2x; idle, passive costs
# 17-35% (benchmarks/bench_threads.py, docs/performance.md; GOMP_SPINCOUNT=300000 restores the spinning). libgomp reads the variable when torch loads it, so it is set here, before any import
# of torch by this package; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["evaluate", "Evaluation"]


def __getattr__(name: str):
    """robustnas.evaluate / robustnas.Evaluation (app/api.py), imported on first use so that `import robustnas`
    stays light and sets the OpenMP policy above before torch loads."""
    if name in __all__:
        from robustnas.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'robustnas' has no attribute {name!r}")
