"""Throughput and peak memory of ``quantize`` for every format, and of block-scaled ``quantize_blockwise``
(E4M3 in MX blocks of 1x32 with E8M0 or fp32 scales, and 128x128 tiles), side by side with ``x.clone()``
and torch's native per-tensor ``x.to(torch.float8_e4m3fn).float()`` round trip, measured in one process.

    python benchmarks/quantize.py            # 16M float32 elements, as in the README
    python benchmarks/quantize.py --size 1e6 --repeat 3

The ratio column is native round-trip time / quantize time: above 1 means faster than torch's own cast.
Peak memory is measured in a fresh child process per row: the peak resident memory during one call,
less what the process held before the input existed, over the input's size (2.0 = input + output).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch

from altgrad.blockwise import quantize_blockwise
from altgrad.formats import NAMES
from altgrad.quantize import quantize

# Block-scaled rows run on x viewed as rows of BLOCK_COLUMNS (a 4096 x 4096 matrix at the default size;
# one row where the size is not a multiple).
BLOCK_COLUMNS = 4096
BLOCK_SCALED = [("1x32 e8m0 floor", (1, 32), "e8m0"), ("1x32 fp32", (1, 32), "fp32"),
                ("128x128 e8m0 floor", (128, 128), "e8m0")]


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up: compiles (or loads the compiled kernel from the cache) and touches the memory
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def operations(x: torch.Tensor) -> dict:
    ops = {"x.clone()": x.clone, "native e4m3fn round trip": lambda: x.to(torch.float8_e4m3fn).float()}
    for name in NAMES:
        ops[f"quantize {name}"] = lambda name=name: quantize(x, name, saturate=True)
    ops["quantize E4M3 stochastic"] = lambda: quantize(x, "E4M3", saturate=True, rounding="stochastic")
    matrix = x.view(-1, BLOCK_COLUMNS) if x.numel() % BLOCK_COLUMNS == 0 else x.view(1, -1)
    for label, block, scale_format in BLOCK_SCALED:
        ops[f"blockwise E4M3 {label}"] = lambda block=block, scale_format=scale_format: quantize_blockwise(
            matrix, "E4M3", block=block, scale_format=scale_format)
    return ops


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_memory_ratio(label: str, size: int) -> float:
    """Run one operation in a child process, sampling its resident memory from a second thread
    (torch releases the GIL while it computes), and report the peak relative to the input."""
    code = f"""
import sys, threading, torch
sys.path.insert(0, "benchmarks")
import quantize as bench
x = torch.randn({size})
bench.operations(x[: 1 << 19])[{label!r}]()  # compile on a slice (128 whole rows), outside the measurement
op, peak, done = bench.operations(x)[{label!r}], [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], bench.resident_bytes())
baseline = bench.resident_bytes() - x.nbytes
sampler = threading.Thread(target=sample); sampler.start()
out = op(); done.set(); sampler.join()
peak[0] = max(peak[0], bench.resident_bytes())
print((peak[0] - baseline) / x.nbytes)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=16 * 2**20, help="float32 elements (default 16M)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per row; the best is kept")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure peak memory per row in child processes")
    args = parser.parse_args()
    size = int(args.size)
    x = torch.randn(size, generator=torch.Generator().manual_seed(0))
    ops = operations(x)
    native = best_time(ops["native e4m3fn round trip"], args.repeat)
    print(f"{size:,} float32 elements, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'operation':<34} {'ms':>8} {'Gelem/s':>8} {'vs native':>10} {'peak mem':>9}")
    for label, fn in ops.items():
        seconds = native if label.startswith("native") else best_time(fn, args.repeat)
        memory = f"{peak_memory_ratio(label, size):.2f}x" if args.memory else "-"
        print(f"{label:<34} {seconds * 1e3:8.1f} {size / seconds / 1e9:8.2f} {native / seconds:9.2f}x {memory:>9}")


if __name__ == "__main__":
    main()
