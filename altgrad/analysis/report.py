"""``altgrad report``: one markdown file whose sections answer the study's questions in order (the best
split per optimizer, where the ULP optimizers help, what fails first, how good the warnings are), then the
cross-format table and the plots, beside it as PNGs linked relatively so the folder travels whole."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from altgrad import results as tables
from altgrad.analysis.compare import benefit_table, best_split, matched_comparison
from altgrad.analysis.plots import (plot_benefit, plot_dynamics, plot_failure_order, plot_loss_curves, plot_ranks,
                                    plot_timeline, plot_warning_curves)
from altgrad.analysis.granularity import GRANULARITY, granularity_table, has_granularities, plot_granularity
from altgrad.analysis.protection import (MODE, has_protection, plot_protected_layer, protected_example,
                                         protection_table)
from altgrad.analysis.tables import (BASELINE, Results, _count, _ordered, cell_keys, format_optimizer_table,
                                     load_results, rank_trend, trial_config)
from altgrad.analysis.warnings import failure_labels, failure_order, warning_quality

NOT_RECORDED = "*Not recorded in these results.*"


def _pm(value: float, spread: float) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:.4g}" if pd.isna(spread) else f"{value:.4g} ± {spread:.2g}"


def _merge_spread(table: pd.DataFrame, pairs: list[tuple[str, str, str]]) -> pd.DataFrame:
    """A display copy with each (value, spread) column pair as one "value ± spread" text column."""
    shown = table.drop(columns=[spread for _, spread, _ in pairs])
    for value, spread, _ in pairs:
        shown[value] = [_pm(v, s) for v, s in zip(table[value], table[spread])]
    return shown.rename(columns={value: name for value, _, name in pairs})


def _display_cells(cells: pd.DataFrame) -> pd.DataFrame:
    return _merge_spread(cells, [(f"{m}_mean", f"{m}_std", m) for m in ("best_val_loss", "final_val_loss")])


def _ci(value, low, high) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:.4g}" if pd.isna(low) else f"{value:.4g} [{low:.4g}, {high:.4g}]"


def _merge_interval(table: pd.DataFrame, value: str, low: str, high: str, name: str) -> pd.DataFrame:
    """A display copy with (value, low, high) as one "value [low, high]" text column ``name``."""
    shown = table.drop(columns=[low, high])
    shown[value] = [_ci(*v) for v in zip(table[value], table[low], table[high])]
    return shown.rename(columns={value: name})


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table with four significant digits; NaN shows as "—"."""
    return tables.markdown_table(frame, floatfmt=".4g")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def _overview(results: Results) -> str:
    trials = results.trials
    statuses = _count(trials["status"]) or "none"
    lines = [f"Source: `{results.path}`. Trials: {len(trials)} ({statuses}). "
             f"Formats: {', '.join(_ordered(trials['format'])) or '—'}. "
             f"Optimizers: {', '.join(_ordered(trials['optimizer'])) or '—'}. "
             f"Cells differ in: {', '.join(cell_keys(trials))}; seeds are the replicates."]
    running = int(trials["status"].eq("running").sum())
    if running:
        lines.append(f"\n{running} trial(s) have no summary yet (still running, or ended without one): their "
                     f"numbers come from the steps written so far.")
    metrics = sorted({rank_trend(trial_config(c)).metric for c in trials["config"]} or {"stable_rank"})
    lines.append(f"\nRanks: the online rank detector (`rank_trend.metric`: {', '.join(metrics)}) and the stable-rank "
                 f"plot read the quantized weight, the values the forward computes with; the `master_*` signals "
                 f"read the fp32 master weight.")
    return "\n".join(lines)


def _best_split_section(results: Results) -> list[str]:
    table = best_split(results)
    if table.empty:
        return ["*No trial reached the final step with an evaluation.*"]
    step = int(table["step"].iloc[0])
    shown = _merge_interval(table, "val_loss_mean", "val_loss_ci_low", "val_loss_ci_high", "val_loss [95% CI]")
    return [f"Val loss at step {step} (each trial's last evaluation by then), mean and 95% t-interval over the "
            f"seeds that reached it; each format at its best learning rate (*lr_chosen*: lr for {BASELINE}, ulp_lr "
            f"for the ULP optimizers, by mean best val loss). Cells whose trials all stopped earlier are missing "
            f"here; they are compared at their own step below.", _markdown(shown)]


