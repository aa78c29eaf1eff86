"""The GPU path, measured side by side in one run: training tokens/s of simulated E4M3 against an
unquantized bf16 step of the same model, the fused quantizer against torch's native cast, and E4M3
``torch._scaled_mm`` against the simulated GEMM.

    python benchmarks/gpu.py                          # on a CUDA machine; --json PATH for the figures
    python benchmarks/gpu.py --budget-s 120 --steps 10

Without CUDA it prints one line saying so and exits 0 (``--device cpu`` runs the same code on the
CPU at whatever size you give, to check the script itself).

Training (the 4 x 256 model of benchmarks/train_step.py, diagnostics off, steps interleaved
round-robin so noise hits every variant alike; tokens/s from the mean step time):

* bf16: no quantization, the step under ``torch.autocast(bfloat16)``: bf16 tensor-core GEMMs;
* E4M3 as the trainer runs it: operands rounded to E4M3, the GEMMs in fp32;
* E4M3 on bf16 GEMMs: this benchmark's own variant (the trainer has no switch for it). Scales are
  powers of two (``scaling.power_of_two``), so every rounded operand ``Q(x * s) / s`` is exactly a bf16
  number, and the step runs under autocast: bf16 tensor cores multiply the same 8-bit values an FP8
  GEMM would, with fp32 accumulation. Goal: within 1.3x of the bf16 step.

``torch._scaled_mm`` needs sm >= 89 (Ada, Hopper); elsewhere, or on a torch without it, the row says
why. Every section runs within ``--budget-s`` (what is left when the budget runs out is reported as
skipped), so the script fits a fixed slot of device time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from altgrad.config import parse_cell
from altgrad.quantize import quantize
from altgrad.trainer import Trainer

OFF = {"flips_every": 0, "rank_every": 0, "stats": False}
GOAL_E4M3_OVER_BF16 = 1.3


class Budget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    @property
    def spent(self) -> bool:
        return time.monotonic() >= self.deadline


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---- training ------------------------------------------------------------------------------------------

def trainer(fmt: str, args, scaling: dict | None = None) -> Trainer:
    cell = {"format": fmt, "optimizer": "adamw", "steps": 10**6, "batch_size": args.batch_size,
            "model": {"n_layer": args.n_layer, "n_head": max(1, args.n_embd // 64), "n_embd": args.n_embd,
                      "block_size": args.block_size},
            "diagnostics": OFF, "device": args.device, "seed": 0, **({"scaling": scaling} if scaling else {})}
    return Trainer(parse_cell(cell), trial_id=fmt, progress=False)


def training(args, budget: Budget) -> dict:
    """Mean step time of each variant over the measured steps (fewer if the budget runs out)."""
    device = torch.device(args.device)
    bf16 = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    variants = {
        "bf16 (autocast), no quantization": (trainer("fp32", args), bf16),
        "E4M3 simulated, fp32 GEMMs (the trainer)": (trainer("E4M3", args), nullcontext),
        "E4M3 simulated, bf16 GEMMs (pow2 scales)": (trainer("E4M3", args, {"power_of_two": True}), bf16),
    }
    sync, totals, measured = synchronizer(device), dict.fromkeys(variants, 0.0), 0
    for step in range(args.warmup + args.steps):
        if budget.spent and measured:
            break
        for name, (variant, context) in variants.items():
            sync()
            started = time.perf_counter()
            with context():
                row = variant._train_step()
            sync()
            if step >= args.warmup:
                totals[name] += time.perf_counter() - started
            if not torch.isfinite(torch.tensor(row["train_loss"])):
                raise RuntimeError(f"{name}: non-finite loss at step {step + 1}")
        measured += step >= args.warmup
    tokens = args.batch_size * args.block_size
    steps = {name: {"ms_per_step": 1e3 * total / max(1, measured),
                    "tokens_per_s": tokens * max(1, measured) / total if total else None}
             for name, total in totals.items()}
    bf16_ms, shipped_ms, ours_ms = (v["ms_per_step"] for v in steps.values())
    return {"measured_steps": measured, "tokens_per_step": tokens, "variants": steps,
            "e4m3_bf16_gemm_over_bf16": ours_ms / bf16_ms if measured else None,
            "e4m3_fp32_gemm_over_bf16": shipped_ms / bf16_ms if measured else None}


# ---- the quantizer ---------------------------------------------------------------------------------------

def best_ms(fn, device: torch.device, repeat: int) -> float:
    sync = synchronizer(device)
    fn()  # compiles, or loads the compiled kernel
    sync()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def quantizer(args) -> dict:
    x = torch.randn(int(args.size), generator=torch.Generator().manual_seed(0)).to(args.device)
    device = x.device
    native = best_ms(lambda: x.to(torch.float8_e4m3fn).float(), device, args.repeat)
    fused = best_ms(lambda: quantize(x, "E4M3", saturate=True), device, args.repeat)
    # In range (|x| < 448 here), both round to nearest-even: the same numbers, or the comparison is moot.
    same = bool(torch.equal(quantize(x, "E4M3", saturate=True), x.to(torch.float8_e4m3fn).float()))
    return {"elements": x.numel(), "native_ms": native, "quantize_ms": fused, "native_over_quantize": native / fused,
            "identical_values": same}


# ---- scaled_mm against the simulated GEMM -----------------------------------------------------------------

def scaled_mm(args) -> dict:
    """E4M3 ``torch._scaled_mm`` against ``quantize(a) @ quantize(b)`` in fp32, per-tensor scales."""
    device = torch.device(args.device)
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return {"skipped": f"needs sm >= 89, this GPU is sm {capability[0]}{capability[1]}"}
    generator = torch.Generator().manual_seed(1)
    m = k = n = int(args.gemm)
    a = torch.randn(m, k, generator=generator).to(device)
    b = torch.randn(k, n, generator=generator).to(device)
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    scale_a, scale_b = fp8_max / a.abs().max(), fp8_max / b.abs().max()
    simulated = quantize(a, "E4M3", scale=scale_a, saturate=True) @ quantize(b, "E4M3", scale=scale_b, saturate=True)
    a8 = (a * scale_a).to(torch.float8_e4m3fn)
    b8 = (b * scale_b).to(torch.float8_e4m3fn).t().contiguous().t()  # column-major, as _scaled_mm wants
    try:
        real = torch._scaled_mm(a8, b8, scale_a=(1 / scale_a).float(), scale_b=(1 / scale_b).float(),
                                out_dtype=torch.float32)
    except Exception as error:  # an older torch, a driver without FP8 kernels: say so, keep the rest
        return {"skipped": f"torch._scaled_mm failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    difference = (real - simulated).abs()
    return {"shape": [m, k, n], "max_abs_diff": difference.max().item(), "mean_abs_diff": difference.mean().item(),
            "max_abs_value": simulated.abs().max().item()}


# ---- the run ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (to check the script; default cuda)")
    parser.add_argument("--budget-s", type=float, default=240, help="stop measuring after this long (default 240)")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "altgrad-gpu.json"),
                        help="where to write the figures (default $OUT/altgrad-gpu.json, else the temp dir)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps per variant first (compiles)")
    parser.add_argument("--size", type=float, default=16 * 2**20, help="elements for the quantizer (default 16M)")
    parser.add_argument("--repeat", type=int, default=10, help="timed quantizer calls; the best is kept")
    parser.add_argument("--gemm", type=int, default=4096, help="M = K = N of the scaled_mm comparison")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.steps < 1 or args.warmup < 0 or args.size < 1 or args.gemm < 16:
        parser.error("need --budget-s > 0, --steps >= 1, --warmup >= 0, --size >= 1, --gemm >= 16")
    if args.gemm % 16:
        parser.error(f"--gemm {args.gemm}: torch._scaled_mm needs a multiple of 16")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device here (torch {torch.__version__}); nothing measured")
        return 0

    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "args": vars(args)}
    for section, measure in (("training", lambda: training(args, budget)), ("quantizer", lambda: quantizer(args)),
                             ("scaled_mm", lambda: scaled_mm(args))):
        figures[section] = {"skipped": "budget spent"} if budget.spent else measure()
    print_figures(figures)
    with open(args.json, "w") as out:
        json.dump(figures, out, indent=1)
    print(f"figures -> {args.json}")
    return 0


def print_figures(f: dict) -> None:
    a = f["args"]
    print(f"{f['device']}, torch {f['torch']}; model {a['n_layer']} x {a['n_embd']}, batch {a['batch_size']} x "
          f"{a['block_size']}, diagnostics off")
    for section, lines in (("training", _training_lines), ("quantizer", _quantizer_lines),
                           ("scaled_mm", _scaled_mm_lines)):
        figures = f[section]
        print(*([f"  {section}: skipped ({figures['skipped']})"] if "skipped" in figures else lines(figures)), sep="\n")


def _training_lines(t: dict) -> list[str]:
    return ([f"  training, {t['measured_steps']} steps each:"] +
            [f"    {name:<44} {v['ms_per_step']:8.2f} ms/step {v['tokens_per_s']:12.0f} tokens/s"
             for name, v in t["variants"].items()] +
            [f"    E4M3 on bf16 GEMMs / bf16: {t['e4m3_bf16_gemm_over_bf16']:.3f}x (goal <= {GOAL_E4M3_OVER_BF16}); "
             f"the trainer's E4M3 / bf16: {t['e4m3_fp32_gemm_over_bf16']:.3f}x"])


def _quantizer_lines(q: dict) -> list[str]:
    return [f"  quantizer, {q['elements']:,} float32: quantize E4M3 {q['quantize_ms']:.3f} ms, native cast round "
            f"trip {q['native_ms']:.3f} ms: {q['native_over_quantize']:.2f}x native; same values: "
            f"{q['identical_values']}"]


def _scaled_mm_lines(s: dict) -> list[str]:
    return [f"  scaled_mm E4M3 {'x'.join(map(str, s['shape']))} vs simulated GEMM: max |diff| {s['max_abs_diff']:.3g}, "
            f"mean |diff| {s['mean_abs_diff']:.3g} (outputs up to {s['max_abs_value']:.3g})"]


if __name__ == "__main__":
    sys.exit(main())
