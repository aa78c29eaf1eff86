"""The command line: `altgrad formats` and argument errors."""

import subprocess
import sys

import pytest

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
