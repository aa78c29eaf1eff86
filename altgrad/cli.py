"""The ``altgrad`` command. Each verb parses its arguments, validates its input before any work
starts (exit 2 with one line naming the bad value), and calls into the library."""

from __future__ import annotations

import argparse
import math
import sys

from altgrad.formats import EIGHT_BIT_NAMES, FORMATS, same_grid_up_to_scale

EXIT_BAD_INPUT = 2


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
    import pandas as pd

    table = pd.DataFrame(formats_table())
    print(table.to_markdown(index=False, floatfmt=".4g", missingval="—"))
    print("\nmin normal is blank where a format has no normals; min subnormal is the smallest positive value.")
    print("Formats with the same grid up to a scale are the same experiment under per-tensor scaling.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="altgrad", description="Which 8-bit float trains a transformer best?")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("formats", help="print every format's range, precision and special values").set_defaults(
        run=_cmd_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
