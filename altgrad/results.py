"""The three result tables, as Parquet files that any node can write and pandas reads whole.

Layout: ``<root>/<table>/<trial_id>.parquet`` for table in trials, steps, layers, so that
``pandas.read_parquet("<root>/steps")`` reads every trial's rows. ``root`` is a local path, a shared
NFS path, or an ``s3://`` / ``gs://`` URI: files go through pyarrow's filesystem layer, so remote
workers write straight to shared storage.

A trial owns its files and rewrites them whole from its complete row list at each flush. Together
with rows restored from the trial's checkpoint, that makes a restart idempotent: no duplicate and no
lost rows. Each write is atomic for readers: on a local or NFS path the file is written under a hidden
name (pyarrow and pandas skip names starting with "."), then renamed; an object store only shows an
object once its upload completes.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TABLES = ("trials", "steps", "layers")

_STR, _F64, _I64, _BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()
_TIME = pa.timestamp("ms", tz="UTC")  # rows carry Unix seconds; to_table converts

# Contract columns first (CONTRACT.md section 5), then additions. Types are fixed so that every trial's
# file has the same schema, whatever its values (an all-NaN column stays float64, a missing step int64).
SCHEMAS = {
    "trials": pa.schema([
        ("trial_id", _STR), ("format", _STR), ("optimizer", _STR), ("layers", _STR), ("seed", _I64),
        ("lr", _F64), ("status", _STR), ("stop_reason", _STR), ("steps_completed", _I64),
        ("final_train_loss", _F64), ("final_val_loss", _F64), ("best_val_loss", _F64),
        ("first_warning_step", _I64), ("wall_time_s", _F64), ("node_id", _STR),
        ("sweep", _STR), ("ulp_lr", _F64), ("steps_planned", _I64), ("error", _STR), ("config", _STR),
        ("started_at", _TIME), ("ended_at", _TIME), ("data_fingerprint", _STR),
        ("failed", _BOOL), ("failure_step", _I64), ("failure_kind", _STR),
        ("would_stop_step", _I64), ("would_stop_reason", _STR),
    ]),
    "steps": pa.schema([
        ("trial_id", _STR), ("format", _STR), ("optimizer", _STR), ("step", _I64), ("train_loss", _F64),
        ("val_loss", _F64), ("lr", _F64), ("grad_norm", _F64), ("flips", _F64), ("updates", _F64),
        ("stall_ratio", _F64), ("overflow_frac", _F64), ("underflow_frac", _F64), ("tokens_per_s", _F64),
        ("overflow_frac_weight", _F64), ("overflow_frac_input", _F64), ("overflow_frac_grad", _F64),
        ("underflow_frac_weight", _F64), ("underflow_frac_input", _F64), ("underflow_frac_grad", _F64),
        ("nan_count", _F64), ("rank_warnings", _I64), ("recoded", _F64),
        ("amax_weight", _F64), ("amax_input", _F64), ("amax_grad", _F64),
        ("scale_spread_weight", _F64), ("scale_spread_input", _F64), ("scale_spread_grad", _F64),
    ]),
    "layers": pa.schema([
        ("trial_id", _STR), ("format", _STR), ("optimizer", _STR), ("step", _I64), ("layer", _STR),
        ("stable_rank", _F64), ("effective_rank", _F64), ("spectral_norm", _F64), ("flip_rate", _F64),
        ("stall_ratio", _F64), ("rank_warning", _BOOL), ("layer_format", _STR), ("critical", _BOOL),
        ("subspace_angle_deg", _F64), ("grad_topk_share", _F64), ("weight_scale", _F64),
        ("overflow_frac", _F64), ("underflow_frac", _F64), ("recode_rate", _F64),
        ("master_stable_rank", _F64), ("master_effective_rank", _F64), ("master_spectral_norm", _F64),
        ("principal_alignment", _F64), ("minor_alignment", _F64),
        ("weight_kurtosis", _F64), ("weight_amax", _F64), ("input_kurtosis", _F64), ("input_amax", _F64),
        ("grad_norm", _F64), ("adam_ratio", _F64),
        ("protected_rank", _I64), ("reconstruction_error", _F64), ("spectral_concentration", _F64),
        ("whatif_weight_rel_mse_tensor", _F64), ("whatif_weight_rel_mse_row", _F64), ("whatif_weight_rel_mse_mx", _F64),
        ("whatif_weight_flushed_tensor", _F64), ("whatif_weight_flushed_row", _F64), ("whatif_weight_flushed_mx", _F64),
        ("whatif_input_rel_mse_tensor", _F64), ("whatif_input_rel_mse_row", _F64), ("whatif_input_rel_mse_mx", _F64),
        ("whatif_input_flushed_tensor", _F64), ("whatif_input_flushed_row", _F64), ("whatif_input_flushed_mx", _F64),
    ]),
}


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def to_table(table: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) as a table of ``table``'s schema; absent keys are null."""
    schema = SCHEMAS[table]
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    for field in schema:
        if pa.types.is_timestamp(field.type):
            columns[field.name] = [_utc(value) for value in columns[field.name]]
    return pa.Table.from_pydict(columns, schema=schema)


