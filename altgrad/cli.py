"""The ``altgrad`` command. Each verb parses its arguments, validates its input before any work
starts (exit 2 with one line naming the bad value), and calls into the library."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys

from pathlib import Path

from altgrad.config import ConfigError
from altgrad.formats import EIGHT_BIT_NAMES, FORMATS, same_grid_up_to_scale

EXIT_BAD_INPUT = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # exit 128 + the signal: 130 and 143, as a shell reports


def formats_table() -> list[dict]:
    """One row per format: its range and precision, and any format whose grid is a scaled copy."""
    rows = []
    for fmt in FORMATS.values():
        twins = []
        if fmt.name in EIGHT_BIT_NAMES:
            for other in EIGHT_BIT_NAMES:
                factor = same_grid_up_to_scale(FORMATS[other], fmt) if other != fmt.name else None
                if factor is not None:
                    twins.append(f"{other} × {factor:g}")
        rows.append({
            "format": fmt.name, "E": fmt.exp_bits, "M": fmt.man_bits, "bias": fmt.bias, "special": fmt.special,
            "max": fmt.max_value, "min normal": None if math.isnan(fmt.min_normal) else fmt.min_normal, "min subnormal": fmt.min_subnormal,
            "binades": round(fmt.binades, 2), "finite values": fmt.num_finite,
            "same grid as": ", ".join(twins),
        })
    return rows


def _cmd_formats(args) -> int:
    from altgrad.results import markdown_table

    print(markdown_table(formats_table()))
    print("\nmin normal is blank where a format has no normals; min subnormal is the smallest positive value.")
    print("Formats with the same grid up to a scale are the same experiment under per-tensor scaling.")
    return 0


def _cmd_train(args) -> int:
    from altgrad import results
    from altgrad.config import check_runtime, load_cell
    from altgrad.trainer import Trainer

    cell = load_cell(args.cell, args.set)
    check_runtime(cell, args.cell)
    name = cell.name or Path(args.cell).stem
    root = _join(args.out, name)
    checkpoint = Path(args.out) / name / "checkpoint.pt" if "://" not in args.out else None
    if results.has_results(root) and not args.resume:
        raise ConfigError(args.cell, "--out", f"{root} already holds results; pass --resume to continue "
                                              f"that run, or choose another --out or name")
    trainer = Trainer(cell, trial_id=name, results_root=root, checkpoint_path=checkpoint, progress=True)
    try:
        summary = trainer.run(resume=args.resume)
    except KeyboardInterrupt:
        _remove_partial_writes(root)
        raise KeyboardInterrupt(f"at step {trainer.step}") from None
    except ConfigError:
        raise  # bad input (a resume on other data): nothing is written, the run's files stay as they were
    except Exception as error:
        results.write_rows(root, "trials", name, [trainer.summary("error", error=repr(error))])
        raise
    results.write_rows(root, "trials", name, [summary])
    print(f"{name}: {cell.format} / {cell.optimizer} / layers={summary['layers']} / seed {cell.seed}: "
          f"{summary['status']} after {summary['steps_completed']} steps"
          f"{' (' + summary['stop_reason'] + ')' if summary['stop_reason'] else ''}; "
          f"train {_number(summary['final_train_loss'])}, val {_number(summary['final_val_loss'])} "
          f"(best {_number(summary['best_val_loss'])}), {summary['wall_time_s']:.1f} s -> {root}")
    return 0


def _state_local_ray_auth(address: str | None) -> None:
    """Ray 2.60 turns token authentication on for a local cluster that ``ray.init`` starts when
    ``RAY_AUTH_MODE`` is unset, and warns at every start that it did. Asking for that same mode
    explicitly is Ray's own way to silence it (an explicit mode is respected without a warning), and is
    safe: the local cluster still requires its token (Ray still creates ``~/.ray/auth_token`` when
    missing); it is not the opt-out, ``disabled``. A mode the user set wins; a cluster given by
    ``--address`` (or ``RAY_ADDRESS``) keeps whatever mode it runs with. Ray reads the mode once, when
    it is imported: after that (a caller that imported Ray first) setting it would split the driver
    from the cluster it starts, so it is left alone."""
    if address is None and "RAY_ADDRESS" not in os.environ and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def _cmd_sweep(args) -> int:
    _state_local_ray_auth(args.address)
    from altgrad.sweep import load_sweep, run_sweep
    from altgrad.sweep.runner import results_root

    spec = load_sweep(args.sweep)
    if args.address is None:  # on a cluster the nodes' disks and GPUs are theirs to check
        from altgrad.config import check_runtime

        checked = set()
        for cell in spec.cells:
            needs = (cell.config.data, cell.config.model.block_size, cell.config.device)
            if needs not in checked:
                check_runtime(cell.config, f"{args.sweep} (cell {cell.cell_id})")
                checked.add(needs)
    print(f"sweep {spec.name}: {len(spec.cells)} trials -> {results_root(args.out, spec.name)}")
    if args.resume:
        from altgrad.sweep.runner import ended_trials

        ended = ended_trials(args.out, spec.name)
        if set(spec.cell_ids) <= ended.keys():
            counts = {s: [ended[c] for c in spec.cell_ids].count(s) for s in ("completed", "stopped", "error")}
            print(f"sweep {spec.name}: nothing to resume: all {len(spec.cells)} trials ended ({counts['completed']} "
                  f"completed, {counts['stopped']} stopped, {counts['error']} error)")
            return 0
    try:
        statuses = run_sweep(spec, args.out, address=args.address, resume=args.resume, wandb=args.wandb)
    except KeyboardInterrupt:
        _remove_partial_writes(results_root(args.out, spec.name))
        raise
    wall = statuses.pop("_wall_time_s")
    counts = {s: list(statuses.values()).count(s) for s in ("completed", "stopped", "error")}
    print(f"sweep {spec.name}: {counts['completed']} completed, {counts['stopped']} stopped early, "
          f"{counts['error']} errors in {wall:.0f} s; analyse with: altgrad report {results_root(args.out, spec.name)}")
    return 1 if counts["error"] else 0


def _cmd_report(args) -> int:
    from altgrad.analysis import report_main

    return report_main(args.path, args.out)


def _cmd_matrix(args) -> int:
    from altgrad.sweep import load_sweep
    from altgrad.sweep.matrix import render_matrix

    document = render_matrix(load_sweep(args.sweep), f"altgrad matrix {args.sweep}")
    if args.check is None:
        print(document, end="")
        return 0
    try:
        current = Path(args.check).read_text()
    except OSError as error:
        raise ConfigError(args.check, "--check", f"cannot read it ({error.strerror})") from None
    if current == document:
        print(f"{args.check} matches {args.sweep}")
        return 0
    print(f"{args.check} no longer matches {args.sweep}; regenerate it with: "
          f"altgrad matrix {args.sweep} > {args.check}", file=sys.stderr)
    return 1


def _cmd_freeze_data(args) -> int:
    from altgrad.data import freeze_builtin

    try:
        data = freeze_builtin(args.dir)
    except (OSError, ValueError) as error:
        raise ConfigError(args.dir, "DIR", str(error)) from None
    print(f"{args.dir}: the builtin corpus ({len(data.train)} train + {len(data.val)} val tokens, vocabulary "
          f"{data.vocab_size}, fingerprint {data.fingerprint}); train on it with: data: {args.dir}")
    return 0


def _number(value) -> str:
    return "none" if value is None else f"{value:.4f}"


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="altgrad", description="Which 8-bit float trains a transformer best?")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("formats", help="print every format's range, precision and special values").set_defaults(
        run=_cmd_formats)

    train = verbs.add_parser("train", help="train one test-matrix cell and write its result tables")
    train.add_argument("cell", help="cell YAML (the keys of a sweep's trial:)")
    train.add_argument("--out", default="results", help="results root: DIR/<name>/ gets the tables (default results)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a cell key (dotted for nested keys, e.g. model.n_layer=4); repeatable")
    train.add_argument("--resume", action="store_true", help="continue from DIR/<name>/checkpoint.pt")
    train.set_defaults(run=_cmd_train)

    sweep = verbs.add_parser("sweep", help="run the whole test matrix of a sweep YAML on Ray Tune")
    sweep.add_argument("sweep", help="sweep YAML: name, trial, matrix, exclude, early_stopping, resources")
    sweep.add_argument("--out", default="results", help="results root (local, NFS, s3://, gs://; default results)")
    sweep.add_argument("--address", default=None, help="a running Ray cluster: auto or host:port "
                                                       "(default: start a local Ray)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    sweep.add_argument("--wandb", default="off", choices=("off", "offline", "online"),
                       help="log every trial to Weights & Biases, grouped by sweep (default off)")
    sweep.set_defaults(run=_cmd_sweep)

    report = verbs.add_parser("report", help="cross-format tables and plots of a sweep's (or a run's) results")
    report.add_argument("path", help="a results directory DIR/<name> (local or s3://...)")
    report.add_argument("--out", default=None, help="report directory (default: DIR/<name>/report)")
    report.set_defaults(run=_cmd_report)

    freeze = verbs.add_parser("freeze-data", help="write the builtin corpus as a nanoGPT data dir that every "
                                                  "node of a cluster can read (the same tokens everywhere)")
    freeze.add_argument("dir", help="directory to create (train.bin, val.bin, meta.pkl)")
    freeze.set_defaults(run=_cmd_freeze_data)

    matrix = verbs.add_parser("matrix", help="print a sweep's test matrix as markdown (TEST_MATRIX.md)")
    matrix.add_argument("sweep", help="sweep YAML")
    matrix.add_argument("--check", metavar="FILE", help="exit 1 when FILE no longer matches the sweep")
    matrix.set_defaults(run=_cmd_matrix)
    return parser


def _remove_partial_writes(root: str) -> None:
    """Atomic writes cut short leave hidden ``.*.tmp`` files (readers skip them): a table's file, or
    a checkpoint beside the tables. Remove them too."""
    from altgrad.results import TABLES

    if "://" not in root:
        for folder in (Path(root), *(Path(root) / table for table in TABLES)):
            for partial in folder.glob(".*.tmp"):
                partial.unlink(missing_ok=True)


_signals_received: list[int] = []


def _on_stop_signal(signum, frame) -> None:
    """SIGINT or SIGTERM: stop here (KeyboardInterrupt). While a sweep runs, Ray Tune holds SIGINT and
    stops gracefully on it, saving the experiment for ``--resume``: a SIGTERM is handed to it as one."""
    _signals_received.append(signum)
    if signal.getsignal(signal.SIGINT) is not _on_stop_signal:
        signal.raise_signal(signal.SIGINT)
        return
    raise KeyboardInterrupt


def _close_progress_bars() -> None:
    """So that the interrupt's line starts a line of its own."""
    from tqdm.std import tqdm

    for bar in list(tqdm._instances):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    _signals_received.clear()
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in STOP_SIGNALS}
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"altgrad {args.verb}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as interrupt:
        # Each verb says where it stopped in the exception's text; everything it saved stays.
        _close_progress_bars()
        where = f" {interrupt}" if str(interrupt) else ""
        if hasattr(args, "resume"):
            where += "; resume with: " + shlex.join(["altgrad", *argv, *([] if args.resume else ["--resume"])])
        print(f"altgrad {args.verb}: interrupted{where}", file=sys.stderr)
        return 128 + (_signals_received[0] if _signals_received else signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
