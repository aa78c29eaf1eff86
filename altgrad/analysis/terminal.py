"""The cross-format table as ``altgrad report`` prints it: cut to fit a terminal. The report's markdown
keeps every column; the terminal gets the cell's keys, its seeds and best val loss, then as many of the
other columns as fit, in the order of :data:`OPTIONAL`."""

from __future__ import annotations

import textwrap

import pandas as pd

from altgrad import results as tables
from altgrad.analysis.tables import RANK_DROP

TERMINAL_WIDTH = 120
# The display table's columns shown in a terminal (display name -> short header), most wanted first;
# the rest of them are dropped from the end until the table fits.
ALWAYS = {"n_seeds": "seeds", "best_val_loss": "best val loss"}
OPTIONAL = {"outcomes": "outcomes", "steps_completed": "steps", "stall_ratio": "stall", "flip_rate": "flips",
            "min_rank_drop": "min rank_drop"}
# The longest text a key (header or value) or outcome keeps (a layer map can be long), tried in turn before
# clipping lines.
TEXT_LIMITS = (24, 16, 10)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _key_header(key: str, limit: int) -> str:
    """A long dotted key keeps its end, the specific part: "…critical_drop_threshold"."""
    return key if len(key) <= limit else "…" + key[1 - limit:]


def _cell_text(value, limit: int):
    if pd.isna(value):
        return value
    return _clip(f"{value:.4g}" if isinstance(value, float) else str(value), limit)


def terminal_table(cells: pd.DataFrame, width: int = TERMINAL_WIDTH) -> str:
    """``cells`` (the report's display table: its keys first, then ``n_seeds`` and the rest) as a pipe
    table no wider than ``width``: the per-layer rank drops as their minimum (the worst layer kept),
    and where it is still too wide, fewer optional columns, then shorter text, then clipped lines. A
    closing line names what was left out."""
    keys = list(cells.columns[: cells.columns.get_loc("n_seeds")])
    drops = [c for c in cells if c.startswith(RANK_DROP)]
    source = cells.assign(min_rank_drop=cells[drops].astype(float).min(axis=1) if drops else float("nan"))
    optional = [c for c in OPTIONAL if c in source]
    for limit in TEXT_LIMITS:
        shown = source.assign(**{c: source[c].map(lambda v: _cell_text(v, limit))
                                  for c in [*keys, "outcomes"] if c in source})
        for kept in range(len(optional), -1, -1):
            columns = {**{k: _key_header(k, limit) for k in keys}, **ALWAYS,
                       **{c: OPTIONAL[c] for c in optional[:kept]}}
            text = tables.markdown_table(shown[list(columns)].rename(columns=columns), floatfmt=".4g")
            if max(map(len, text.splitlines())) <= width:
                return text + _left_out(cells, columns, width)
    clipped = "\n".join(_clip(line, width) for line in text.splitlines())
    return clipped + _left_out(cells, columns, width)


def _left_out(cells: pd.DataFrame, columns: dict, width: int) -> str:
    shown = set(columns) | ({c for c in cells if c.startswith(RANK_DROP)} if "min_rank_drop" in columns else set())
    absent = [c for c in cells if c not in shown]
    if not absent:
        return ""
    grouped = [c for c in absent if not c.startswith(RANK_DROP)] + (
        [f"{RANK_DROP}<layer>"] if any(c.startswith(RANK_DROP) for c in absent) else [])
    note = f"Left out here (report.md has every column): {', '.join(grouped)}."
    return "\n" + "\n".join(textwrap.wrap(note, width))