def _utc(seconds: float | None) -> datetime | None:
    """Unix seconds (what rows and Ray reports carry) as an aware UTC datetime; NaN/None is null."""
    if seconds is None or seconds != seconds:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc)


class RowLog:
    """One trial's rows of one table, in order: appended as dicts (the last may still change), converted
    to Arrow once each at the next :meth:`arrow`. Rewriting the trial's file or checkpointing its rows
    then converts only the rows new since the last flush, not all of them."""

    def __init__(self, table: str):
        self.table = table
        self.rows: list[dict] = []
        self._arrow = to_table(table, [])

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def arrow(self) -> pa.Table:
        """Every row as a table; rows before this call must not change after it."""
        if self._arrow.num_rows < len(self.rows):
            new = to_table(self.table, self.rows[self._arrow.num_rows:])
            self._arrow = pa.concat_tables([self._arrow, new])
        return self._arrow

    def to_bytes(self) -> bytes:
        """The rows as an Arrow IPC stream: one object for a checkpoint, whatever the row count."""
        table, sink = self.arrow(), pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_bytes(cls, table: str, data: bytes) -> RowLog:
        log = cls(table)
        log._arrow = pa.ipc.open_stream(data).read_all()
        log.rows = log._arrow.to_pylist()
        return log


def write_rows(root: str, table: str, trial_id: str, rows: list[dict] | pa.Table) -> None:
    """Atomically replace ``<root>/<table>/<trial_id>.parquet`` with ``rows`` (dicts or a table)."""
    fs, base = _filesystem(root)
    directory = f"{base}/{table}"
    fs.create_dir(directory, recursive=True)
    final = f"{directory}/{trial_id}.parquet"
    data = rows if isinstance(rows, pa.Table) else to_table(table, rows)
    if isinstance(fs, pafs.LocalFileSystem):
        hidden = f"{directory}/.{trial_id}.{uuid.uuid4().hex}.tmp"
        pq.write_table(data, hidden, filesystem=fs)
        os.replace(hidden, final)  # atomic on POSIX and on NFS
    else:
        pq.write_table(data, final, filesystem=fs)  # an object appears only once its upload completes


def read_rows(root: str, table: str, trial_id: str) -> list[dict]:
    """The rows a trial wrote, or [] when it has written none."""
    fs, base = _filesystem(root)
    path = f"{base}/{table}/{trial_id}.parquet"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return pq.read_table(path, filesystem=fs).to_pylist()


def has_results(root: str) -> bool:
    """Whether any table under ``root`` holds a trial's file."""
    fs, base = _filesystem(root)
    for table in TABLES:
        info = fs.get_file_info(pafs.FileSelector(f"{base}/{table}", allow_not_found=True))
        if any(i.base_name.endswith(".parquet") and not i.base_name.startswith(".") for i in info):
            return True
    return False


def read_table(root: str, table: str):
    """One table of every trial as a pandas DataFrame, with the schema's columns even when empty."""
    fs, base = _filesystem(root)
    selector = pafs.FileSelector(f"{base}/{table}", allow_not_found=True)
    files = sorted(i.path for i in fs.get_file_info(selector)
                   if i.base_name.endswith(".parquet") and not i.base_name.startswith("."))
    if not files:
        return to_table(table, []).to_pandas()
    parts = [pq.read_table(path, filesystem=fs, schema=SCHEMAS[table]) for path in files]
    return pa.concat_tables(parts).to_pandas()


def markdown_table(rows, floatfmt: str = ".6g") -> str:
    """Rows (dicts or a DataFrame) as a markdown table; missing values (None/NaN) show as an em dash."""
    import pandas as pd

    frame = pd.DataFrame(rows).astype(object)
    return frame.where(frame.notna(), None).to_markdown(index=False, floatfmt=floatfmt, missingval="—")
