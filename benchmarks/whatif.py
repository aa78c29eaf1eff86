"""Training-step time with the what-if probe (altgrad.whatif) and without it, diagnostics otherwise at their
defaults, side by side in one process (steps interleaved round-robin, so machine noise hits both alike).

    python benchmarks/whatif.py                       # 4 layers x 256 wide, E4M3, on the CPU (as train_step.py)
    python benchmarks/whatif.py --format E5M2 --device cuda

The warm-up runs through the first rank check, whose one-off kernel compilation is reported on its own line;
the ratio is then the mean step time over the measured steps, so the checks (every ``rank_every``) are
amortised as in a real run.
"""

from __future__ import annotations

import time

import torch

from altgrad.config import parse_cell
from altgrad.probes import WhatIfProbe
from altgrad.trainer import Trainer
from train_step import model_parser  # benchmarks/, the script's own folder

DEFAULTS = {"flips_every": 1, "rank_every": 50, "stats": True}


def build(args, whatif: bool) -> Trainer:
    cell = parse_cell({
        "format": args.format, "optimizer": args.optimizer, "steps": 10**6, "batch_size": args.batch_size,
        "model": {"n_layer": args.n_layer, "n_head": args.n_embd // 64, "n_embd": args.n_embd,
                  "block_size": args.block_size},
        "diagnostics": DEFAULTS, "device": args.device, "seed": 0,
    })
    trainer = Trainer(cell, trial_id=args.format, progress=False)
    if not whatif:
        trainer.probes = [probe for probe in trainer.probes if not isinstance(probe, WhatIfProbe)]
    return trainer


def main() -> None:
    parser = model_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="measured steps per variant, after the first check")
    args = parser.parse_args()

    variants = {"defaults + what-if": build(args, True), "defaults, no what-if": build(args, False)}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    warmup = DEFAULTS["rank_every"]
    totals, checks, first_check = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0), {}
    for step in range(1, warmup + args.steps + 1):
        for name, trainer in variants.items():
            sync()
            started = time.perf_counter()
            trainer._train_step()
            sync()
            seconds = time.perf_counter() - started
            if step == warmup:
                first_check[name] = seconds
            elif step > warmup:
                totals[name] += seconds
                checks[name] += seconds if step % DEFAULTS["rank_every"] == 0 else 0.0
    n_checks = args.steps // DEFAULTS["rank_every"]
    model = next(iter(variants.values())).model
    print(f"model: {args.n_layer} layers x {args.n_embd} wide, {model.num_params() / 1e6:.2f} M parameters; "
          f"batch {args.batch_size} x {args.block_size}; {args.format}, {args.optimizer}; {args.device}, "
          f"{torch.get_num_threads()} threads; {args.steps} steps each, {n_checks} rank checks among them")
    for name in variants:
        print(f"  {name:<22} {totals[name] / args.steps * 1e3:8.1f} ms/step   "
              f"check step {checks[name] / max(n_checks, 1) * 1e3:8.1f} ms   first check {first_check[name]:6.2f} s")
    with_whatif, without = (totals[name] for name in variants)
    print(f"what-if cost (with / without, mean step): {with_whatif / without:.3f}x")


if __name__ == "__main__":
    main()
