"""benchmarks/gpu.py where there is no CUDA: one line and exit 0; its arguments; its whole table on the
CPU at a tiny size; and the premise of its bf16-GEMM variant."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from altgrad.quantize import quantize

REPO = Path(__file__).resolve().parents[1]


def gpu_benchmark(*args):
    return subprocess.run([sys.executable, "benchmarks/gpu.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script measures")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    result = gpu_benchmark("--json", str(tmp_path / "g.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [result.stdout.strip()] and "no CUDA" in result.stdout
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("args,fragment", [(["--budget-s", "0"], "--budget-s"), (["--gemm", "40"], "multiple of 16"),
                                           (["--steps", "x"], "--steps")])
def test_bad_arguments_exit_2_naming_the_argument(args, fragment):
    result = gpu_benchmark(*args)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr


def test_the_whole_table_runs_on_the_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "g.json"
    result = gpu_benchmark("--device", "cpu", "--n-layer", "1", "--n-embd", "64", "--block-size", "16",
                           "--batch-size", "2", "--steps", "2", "--warmup", "1", "--size", "4096", "--repeat", "1",
                           "--gemm", "32", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["training"]["measured_steps"] == 2 and len(figures["training"]["variants"]) == 3
    assert figures["training"]["e4m3_bf16_gemm_over_bf16"] > 0
    assert figures["quantizer"]["identical_values"]  # E4M3 in range: the native cast's numbers exactly
    assert figures["scaled_mm"] == {"skipped": "needs CUDA"}


def test_power_of_two_scaled_e4m3_operands_are_exact_in_bf16():
    # Why bf16 GEMMs multiply the same numbers as an FP8 GEMM: Q(x * 2**k) / 2**k is an E4M3 value times a
    # power of two, which bf16 (8 exponent bits, 8 significant bits >= E4M3's 4) holds exactly.
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0)) * 30
    for k in (-6, 0, 3):
        q = quantize(x, "E4M3", scale=2.0 ** k, saturate=True)
        assert torch.equal(q.bfloat16().float(), q)
    q = quantize(x, "E4M3", scale=448 / x.abs().max().item(), saturate=True)  # a scale that is no power of two
    assert not torch.equal(q.bfloat16().float(), q)
