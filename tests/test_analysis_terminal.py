"""`altgrad report`'s terminal table on a constructed sweep with many axes and long values: every printed
line fits 120 columns, every cell is still one row naming its format and optimizer, the report keeps
every column, and the rank drops shown are the worst layer's."""

import itertools
import json
import re

import pandas as pd
import pytest

from altgrad import analysis, results
from altgrad.analysis.terminal import terminal_table

LAYERS = ['{"lm_head": "bf16", "transformer.h.*.mlp.*": "E3M4"}', "all"]
CRITICAL = ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "lm_head")


@pytest.fixture
def root(tmp_path):
    """4 axes besides the seed (layers, lr, ulp_lr, a rank-trend threshold), 2 seeds, 3 critical layers."""
    root = tmp_path / "wide"
    axes = itertools.product(("E4M3", "E5M2"), ("adamw", "manifold_adamw"), LAYERS, (1e-3, 3e-3), (0.25, 0.5),
                             (0.02, 0.9), (0, 1))
    for number, (fmt, optimizer, layers, lr, ulp_lr, threshold, seed) in enumerate(axes):
        trial_id = f"t{number}"
        config = {"format": fmt, "optimizer": optimizer, "layers": layers, "lr": lr, "ulp_lr": ulp_lr, "seed": seed,
                  "rank_trend": {"warmup_steps": 0, "critical_drop_threshold": threshold}}
        loss = 2.0 + number / 1000
        results.write_rows(str(root), "trials", trial_id, [{
            "trial_id": trial_id, "format": fmt, "optimizer": optimizer, "layers": layers, "lr": lr,
            "ulp_lr": ulp_lr, "seed": seed, "status": "completed", "steps_completed": 20, "steps_planned": 20,
            "best_val_loss": loss, "final_val_loss": loss + 0.01, "config": json.dumps(config)}])
        results.write_rows(str(root), "steps", trial_id, [
            {"trial_id": trial_id, "step": step, "train_loss": loss, "val_loss": loss if step % 10 == 0 else None,
             "stall_ratio": 0.123456, "flips": 7, "updates": 100, "overflow_frac": 1e-5, "underflow_frac": 3e-3}
            for step in range(1, 21)])
        results.write_rows(str(root), "layers", trial_id, [
            {"trial_id": trial_id, "step": step, "layer": layer, "critical": True,
             "stable_rank": 10.0 * (1 - 0.1 * k * (step == 20))}  # last check / first: 1, 0.9, 0.8
            for step in (10, 20) for k, layer in enumerate(CRITICAL)])
    return root


def test_the_terminal_table_fits_120_columns_and_the_report_keeps_every_column(root, tmp_path, capsys):
    assert analysis.report_main(str(root), str(tmp_path / "report")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert max(map(len, printed)) <= 120, max(printed, key=len)
    rows = [line for line in printed if line.startswith("| E")]
    cells = analysis.format_optimizer_table(analysis.load_results(str(root)))
    assert len(rows) == len(cells) == 64  # 2 formats x 2 optimizers x 2 x 2 x 2 x 2 axes: one row each
    assert sum("| E5M2" in line and "manifold_adamw" in line for line in rows) == 16
    markdown = (tmp_path / "report" / "report.md").read_text()
    wide = [line for line in markdown.splitlines() if line.startswith("| format")]
    assert any("final_val_loss" in line and "rank_drop:lm_head" in line for line in wide)
    assert max(map(len, wide)) > 120  # the report was too wide to print: the terminal had to cut it


def test_the_worst_layers_rank_drop_is_shown_and_what_is_left_out_is_named():
    cells = pd.DataFrame({"format": ["E4M3"], "optimizer": ["grid"], "n_seeds": [2], "best_val_loss": ["2.1 ± 0.01"],
                          "final_val_loss": ["2.2 ± 0.01"], "steps_completed": [300.0], "outcomes": ["completed 2"],
                          "stall_ratio": [0.5], "flip_rate": [0.2], "overflow_frac": [0.0], "underflow_frac": [0.01],
                          "rank_drop:lm_head": [0.9], "rank_drop:mlp.c_proj": [0.6]})
    text = terminal_table(cells)
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert header == ["format", "optimizer", "seeds", "best val loss", "outcomes", "steps", "stall", "flips",
                      "min rank_drop"]
    assert re.search(r"\|\s+0\.6\s+\|$", text.splitlines()[2])  # min(0.9, 0.6)
    assert "final_val_loss, overflow_frac, underflow_frac" in text.splitlines()[-1]
    narrow = terminal_table(cells, width=60)
    assert max(map(len, narrow.splitlines())) <= 60
    assert "E4M3" in narrow.splitlines()[2] and "2.1 ± 0.01" in narrow.splitlines()[2]
    assert "outcomes" in narrow.splitlines()[-2] + narrow.splitlines()[-1]  # dropped, and said so
