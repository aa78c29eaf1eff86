"""Protection in a sweep: ``protection.mode`` as a matrix axis (kept apart from the seeds), the rank-collapse
rule's ``action: protect`` (the cells protect on the detector's warning, the scheduler records instead of
stopping, grid is refused), the protected/unprotected table by hand, and a trainer run where
``trigger: rank_warning`` protects exactly the watched layers the detector warned for."""

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure

from altgrad.analysis import Results, cell_keys, plot_protected_layer, protected_example, protection_table
from altgrad.cli import main
from altgrad.config import ConfigError, parse_cell
from altgrad.sweep import RankCollapseScheduler, load_sweep, parse_sweep
from altgrad.trainer import Trainer

TINY_TRIAL = {"steps": 30, "batch_size": 8, "eval_every": 10, "eval_iters": 2, "warmup_steps": 5,
              "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
              "diagnostics": {"flips_every": 1, "rank_every": 10}}


def write_sweep(tmp_path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


AXIS_SWEEP = """
name: p
trial: {steps: 30, model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 32}, protection: {every: 5}}
matrix:
  format: [E4M3]
  optimizer: [adamw, manifold_adamw]
  protection.mode: [off, adaptive_svd]
  seed: [0, 1]
exclude:
  - {optimizer: adamw, protection.mode: off}
"""


# ---- the axis -------------------------------------------------------------------------------------

def test_a_bare_off_on_the_mode_axis_is_the_off_mode_and_its_cells_stay_apart_from_the_seeds(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, AXIS_SWEEP))
    # YAML reads the bare `off` as false: the config, the id and the exclusion all see "off".
    assert spec.cell_ids == ["E4M3_adamw_adaptive_svd_s0", "E4M3_adamw_adaptive_svd_s1",
                             "E4M3_manifold_adamw_off_s0", "E4M3_manifold_adamw_off_s1",
                             "E4M3_manifold_adamw_adaptive_svd_s0", "E4M3_manifold_adamw_adaptive_svd_s1"]
    modes = {cell.cell_id: cell.config.protection.mode for cell in spec.cells}
    assert modes["E4M3_manifold_adamw_off_s0"] == "off" and modes["E4M3_adamw_adaptive_svd_s1"] == "adaptive_svd"
    assert all(cell.config.protection.every == 5 for cell in spec.cells)
    # The trials table's config (as Trainer.summary writes it) makes the mode a cell key, not a replicate.
    trials = pd.DataFrame([{"trial_id": c.cell_id, "format": c.config.format, "optimizer": c.config.optimizer,
                            "seed": c.config.seed, "lr": c.config.lr, "ulp_lr": c.config.ulp_lr, "layers": "all",
                            "config": json.dumps(c.config.to_dict(), sort_keys=True, default=list)}
                           for c in spec.cells])
    assert cell_keys(trials) == ["format", "optimizer", "protection.mode"]


def test_the_mode_axis_refuses_grid_cells_in_one_line(tmp_path, capsys):
    path = write_sweep(tmp_path, AXIS_SWEEP.replace("[adamw, manifold_adamw]", "[adamw, grid]"))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "protection.mode" in err[0] and "grid" in err[0], err
    assert not (tmp_path / "out").exists()


# ---- action: protect ------------------------------------------------------------------------------

def protect_sweep(**changes) -> dict:
    return {"name": "p", "trial": TINY_TRIAL, "matrix": {"format": ["E4M3"], "optimizer": ["adamw", "manifold_adamw"]},
            "early_stopping": {"mode": "act", "rank_collapse": {"patience": 2, "action": "protect"}}, **changes}


def test_action_protect_makes_every_cell_protect_on_the_rank_warning_and_stop_is_the_default():
    spec = parse_sweep(protect_sweep())
    assert {(c.config.protection.mode, c.config.protection.trigger) for c in spec.cells} == {
        ("adaptive_svd", "rank_warning")}
    plain = parse_sweep(protect_sweep(early_stopping={"rank_collapse": {"patience": 2}}))
    assert {(c.config.protection.mode, c.config.protection.trigger) for c in plain.cells} == {("off", "alignment")}
    kept = parse_sweep(protect_sweep(trial={**TINY_TRIAL, "protection": {"every": 7, "layers": ["lm_head"]}}))
    assert all(c.config.protection.every == 7 and c.config.protection.layers == ("lm_head",) for c in kept.cells)


@pytest.mark.parametrize("change,fragment", [
    ({"matrix": {"format": ["E4M3"], "optimizer": ["adamw", "grid"]}}, "grid"),
    ({"trial": {**TINY_TRIAL, "protection": {"mode": False}}}, "protection.mode=off"),
    ({"trial": {**TINY_TRIAL, "protection": {"trigger": "alignment"}}}, "protection.trigger=alignment"),
    ({"early_stopping": {"rank_collapse": {"action": "shield"}}}, "shield"),
])
def test_action_protect_refuses_cells_it_cannot_protect_in_one_line_exit_2(change, fragment, tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(protect_sweep(**change), sort_keys=False))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.yaml" in err[0] and "early_stopping.rank_collapse.action" in err[0], err
    assert fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_rank_warning_trigger_without_rank_checks_is_refused():
    with pytest.raises(ConfigError, match="protection.trigger.*rank_every"):
        parse_cell({"protection": {"mode": "adaptive_svd", "trigger": "rank_warning"}, "diagnostics": {"rank_every": 0}})


