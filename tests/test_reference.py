"""docs/REFERENCE.md, the users' reference, names every cell key and every table column."""

import dataclasses
import re
from pathlib import Path

from altgrad.config import _NESTED, CellConfig
from altgrad.results import SCHEMAS

REFERENCE = (Path(__file__).parent.parent / "docs" / "REFERENCE.md").read_text()
QUOTED = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", REFERENCE))


def test_every_cell_key_is_documented():
    missing = [field.name for field in dataclasses.fields(CellConfig) if field.name not in QUOTED]
    for key, section in _NESTED.items():  # nested keys are listed in their section's row as "name value"
        row = next(line for line in REFERENCE.splitlines() if line.startswith(f"| `{key}` |"))
        missing += [f"{key}.{f.name}" for f in dataclasses.fields(section) if not re.search(rf"`{f.name}`", row)]
    assert not missing, f"docs/REFERENCE.md does not mention: {missing}"


def test_every_table_column_is_documented():
    missing = [f"{table}.{name}" for table, schema in SCHEMAS.items() for name in schema.names if name not in QUOTED]
    assert not missing, f"docs/REFERENCE.md does not mention: {missing}"
