"""From the result tables to answers (see :mod:`altgrad.analysis.tables` and its siblings)."""

from altgrad.analysis.tables import *  # noqa: F401,F403