def _benefit_section(results: Results, image) -> list[str]:
    benefit = benefit_table(results)
    if benefit.empty:
        return [f"*No format has both {BASELINE} and a ULP optimizer.*"]
    shown = _merge_interval(benefit, "difference", "ci_low", "ci_high", f"Δ val loss vs {BASELINE} [95% CI]")
    stopped = matched_comparison(results)
    stopped = stopped[stopped["stopped_here"]]
    parts = [f"Val loss minus {BASELINE}'s (negative = better), both at their best learning rate, at the matched "
             f"step: the last step every trial of both cells reached (*at_final_step* false: a stopped trial set "
             f"it). Welch's 95% interval over seeds; none for one seed.", _markdown(shown),
             image("benefit.png", plot_benefit(results), f"benefit over {BASELINE}")]
    if len(stopped):
        shown = _merge_interval(stopped.drop(columns=["stopped_here"]), "val_loss_mean", "val_loss_ci_low",
                                "val_loss_ci_high", "val_loss [95% CI]")
        parts += ["### Stopped trials against the others at the step they reached",
                  "*rank*: the cell's place among the *n_cells* cells at that step (1 = lowest val loss).",
                  _markdown(shown)]
    return parts


def _failure_section(results: Results, image) -> list[str]:
    labels = failure_labels(results)
    failed = labels[labels["failed"].astype(bool)]
    source = ("the trainer's labels" if labels["labelled_by"].eq("trainer").all() else
              "labels computed here from each trial's train loss with the default failure rules (the trainer "
              "did not record them)")
    parts = [f"{len(failed)} of {len(labels)} ended trials failed ({_count(failed['failure_kind']) or 'none'}); "
             f"{source}. The onset is where the loss left its best, not where the failure became obvious."]
    order = failure_order(results)
    if len(failed) and order.empty:
        parts.append("*No rule or signal fired before any failure's onset.*")
    elif len(order):
        parts += ["Rules and signals that fired before each failure's onset, first first.", _markdown(order),
                  image("failure_order.png", plot_failure_order(results),
                        "what fired before each failure, over its loss")]
    return parts


def _warning_section(results: Results, image) -> list[str]:
    quality = warning_quality(results)
    if quality.empty:
        return [NOT_RECORDED]
    parts = ["Per stopping rule (`rule:`, the scheduler's decision, `would_stop_step`) and signal (`signal:`, "
             "replayed offline at its default *threshold* of relative change): *precision* = in-time firings on "
             "failed trials ÷ trials fired; *recall* = failures warned before their onset ÷ failures; "
             "*false_alarm_rate* = healthy trials that fired ÷ healthy trials; *median_lead_steps* from first "
             "firing to onset; *n_late*: fired on a failing trial only at or after the onset (a miss)."]
    if not results.recorded("trials", "would_stop_step"):
        parts.append("Stopping-rule decisions: " + NOT_RECORDED)
    return [*parts, _markdown(quality), image("warning_curves.png", plot_warning_curves(results),
                                             "recall against false-alarm rate per signal")]


_CELL_GLOSSARY = (
    "One row per cell, over its seeds: losses as mean ± std over the seeds that have one (no std for one "
    "seed); *outcomes* counts stop reasons (else statuses). *stall_ratio*: share of weight updates that left "
    "the 8-bit weight unchanged; *flip_rate*: share of weights whose 8-bit value changed, per step; "
    "*overflow/underflow_frac*: share of quantized values beyond the format's range / flushed to zero. "
    "*rank_drop:&lt;layer&gt;*: stable rank at the last check ÷ at the first check after the rank detector's "
    "warm-up (1 = kept, 0.5 = halved), averaged over blocks."
)


def _granularity_section(results: Results, image) -> list[str]:
    """Each format × optimizer under every scaling granularity of the matrix; nothing without that axis."""
    if not has_granularities(results):
        return []
    table = granularity_table(results)
    shown = table.drop(columns=[c for c in table if c.endswith(" n")])
    losses = [(c[:-len(" mean")], c) for c in table if c.endswith(" mean")]  # ("block", "block mean")
    differences = [(c, c) for c in table if c.endswith(" - tensor")]
    for name, value in losses + differences:
        shown = _merge_interval(shown, value, f"{name} ci_low", f"{name} ci_high", f"{name} [95% CI]")
    return ["## Per tensor or in blocks: does the best split change?",
            f"Val loss at the final step per `{GRANULARITY}` (mean and 95% t-interval over the seeds that reached "
            f"it; each cell at its best learning rate), the format's *rank* among the formats under that scaling, "
            f"and the finer scaling minus per tensor (Welch's 95% interval; negative = it trains better).",
            _markdown(shown),
            image("granularity.png", plot_granularity(results), "val loss per format under each granularity")]