def decide(scheduler, trial_id, **result):
    return scheduler.on_trial_result(None, SimpleNamespace(trial_id=trial_id), result)


@pytest.mark.parametrize("mode", ["act", "observe"])
def test_the_protecting_rule_records_its_decision_and_never_stops_for_rank_collapse(mode):
    decisions = []
    scheduler = RankCollapseScheduler(patience=2, mode=mode, action="protect",
                                      on_decision=lambda *args: decisions.append((args[0], args[1], args[3])))
    verdicts = [decide(scheduler, "a", step=s, train_loss=2.0, rank_warnings=1, rank_check_step=s) for s in (10, 20, 30)]
    assert verdicts == ["CONTINUE"] * 3
    assert decisions[0] == ("a", "rank_collapse (protected)", False)  # at the second warned check
    assert len(decisions) == 2
    # A non-finite loss still ends the trial.
    assert decide(scheduler, "a", step=31, train_loss=float("nan"), rank_warnings=1, rank_check_step=30) == "STOP"
    assert decisions[-1] == ("a", "diverged", True)


# ---- the table by hand ----------------------------------------------------------------------------

def results_of(rows: list[dict]) -> Results:
    """A constructed sweep: per row, a trial and its config (what with_axes reads the axes from)."""
    trials = []
    for row in rows:
        config = {"format": row["format"], "optimizer": row["optimizer"], "seed": row["seed"], "lr": 0.003,
                  "ulp_lr": row["ulp_lr"], "protection": {"mode": row["mode"]}}
        trials.append({"trial_id": row["trial_id"], "format": row["format"], "optimizer": row["optimizer"],
                       "seed": row["seed"], "lr": 0.003, "ulp_lr": row["ulp_lr"], "status": row["status"],
                       "steps_completed": row["steps"], "steps_planned": 400, "failed": row["failed"],
                       "failure_step": 20 if row["failed"] else None, "failure_kind": "non_finite" if row["failed"] else None,
                       "final_val_loss": row["final"], "best_val_loss": row["best"], "config": json.dumps(config)})
    trials = pd.DataFrame(trials).astype({"failed": "boolean", "failure_step": "Int64"})
    empty_steps = pd.DataFrame({"trial_id": pd.Series(dtype="string"), "step": pd.Series(dtype="Int64"),
                                "train_loss": pd.Series(dtype="float64"), "val_loss": pd.Series(dtype="float64")})
    empty_layers = pd.DataFrame({"trial_id": pd.Series(dtype="string"), "step": pd.Series(dtype="Int64"),
                                 "layer": pd.Series(dtype="string")})
    return Results("constructed", trials, empty_steps, empty_layers)


def constructed() -> Results:
    nan = float("nan")
    rows = []
    # E7M0 / ulp 1.5: off fails on all three seeds; protected fails on one, the others end at 2.5 and 2.7.
    for seed, (final_off, final_on, failed_on) in enumerate([(nan, 2.5, False), (nan, 2.7, False), (nan, nan, True)]):
        rows.append(dict(trial_id=f"E7M0_1.5_off_s{seed}", format="E7M0", optimizer="manifold_adamw", ulp_lr=1.5,
                         seed=seed, mode="off", status="stopped", steps=30, failed=True, final=final_off, best=None))
        rows.append(dict(trial_id=f"E7M0_1.5_on_s{seed}", format="E7M0", optimizer="manifold_adamw", ulp_lr=1.5,
                         seed=seed, mode="adaptive_svd", status="stopped" if failed_on else "completed",
                         steps=40 if failed_on else 400, failed=failed_on, final=final_on,
                         best=None if failed_on else final_on - 0.1))
    # E6M1 / ulp 2.5: both healthy; protection makes it worse by 0.2 on each seed.
    for seed, final in enumerate([2.0, 2.2]):
        for mode, shift in (("off", 0.0), ("adaptive_svd", 0.2)):
            rows.append(dict(trial_id=f"E6M1_2.5_{mode}_s{seed}", format="E6M1", optimizer="manifold_adamw",
                             ulp_lr=2.5, seed=seed, mode=mode, status="completed", steps=400, failed=False,
                             final=final + shift, best=final + shift))
    return results_of(rows)


