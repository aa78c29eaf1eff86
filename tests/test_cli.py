"""The command line: `altgrad formats`, argument errors, and what a local sweep prints."""

import os
import subprocess
import sys

import pytest
import yaml

from altgrad.cli import formats_table, main
from altgrad.formats import NAMES


def test_formats_prints_every_format_with_its_range(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert f"| {name} " in out
    assert "448" in out and "57344" in out.replace(",", "").replace("5.734e+04", "57344")


def test_formats_table_names_the_scaled_twins():
    rows = {row["format"]: row for row in formats_table()}
    assert rows["E1M6"]["same grid as"] == "E0M7 × 4"
    assert rows["E0M7"]["same grid as"] == "E1M6 × 0.25"
    assert rows["E4M3"]["same grid as"] == ""
    assert rows["E0M7"]["min normal"] is None  # no normals: blank, not a made-up number


def test_unknown_verb_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "altgrad.cli", "formats"], capture_output=True, text=True)
    assert result.returncode == 0 and "E7M0" in result.stdout


def test_a_local_sweep_keeps_token_auth_on_without_rays_warnings(tmp_path):
    """Ray 2.60 warns at every local start that it turned token auth on, and Tune's result grid warns that
    Tune's (disabled) result files are missing: neither reaches the user, and the local cluster still
    runs with a token, which Ray creates in a fresh home only in token mode."""
    trial = {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_iters": 1, "warmup_steps": 1,
             "model": {"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 16},
             "diagnostics": {"flips_every": 1, "rank_every": 2}}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "t", "trial": trial, "matrix": {"format": ["E4M3", "E5M2"]},
                                     "resources": {"cpu": 1}}))
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    result = subprocess.run([sys.executable, "-m", "altgrad.cli", "sweep", str(sweep), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, env={**env, "HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Token authentication" not in result.stderr and "RAY_AUTH_MODE" not in result.stderr, result.stderr
    assert "Failed to fetch metrics" not in result.stderr and "result.json" not in result.stderr, result.stderr
    assert "WARNING" not in result.stderr, result.stderr  # nor any other of Ray's (once one per trial)
    assert (home / ".ray" / "auth_token").is_file()  # token mode: Ray made this local cluster's token
    assert len(list((tmp_path / "out" / "t" / "trials").glob("*.parquet"))) == 2