def _protection_section(results: Results, image) -> list[str]:
    """Protected cells against the same cells unprotected, same seeds; nothing without both."""
    if not has_protection(results):
        return []
    table = protection_table(results)
    shown = table.drop(columns=[f"n_{loss}" for loss in ("final_val_loss", "best_val_loss")])
    for loss in ("final_val_loss", "best_val_loss"):
        shown = _merge_interval(shown, f"{loss}_mean", f"{loss}_ci_low", f"{loss}_ci_high", f"{loss} [95% CI]")
    shown = _merge_interval(shown, "final_val_loss_vs_off", "final_val_loss_vs_off_ci_low",
                            "final_val_loss_vs_off_ci_high", "Δ final vs off [95% CI]")
    totals = table.groupby(MODE, sort=False)[["n_failed", "n_seeds"]].sum()
    overall = "; ".join(f"{mode}: {int(t.n_failed)} of {int(t.n_seeds)} trials failed" for mode, t in totals.iterrows())
    parts = ["## Does protection help?", f"Each cell unprotected (`{MODE}: off`) and protected, over the same seeds ({overall}). "
             f"*failure_rate*: share of seeds the trainer labelled failed; losses: mean and 95% t-interval over "
             f"the seeds with a finite one (a failed run has none); *Δ final vs off*: protected minus "
             f"unprotected, Welch's 95% interval (negative = protection helps).", _markdown(shown)]
    example = protected_example(results)
    if example:
        trial_id, layer, baseline = example
        parts.append(image("protected_layer.png", plot_protected_layer(results, trial_id, layer, baseline=baseline),
                           f"protected layer {layer} of {trial_id} over training"))
    return parts


def write_report(path: str | os.PathLike | Results, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots; returns the report's path."""
    results = path if isinstance(path, Results) else load_results(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def image(name: str, fig: Figure | None, alt: str) -> str:
        if fig is None:
            return f"*No data for this plot ({alt}).*"
        fig.savefig(out / name, dpi=110)
        return f"![{alt}]({name})"

    sections = [
        f"# altgrad report: {results.name}", _overview(results),
        "## The best split per optimizer", *_best_split_section(results),
        f"## Where the ULP optimizers help (against {BASELINE})", *_benefit_section(results, image),
        "## What fails first", *_failure_section(results, image),
        "## How good the warnings are", *_warning_section(results, image),
        *_granularity_section(results, image),
        *_protection_section(results, image),
        "## Formats × optimizers", _CELL_GLOSSARY, _markdown(_display_cells(format_optimizer_table(results))),
        "## Loss curves",
        *[image(f"loss_{_slug(fmt)}.png", fig, f"loss curves, {fmt}")
          for fmt, fig in plot_loss_curves(results).items()],
        "## Stall ratio and flip rate", image("dynamics.png", plot_dynamics(results), "stall ratio and flip rate"),
        "## Stable rank of the critical layers (quantized weight)",
        image("ranks.png", plot_ranks(results), "stable rank of critical layers"),
        "## Timeline", "Each trial from start to end, per node and slot.",
        image("timeline.png", plot_timeline(results), "trials over time per node and slot"),
    ]
    report = out / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    return report


def default_report_dir(path: str) -> Path:
    """``<path>/report`` for a local path; ``./<name>-report`` for an object-store URI, since the
    report is written locally."""
    if "://" in path:
        return Path(f"{path.rstrip('/').rsplit('/', 1)[-1]}-report")
    return Path(path) / "report"


def report_main(path: str, out: str | None = None) -> int:
    """``altgrad report PATH [--out DIR]``: print the cross-format table, write the report, say where.
    A path without results raises ConfigError (a ValueError, one line): the CLI exits 2."""
    from altgrad.analysis.terminal import terminal_table

    results = load_results(path)
    print(terminal_table(_display_cells(format_optimizer_table(results))))
    report = write_report(results, out or default_report_dir(path))
    print(f"\nreport: {report}")
    return 0