def test_protection_table_pairs_each_cell_with_itself_protected_and_counts_by_hand():
    table = protection_table(constructed()).set_index(["format", "protection.mode"])
    assert list(table.index) == [("E6M1", "off"), ("E6M1", "adaptive_svd"), ("E7M0", "off"), ("E7M0", "adaptive_svd")]
    off, on = table.loc[("E7M0", "off")], table.loc[("E7M0", "adaptive_svd")]
    assert (off["n_seeds"], off["n_failed"], off["failure_rate"]) == (3, 3, 1.0)
    assert (on["n_seeds"], on["n_failed"]) == (3, 1) and on["failure_rate"] == pytest.approx(1 / 3)
    # Losses over the seeds with a finite one: none unprotected, two protected (t-interval, 1 dof: 12.706).
    assert pd.isna(off["final_val_loss_mean"]) and off["n_final_val_loss"] == 0
    assert on["final_val_loss_mean"] == pytest.approx(2.6) and on["n_final_val_loss"] == 2
    half = 12.7062047 * (0.1 * 2**0.5) / 2**0.5
    assert (on["final_val_loss_ci_low"], on["final_val_loss_ci_high"]) == pytest.approx((2.6 - half, 2.6 + half))
    assert on["best_val_loss_mean"] == pytest.approx(2.5)
    assert pd.isna(on["final_val_loss_vs_off"])  # nothing to compare with
    healthy = table.loc[("E6M1", "adaptive_svd")]
    assert healthy["failure_rate"] == 0 and healthy["final_val_loss_vs_off"] == pytest.approx(0.2)
    # Equal spreads on both sides: Welch's interval is 0.2 ± t(2 dof) · sqrt(2 · 0.02 / 2).
    half = 4.30265273 * (2 * 0.02 / 2) ** 0.5
    assert (healthy["final_val_loss_vs_off_ci_low"], healthy["final_val_loss_vs_off_ci_high"]) == pytest.approx(
        (0.2 - half, 0.2 + half))
    assert pd.isna(table.loc[("E6M1", "off"), "final_val_loss_vs_off"])


def test_results_without_a_mode_axis_give_no_pairs_and_no_picture():
    paired = constructed()
    assert protection_table(Results("x", paired.trials.assign(config=None), paired.steps, paired.layers)).empty
    assert protected_example(paired) is None  # no layer rows at all


# ---- trigger: rank_warning in a real run -----------------------------------------------------------

def test_the_rank_warning_trigger_protects_exactly_the_watched_layers_the_detector_warned_for(tmp_path):
    """A hair-trigger detector (no warm-up, a 0.01% drop warns) on a seeded tiny run, protection checks
    too rare to release or cycle anything: a watched layer is protected from its first warning on, and
    never before; an unwatched one (mlp.c_proj) warns too and is never protected."""
    cell = parse_cell({**TINY_TRIAL, "steps": 40, "format": "E4M3", "seed": 3,
                       "rank_trend": {"warmup_steps": 0, "critical_drop_threshold": 0.0001, "drop_threshold": 0.0001},
                       "protection": {"mode": "adaptive_svd", "trigger": "rank_warning", "every": 1000,
                                      "layers": ["lm_head", "*.attn.c_proj"]}})
    trainer = Trainer(cell, trial_id="warned", results_root=str(tmp_path), progress=False)
    summary = trainer.run()
    assert summary["status"] == "completed"
    layers = pd.read_parquet(tmp_path / "layers").sort_values(["layer", "step"])
    watched = {"lm_head", "transformer.h.0.attn.c_proj"}
    first_warning = layers[layers["rank_warning"]].groupby("layer")["step"].min()
    assert watched & set(first_warning.index), "the hair trigger must warn for a watched layer"
    assert "transformer.h.0.mlp.c_proj" in first_warning.index, "and for the unwatched critical one"
    for name, own in layers.groupby("layer"):
        protected = own.loc[own["protected_rank"] > 0, "step"]
        if name in watched and name in first_warning.index:
            # Protected at the warned check itself (its row shows the switch) and at every check after.
            assert list(protected) == [s for s in own["step"] if s >= first_warning[name]], name
            switch = own[own["step"] == first_warning[name]].iloc[0]
            assert switch["principal_alignment"] is not None and 0 <= switch["principal_alignment"] <= 1
        else:
            assert protected.empty, name
    assert set(trainer.probes[-1].groups) == watched & set(first_warning.index)


def test_the_protected_layer_picture_draws_a_protected_run(tmp_path):
    cell = parse_cell({**TINY_TRIAL, "format": "E4M3",
                       "protection": {"mode": "adaptive_svd", "every": 10, "principal_threshold": 0.0,
                                      "release_threshold": 0.0}})
    Trainer(cell, trial_id="on", results_root=str(tmp_path), progress=False).run()
    from altgrad.analysis import load_results
    results = load_results(tmp_path)
    assert plot_protected_layer(results, "on", "transformer.h.0.mlp.c_fc") is None  # not watched: no rows
    fig = plot_protected_layer(results, "on", "lm_head", tmp_path / "layer.png")
    assert isinstance(fig, Figure) and (tmp_path / "layer.png").stat().st_size > 10_000
    rank_line = fig.axes[0].lines[0]
    assert max(rank_line.get_ydata()) > 0  # the hair trigger protected it
