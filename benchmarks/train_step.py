"""Training-step time of one cell with diagnostics off, at their defaults, and of plain fp32, measured
side by side in one process (steps interleaved round-robin, so machine noise hits every variant alike).

    python benchmarks/train_step.py                       # 4 layers x 256 wide, E4M3, on the CPU
    python benchmarks/train_step.py --format E5M2 --steps 200 --device cuda

Ratios: "diagnostics cost" = defaults / diagnostics off (goal <= 1.05); "FP8 / fp32" = simulated FP8
with diagnostics off / plain fp32 without quantization or diagnostics (goal <= 1.5 on the CPU);
"protection checks cost" = defaults plus adaptive-SVD protection checks (every 50 steps, thresholds set so
that no layer switches: the checks alone) / defaults (goal <= 1.10). "protected" is the same with a hair
trigger: every watched layer trains as W_p + B·A, the mode's own cost (reported, no goal). "MX scaling
cost" = defaults with every point in OCP MX blocks (1 x 32 along each GEMM's reduction dim, E8M0 scales) /
defaults per tensor (goal <= 1.3).
Times are means over the measured steps, so the periodic rank checks are amortised as in a real run.
"""

from __future__ import annotations

import argparse
import time

import torch

from altgrad.config import parse_cell
from altgrad.trainer import Trainer

OFF = {"flips_every": 0, "rank_every": 0, "stats": False}
DEFAULTS = {"flips_every": 1, "rank_every": 50, "stats": True}
CHECKS_ONLY = {"mode": "adaptive_svd", "principal_threshold": 1.0, "release_threshold": 1.0}
PROTECTED = {"mode": "adaptive_svd", "principal_threshold": 0.0, "release_threshold": 0.0}
MX = {"granularity": "block", "block": [1, 32], "scale_format": "e8m0", "scale_rounding": "floor"}


def build(fmt: str, diagnostics: dict, args, protection: dict | None = None, scaling: dict | None = None) -> Trainer:
    cell = parse_cell({
        "format": fmt, "optimizer": args.optimizer, "steps": 10**6, "batch_size": args.batch_size,
        "model": {"n_layer": args.n_layer, "n_head": args.n_embd // 64, "n_embd": args.n_embd,
                  "block_size": args.block_size},
        "diagnostics": diagnostics, "device": args.device, "seed": 0,
        "protection": protection or {"mode": "off"}, "scaling": scaling or {},
    })
    return Trainer(cell, trial_id=f"{fmt}", progress=False)


def model_parser(description: str) -> argparse.ArgumentParser:
    """The benchmark model's options (4 layers x 256 wide, E4M3, AdamW, CPU), shared with whatif.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--format", default="E4M3")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    return parser


def main() -> None:
    parser = model_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["rank_every"] + 1,
                        help="unmeasured steps per variant first: past the first rank check, whose kernels compile once")
    args = parser.parse_args()

    variants = {
        "fp32, no quantization, diagnostics off": build("fp32", OFF, args),
        f"{args.format}, diagnostics off": build(args.format, OFF, args),
        f"{args.format}, diagnostics at defaults": build(args.format, DEFAULTS, args),
        f"{args.format}, defaults + protection checks": build(args.format, DEFAULTS, args, CHECKS_ONLY),
        f"{args.format}, defaults + protected": build(args.format, DEFAULTS, args, PROTECTED),
        f"{args.format}, defaults, MX blocks 1x32": build(args.format, DEFAULTS, args, scaling=MX),
    }
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    totals = dict.fromkeys(variants, 0.0)
    for step in range(args.warmup + args.steps):
        for name, trainer in variants.items():
            sync()
            started = time.perf_counter()
            trainer._train_step()
            sync()
            if step >= args.warmup:
                totals[name] += time.perf_counter() - started
    means = {name: total / args.steps for name, total in totals.items()}
    model = next(iter(variants.values())).model
    tokens = args.batch_size * args.block_size
    print(f"model: {args.n_layer} layers x {args.n_embd} wide, {model.num_params() / 1e6:.2f} M parameters; "
          f"batch {args.batch_size} x {args.block_size}; {args.optimizer}; {args.device}, "
          f"{torch.get_num_threads()} threads; {args.steps} steps each")
    for name, seconds in means.items():
        print(f"  {name:<42} {seconds * 1e3:8.1f} ms/step {tokens / seconds:10.0f} tokens/s")
    fp32, off, on, checks, protected, mx = means.values()
    print(f"diagnostics cost (defaults / off):      {on / off:.3f}x  (goal <= 1.05)")
    print(f"protection checks cost (checks / defaults): {checks / on:.3f}x  (goal <= 1.10)")
    print(f"protected mode (protected / defaults):  {protected / on:.3f}x")
    print(f"MX scaling cost (MX / per tensor):      {mx / on:.3f}x  (goal <= 1.3)")
    print(f"simulated {args.format} / fp32 (diagnostics off): {off / fp32:.3f}x  (goal <= 1.5)")


if __name__ == "__main__":
    main()
