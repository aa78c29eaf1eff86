"""The sweep: a YAML test matrix expanded into cells, run as Ray Tune trials with early stopping."""

from altgrad.sweep.scheduler import RankCollapseScheduler
from altgrad.sweep.spec import Cell, SweepSpec, load_sweep, parse_sweep

__all__ = ["Cell", "RankCollapseScheduler", "SweepSpec", "load_sweep", "parse_sweep", "run_sweep"]


def run_sweep(*args, **kwargs):
    """See :func:`altgrad.sweep.runner.run_sweep` (imported lazily: it starts Ray)."""
    from altgrad.sweep.runner import run_sweep as run

    return run(*args, **kwargs)
