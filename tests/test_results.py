"""The Parquet tables: fixed schemas, atomic per-trial files, null (never a sentinel) for missing values."""

import math
from datetime import datetime, timezone

import pandas as pd

from altgrad import results


def test_a_trials_row_round_trips_with_nulls_and_utc_stamps(tmp_path):
    row = {"trial_id": "a", "format": "E4M3", "seed": 0, "best_val_loss": math.nan, "first_warning_step": None,
           "started_at": 1_700_000_000.25, "ended_at": math.nan}
    results.write_rows(str(tmp_path), "trials", "a", [row])
    back = pd.read_parquet(tmp_path / "trials")
    assert list(back.columns) == results.SCHEMAS["trials"].names
    assert back.loc[0, "started_at"] == pd.Timestamp(datetime.fromtimestamp(1_700_000_000.25, timezone.utc))
    assert pd.isna(back.loc[0, "ended_at"]) and pd.isna(back.loc[0, "best_val_loss"])
    assert pd.isna(back.loc[0, "first_warning_step"])  # a missing step is null, not 0 or -1
    assert results.read_rows(str(tmp_path), "trials", "a")[0]["trial_id"] == "a"


def test_a_rewrite_replaces_the_file_whole_and_leaves_no_partial_file(tmp_path):
    steps = [{"trial_id": "a", "step": s, "train_loss": 1.0 / s} for s in range(1, 4)]
    results.write_rows(str(tmp_path), "steps", "a", steps[:2])
    results.write_rows(str(tmp_path), "steps", "a", steps)
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["a.parquet"]
    assert list(pd.read_parquet(tmp_path / "steps")["step"]) == [1, 2, 3]


def test_empty_tables_keep_their_schema_and_an_empty_root_has_no_results(tmp_path):
    assert not results.has_results(str(tmp_path))
    empty = results.read_table(str(tmp_path), "layers")
    assert empty.empty and list(empty.columns) == results.SCHEMAS["layers"].names
    results.write_rows(str(tmp_path), "layers", "a", [])
    assert results.has_results(str(tmp_path))


def test_a_row_log_converts_each_row_once_and_round_trips_through_bytes(tmp_path):
    log = results.RowLog("steps")
    for step in (1, 2):
        log.append({"trial_id": "a", "step": step, "train_loss": 2.0, "val_loss": math.nan})
    log[-1]["val_loss"] = 1.5  # the last row may change until the flush converts it
    assert log.arrow().column("val_loss").to_pylist()[1] == 1.5
    log.append({"trial_id": "a", "step": 3, "train_loss": 1.0, "rank_warnings": None})
    assert log.arrow().num_rows == 3 and len(log) == 3
    back = results.RowLog.from_bytes("steps", log.to_bytes())
    pd.testing.assert_frame_equal(back.arrow().to_pandas(), log.arrow().to_pandas())
    assert back[2]["rank_warnings"] is None and math.isnan(back[0]["val_loss"])
    back.append({"trial_id": "a", "step": 4, "train_loss": 0.5})
    results.write_rows(str(tmp_path), "steps", "a", back.arrow())
    assert list(pd.read_parquet(tmp_path / "steps")["step"]) == [1, 2, 3, 4]
