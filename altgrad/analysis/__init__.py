"""From the result tables to answers: which 8-bit split trains best under which optimizer (at matched steps,
with intervals over seeds, each at its best learning rate), where the ULP optimizers help, what fails first,
and how good the warnings are; the plots and one markdown report.

* :mod:`.tables`: loading (:func:`load_results`), the matrix's cells, per-trial and per-cell tables;
* :mod:`.compare`: matched-step comparisons and confidence intervals;
* :mod:`.signals`: the candidate warning signals and their offline detector;
* :mod:`.warnings`: failure labels, warning quality, what fails first;
* :mod:`.plots` and :mod:`.report`: figures and ``altgrad report``.
"""

from altgrad.analysis.compare import (benefit_table, best_lr_cells, best_split, matched_comparison, t_interval,
                                      val_loss_at, welch_interval)
from altgrad.analysis.signals import SIGNALS, Signal, firing_steps, register, relative_change
from altgrad.analysis.tables import (Results, cell_keys, format_optimizer_table, layer_kind, load_results,
                                     trial_config, trial_table, with_axes)
from altgrad.analysis.warnings import failure_labels, failure_order, warning_curve, warning_quality
from altgrad.analysis.plots import (plot_benefit, plot_dynamics, plot_failure_order, plot_loss_curves,
                                    plot_ranks, plot_timeline, plot_warning_curves, trial_lanes)
from altgrad.analysis.granularity import granularity_table, plot_granularity
from altgrad.analysis.protection import plot_protected_layer, protected_example, protection_table
from altgrad.analysis.report import default_report_dir, report_main, write_report

__all__ = [
    "Results", "SIGNALS", "Signal", "benefit_table", "best_lr_cells", "best_split", "cell_keys",
    "default_report_dir", "failure_labels", "failure_order", "firing_steps", "format_optimizer_table",
    "granularity_table", "layer_kind", "load_results", "matched_comparison", "plot_benefit", "plot_dynamics",
    "plot_failure_order", "plot_granularity", "plot_loss_curves", "plot_protected_layer", "plot_ranks",
    "plot_timeline", "plot_warning_curves", "protected_example", "protection_table", "register",
    "relative_change", "report_main", "t_interval", "trial_config", "trial_lanes", "trial_table", "val_loss_at",
    "warning_curve", "warning_quality", "welch_interval", "with_axes", "write_report",
]
