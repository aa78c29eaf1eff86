"""Diagnostics against independent references: codes from ``encode`` and values from ``quantize`` for
flips, numpy's SVD for the spectra, and synthetic series with a known answer for the trend detector."""

import io
import math

import numpy as np
import pytest
import torch

import altgrad.quantize as quantize_module
from altgrad.diagnostics import (CLOBBER_KEYS, RANK_KEYS, FlipTracker, RankTrendConfig, RankTrendDetector,
                                 critical_layer_metrics, gradient_alignment, gradient_topk_share,
                                 principal_subspace_angle,
                                 rank_metrics, stall_ratio)
from altgrad.formats import get_format
from altgrad.quantize import encode, quantize

FORMATS = ["E5M2", "E4M3", "E3M4", "E2M5", "E0M7", "E7M0", "bf16", "fp16", "fp32"]
CODE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# ---- FlipTracker ----------------------------------------------------------------------------------

def sgd_step(weight: torch.nn.Parameter, generator: torch.Generator, lr: float = 3e-3) -> None:
    """Give ``weight`` a gradient with a quarter of its entries zero, then take an in-place SGD step."""
    grad = torch.randn(weight.shape, generator=generator)
    weight.grad = grad * (torch.rand(weight.shape, generator=generator) < 0.75)
    with torch.no_grad():
        weight.sub_(lr * weight.grad)


@pytest.mark.parametrize("scale", [None, 3.0])
@pytest.mark.parametrize("spec", FORMATS)
def test_flips_match_a_direct_comparison(spec, scale):
    generator = torch.Generator().manual_seed(0)
    magnitudes = 0.05 + 0.05 * torch.rand(64, 64, generator=generator)  # clear of zero and of overflow
    signs = torch.randint(0, 2, (64, 64), generator=generator) * 2 - 1
    weight = torch.nn.Parameter(magnitudes * signs)
    scale = None if scale is None else torch.tensor(scale)
    tracker = FlipTracker()
    tracker.track("w", weight, spec, scale)

    sgd_step(weight, generator)
    first = tracker.measure()["w"]
    assert first.flips is None and first.recoded is None  # nothing to compare with yet
    assert first.updates == torch.count_nonzero(weight.grad).item()

    fmt = get_format(spec)
    if fmt.is_native:
        def codes(w):
            return (w if scale is None else w * scale).to(fmt.torch_dtype)
    else:
        def codes(w):
            return encode(w, fmt, scale=scale)
    before = codes(weight.detach().clone())
    sgd_step(weight, generator)
    flips, updates, recoded = tracker.measure()["w"]
    expected = torch.count_nonzero(codes(weight.detach()) != before).item()
    assert 0 < flips == expected and recoded == 0
    assert updates == torch.count_nonzero(weight.grad).item()
    assert stall_ratio(flips, updates) == 1 - expected / updates
    assert tracker.nbytes == weight.numel() * CODE_BYTES.get(spec, 1)


@pytest.mark.parametrize("spec", ["E5M2", "E4M3", "E0M7", "fp16"])
def test_flips_count_only_changes_the_forward_sees(spec):
    """Sign changes under the flush to zero and growth past the saturating max are not flips."""
    fmt = get_format(spec)
    big, tiny = 4 * fmt.max_value, fmt.min_subnormal / 4
    weight = torch.nn.Parameter(torch.tensor([[tiny, -tiny, big, -big, 0.3, 0.0]]))
    tracker = FlipTracker()
    tracker.track("w", weight, spec)
    tracker.measure()
    before = quantize(weight.detach().clone(), fmt, saturate=True)
    with torch.no_grad():
        weight.copy_(torch.tensor([[-tiny, tiny, 2 * big, -3 * big, 0.3 + 2 * fmt.max_value / 64, -0.0]]))
    after = quantize(weight.detach(), fmt, saturate=True)
    assert tracker.measure()["w"].flips == torch.count_nonzero(after != before).item() == 1


def test_measure_handles_several_layers_missing_grads_and_nan_weights():
    generator = torch.Generator().manual_seed(1)
    layers = {name: torch.nn.Parameter(torch.randn(8, 16, generator=generator)) for name in "abc"}
    tracker = FlipTracker()
    for (name, weight), spec in zip(layers.items(), ["E2M5", "E5M2", "fp16"]):
        tracker.track(name, weight, spec)
    tracker.measure()
    with torch.no_grad():
        layers["a"][0, 0] = math.nan  # E2M5 has no NaN code: counted as zero, never raises
    counts = tracker.measure()
    assert list(counts) == ["a", "b", "c"]
    assert counts["a"] == (1.0, 0.0, 0.0) and counts["b"] == (0.0, 0.0, 0.0) and counts["c"] == (0.0, 0.0, 0.0)
    assert stall_ratio(counts["b"].flips, counts["b"].updates) is None


def test_stall_ratio_edge_cases():
    assert stall_ratio(3, 4) == 0.25
    assert stall_ratio(5, 4) == -0.25  # more flips than gradients: momentum or weight decay
    assert stall_ratio(0, 0) is None  # nothing updated: not measured
    assert stall_ratio(None, 10) is None  # the first measure


def direct_codes(spec: str, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """What the forward computes from ``weight`` at ``scale``, as codes (8-bit) or values (native, where
    -0 == +0 as the tracker wants): encode and torch's casts, not the tracker's own code path."""
    fmt = get_format(spec)
    if fmt.is_native:
        return (weight.detach() * scale).to(fmt.torch_dtype)
    return encode(weight.detach(), fmt, scale=scale)


def count_changed(a: torch.Tensor, b: torch.Tensor) -> int:
    return torch.count_nonzero(a != b).item()


@pytest.mark.parametrize("moved", ["scale", "weights", "both"])
@pytest.mark.parametrize("spec", FORMATS)
def test_flips_are_counted_at_a_fixed_scale_and_recodes_apart(spec, moved):
    """Flips: the weight now against the previous codes, both at the previous scale; re-codes: the weight
    now at the new scale against the same at the old one."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter((0.05 + 0.05 * torch.rand(64, 64, generator=generator))
                                * (torch.randint(0, 2, (64, 64), generator=generator) * 2 - 1))
    old_scale, new_scale = 3.0, (3.3 if moved != "weights" else 3.0)
    scale = torch.tensor(old_scale)  # moved in place, as Scaler.scale is
    tracker = FlipTracker()
    tracker.track("w", weight, spec, scale)
    sgd_step(weight, generator)
    tracker.measure()
    before = weight.detach().clone()
    if moved == "scale":
        weight.grad = torch.ones_like(weight)  # a gradient, but no step
    else:
        sgd_step(weight, generator)
    scale.fill_(new_scale)
    flips, updates, recoded = tracker.measure()["w"]
    assert flips == count_changed(direct_codes(spec, weight, old_scale), direct_codes(spec, before, old_scale))
    assert recoded == count_changed(direct_codes(spec, weight, new_scale), direct_codes(spec, weight, old_scale))
    assert updates == torch.count_nonzero(weight.grad).item()
    assert (flips > 0) == (moved != "scale") and (recoded > 0) == (moved != "weights")
    assert tracker.measure()["w"][::2] == (0.0, 0.0)  # the codes kept are those at the new scale


def test_state_dict_keeps_the_codes_and_their_scale():
    generator = torch.Generator().manual_seed(4)
    weights = {"e4m3": torch.nn.Parameter(torch.randn(32, 48, generator=generator) * 0.05),
               "bf16": torch.nn.Parameter(torch.randn(32, 48, generator=generator) * 0.05)}
    scales = {name: torch.tensor(100.0) for name in weights}
    tracker, resumed = FlipTracker(), FlipTracker()
    for name, weight in weights.items():
        tracker.track(name, weight, name.upper(), scales[name])
        resumed.track(name, weight, name.upper(), scales[name])
        sgd_step(weight, generator)
    tracker.measure()
    state = tracker.state_dict()
    saved = io.BytesIO()
    torch.save(state, saved)  # as the trainer's checkpoint does
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    befores = {name: weight.detach().clone() for name, weight in weights.items()}
    for name, weight in weights.items():
        sgd_step(weight, generator)
        scales[name].fill_(130.0)  # after the state was taken: it must hold a copy of the scale
    expected = tracker.measure()
    assert resumed.measure() == expected
    for name, weight in weights.items():
        spec = name.upper()
        assert expected[name].flips == count_changed(direct_codes(spec, weight, 100.0),
                                                     direct_codes(spec, befores[name], 100.0)) > 0
        assert expected[name].recoded == count_changed(direct_codes(spec, weight, 130.0),
                                                       direct_codes(spec, weight, 100.0)) > 0


def test_compiled_measure_matches_eager(monkeypatch):
    """8-bit weights go through one fused, compiled call (after the first measure, which runs eagerly)."""
    monkeypatch.setattr(quantize_module, "COMPILE_MIN_NUMEL", 0)
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("ALTGRAD_COMPILE", flag)
        generator = torch.Generator().manual_seed(2)
        weights = [torch.nn.Parameter(torch.randn(24, 40, generator=generator) * 0.05) for _ in range(4)]
        tracker = FlipTracker()
        scale = torch.tensor(30.0)
        for i, (weight, spec) in enumerate(zip(weights, ["E4M3", "E2M5", "fp16", "E5M2"])):
            tracker.track(str(i), weight, spec, scale if i == 0 else None)
        counts = []
        for step in range(4):
            for weight in weights:
                sgd_step(weight, generator, lr=0.01)
            weights[3].grad = None  # a weight without a gradient
            with torch.no_grad():
                weights[1][0, step] = math.nan
            if step >= 2:
                scale.fill_(30.0 + step)  # both graphs: with and without a moved scale
            counts.append(tracker.measure())
        runs.append((counts, tracker.state_dict()))
    (eager, eager_state), (compiled, compiled_state) = runs
    assert eager == compiled and eager[2]["0"].recoded > 0 and eager[1]["0"].recoded == 0
    assert all(torch.equal(eager_state[name]["codes"], compiled_state[name]["codes"]) for name in eager_state)


# ---- rank metrics ---------------------------------------------------------------------------------

def numpy_rank_metrics(matrix: np.ndarray, floor: bool = False) -> tuple[float, float, float]:
    """From a float64 SVD; ``floor`` zeroes the singular values below numpy's matrix_rank tolerance in float32."""
    s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    if floor:
        s = np.where(s > s[0] * max(matrix.shape) * np.finfo(np.float32).eps, s, 0.0)
    if s[0] == 0:
        return 0.0, 0.0, 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float((s**2).sum() / s[0] ** 2), float(np.exp(-(p * np.log(p)).sum())), float(s[0])


def orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def matrix_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "gaussian": rng.standard_normal((32, 48)),
        "rank 1": np.outer(rng.standard_normal(40), rng.standard_normal(24)),
        "rank 3": rng.standard_normal((40, 3)) @ rng.standard_normal((3, 24)),
        "decaying spectrum": orthonormal(rng, 30, 20) @ np.diag(0.7 ** np.arange(20)) @ orthonormal(rng, 20, 20).T,
        "1 x n": rng.standard_normal((1, 17)),
        "n x 1": rng.standard_normal((17, 1)),
        "tiny": 1e-30 * rng.standard_normal((16, 16)),
        "zero": np.zeros((8, 12)),
    }


@pytest.mark.parametrize("case", matrix_cases())
def test_rank_metrics_match_numpy(case):
    matrix = matrix_cases()[case]
    ours = rank_metrics(torch.tensor(matrix, dtype=torch.float32))
    stable, effective, spectral = numpy_rank_metrics(matrix)
    assert ours == pytest.approx({"stable_rank": stable, "effective_rank": effective, "spectral_norm": spectral},
                                 rel=1e-4, abs=0)
    assert all(type(value) is float for value in ours.values())


def hard_matrix_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    ill = orthonormal(rng, 300, 120) @ np.diag(np.logspace(0, -6, 120)) @ orthonormal(rng, 120, 120).T
    return {
        "ill-conditioned tall": ill,
        "ill-conditioned wide": ill.T,
        "rank 5 of 150 x 90": rng.standard_normal((150, 5)) @ rng.standard_normal((5, 90)),
        "E4M3 weights": quantize(torch.tensor(rng.standard_normal((96, 200)) * 0.02, dtype=torch.float32), "E4M3",
                                 scale=5000.0, saturate=True).double().numpy(),
    }


@pytest.mark.parametrize("case", hard_matrix_cases())
def test_gram_spectra_are_as_accurate_as_an_svd(case):
    """The spectra come from the float64 Gram matrix: check them where squaring the condition number
    would hurt in float32, and where the noise floor decides the effective rank."""
    matrix = torch.tensor(hard_matrix_cases()[case], dtype=torch.float32)
    expected = dict(zip(RANK_KEYS, numpy_rank_metrics(matrix.double().numpy(), floor=True)))
    assert rank_metrics(matrix) == pytest.approx(expected, rel=1e-6, abs=0)
    metrics, basis = critical_layer_metrics(matrix, grad=matrix, k=4)
    assert {key: metrics[key] for key in RANK_KEYS} == pytest.approx(expected, rel=1e-6, abs=0)
    assert metrics["grad_topk_share"] == pytest.approx(sum(s**2 for s in np.linalg.svd(matrix.double().numpy(),
                                                       compute_uv=False)[:4]) / (matrix.double() ** 2).sum().item())
    u = np.linalg.svd(matrix.double().numpy())[0][:, :4]
    assert numpy_largest_angle_deg(basis.double().numpy(), u) == pytest.approx(0.0, abs=0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rank_metrics_of_a_non_finite_matrix_are_nan(bad):
    matrix = torch.eye(6)
    matrix[2, 3] = bad
    assert all(math.isnan(value) for value in rank_metrics(matrix).values())


def test_rank_metrics_take_parameters_and_low_precision_but_not_vectors():
    weight = torch.nn.Parameter(torch.eye(5, dtype=torch.bfloat16) * 2)
    assert rank_metrics(weight) == {"stable_rank": 5.0, "effective_rank": pytest.approx(5.0), "spectral_norm": 2.0}
    with pytest.raises(ValueError, match="2-D"):
        rank_metrics(torch.ones(5))


# ---- clobbering: subspace angle and gradient share -------------------------------------------------

def numpy_largest_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cosines = np.linalg.svd(a.T @ b, compute_uv=False)
    return float(np.degrees(np.arccos(min(cosines.min(), 1.0))))


def test_principal_subspace_angle_matches_constructed_cases_and_numpy():
    rng = np.random.default_rng(2)
    basis = orthonormal(rng, 20, 6)  # columns 0-2 and 3-5 span orthogonal subspaces
    span, other = basis[:, :3], basis[:, 3:]
    rotation = orthonormal(rng, 3, 3)
    theta = math.radians(30)
    tilted = span.copy()
    tilted[:, 0] = math.cos(theta) * span[:, 0] + math.sin(theta) * other[:, 0]
    random_span = orthonormal(rng, 20, 3)

    def angle(a, b):
        return principal_subspace_angle(torch.tensor(a), torch.tensor(b))

    assert angle(span, span @ rotation) == pytest.approx(0.0, abs=0.1)  # same subspace, another basis
    assert angle(span, other) == pytest.approx(90.0, abs=1e-3)
    assert angle(span, tilted) == pytest.approx(30.0, abs=1e-3)
    assert angle(span, random_span) == pytest.approx(numpy_largest_angle_deg(span, random_span), abs=1e-3)


def test_gradient_topk_share_matches_constructed_cases_and_numpy():
    rng = np.random.default_rng(3)
    u, v, k = orthonormal(rng, 24, 10), orthonormal(rng, 16, 10), 3
    inside = u[:, :k] @ rng.standard_normal((k, k)) @ v[:, :k].T
    outside = u[:, k:] @ rng.standard_normal((10 - k, 10 - k)) @ v[:, k:].T
    grad = rng.standard_normal((24, 16))
    projected = u[:, :k] @ u[:, :k].T @ grad @ v[:, :k] @ v[:, :k].T
    expected = float((projected**2).sum() / (grad**2).sum())

    def share(g):
        return gradient_topk_share(torch.tensor(g), torch.tensor(u), torch.tensor(v), k)

    assert share(inside) == pytest.approx(1.0, abs=1e-6)
    assert share(outside) == pytest.approx(0.0, abs=1e-6)
    mixed = inside + outside  # orthogonal parts: their squared norms add
    assert share(mixed) == pytest.approx(float((inside**2).sum() / (mixed**2).sum()), rel=1e-5)
    assert share(grad) == pytest.approx(expected, rel=1e-5)
    assert share(np.zeros((24, 16))) is None  # no direction: not measured


def test_critical_layer_metrics_from_one_svd():
    rng = np.random.default_rng(4)
    u, v, k = orthonormal(rng, 40, 12), orthonormal(rng, 24, 12), 4
    weight = torch.tensor(u @ np.diag(np.arange(12, 0, -1.0)) @ v.T, dtype=torch.float32)
    inside = torch.tensor(u[:, :k] @ rng.standard_normal((k, k)) @ v[:, :k].T, dtype=torch.float32)

    metrics, basis = critical_layer_metrics(weight, grad=inside, k=k)
    assert set(metrics) == set(RANK_KEYS + CLOBBER_KEYS)
    assert {key: metrics[key] for key in RANK_KEYS} == pytest.approx(rank_metrics(weight), rel=1e-5)
    assert metrics["subspace_angle_deg"] is None  # first check: no previous basis
    assert metrics["grad_topk_share"] == pytest.approx(1.0, abs=1e-5)
    assert (metrics["principal_alignment"], metrics["minor_alignment"]) == pytest.approx((1.0, 0.0), abs=1e-5)
    assert basis.shape == (40, k)
    assert numpy_largest_angle_deg(basis.double().numpy(), u[:, :k]) == pytest.approx(0.0, abs=0.1)

    again, _ = critical_layer_metrics(weight * 2, grad=torch.zeros_like(weight), previous_basis=basis, k=k)
    assert again["subspace_angle_deg"] == pytest.approx(0.0, abs=0.1)
    assert all(again[key] is None for key in CLOBBER_KEYS[1:])  # a zero gradient


def test_quantization_noise_inflates_the_effective_rank_so_the_master_is_measured_too():
    """A low-rank-plus-noise weight: E7M0's rounding (to powers of two) adds noise in every direction, so
    the quantized copy's effective rank is far above the master's. rank_metrics takes either."""
    rng = np.random.default_rng(8)
    signal = rng.standard_normal((128, 8)) @ rng.standard_normal((8, 96)) / math.sqrt(8)
    master = torch.tensor(0.02 * (signal + 0.03 * rng.standard_normal((128, 96))), dtype=torch.float32)
    quantized = quantize(master, "E7M0")
    ours = {name: rank_metrics(w) for name, w in (("master", master), ("quantized", quantized))}
    for name, w in (("master", master), ("quantized", quantized)):
        assert ours[name]["effective_rank"] == pytest.approx(numpy_rank_metrics(w.double().numpy())[1], rel=1e-4)
    assert ours["master"]["effective_rank"] < 15 < 30 < ours["quantized"]["effective_rank"]  # 12.4 and 32.5


def alignment_case(rng: np.random.Generator, rows: int, cols: int, k: int):
    """A rank-10 weight with known left singular vectors (the first 10 columns of an orthonormal basis
    of R^rows), and gradients inside, orthogonal to and half in its top-k left subspace."""
    basis = orthonormal(rng, rows, rows)
    weight = basis[:, :10] @ np.diag(np.arange(10, 0, -1.0)) @ orthonormal(rng, cols, 10).T
    inside = basis[:, :k] @ rng.standard_normal((k, cols))  # any right factor: only the left side counts
    outside = basis[:, k:] @ rng.standard_normal((rows - k, cols))
    half = inside / np.linalg.norm(inside) + outside / np.linalg.norm(outside)
    return weight, {"inside": (inside, 1.0), "orthogonal": (outside, 0.0), "half in": (half, 0.5)}


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])  # wide and tall: the Gram matrix of either side
def test_gradient_alignment_matches_constructed_cases_and_numpy(shape):
    rng = np.random.default_rng(9)
    k = 3
    weight, cases = alignment_case(rng, *shape, k)
    for name, (grad, principal) in cases.items():
        ours = gradient_alignment(torch.tensor(grad, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32), k)
        assert ours == pytest.approx((principal, 1 - principal), abs=1e-5), name
        assert sum(ours) == pytest.approx(1.0, abs=1e-12)
    grad = rng.standard_normal(shape)
    u_k = np.linalg.svd(weight)[0][:, :k]
    expected = float(((u_k.T @ grad) ** 2).sum() / (grad**2).sum())
    ours = gradient_alignment(torch.tensor(grad), torch.tensor(weight), k)
    assert ours == pytest.approx((expected, 1 - expected), rel=1e-5)
    metrics, _ = critical_layer_metrics(torch.tensor(weight), grad=torch.tensor(grad), k=k)
    assert (metrics["principal_alignment"], metrics["minor_alignment"]) == pytest.approx(ours, rel=1e-6)
    assert metrics["grad_topk_share"] < metrics["principal_alignment"]  # both sides project more away


def test_gradient_alignment_not_measured_non_finite_and_bad_input():
    rng = np.random.default_rng(10)
    weight = torch.tensor(rng.standard_normal((20, 16)), dtype=torch.float32)
    assert gradient_alignment(torch.zeros(20, 16), weight, 4) == (None, None)  # no direction
    low_rank = torch.tensor(rng.standard_normal((20, 2)) @ rng.standard_normal((2, 16)), dtype=torch.float32)
    assert gradient_alignment(torch.ones(20, 16), low_rank, 4) == (None, None)  # top-4 subspace undefined
    diverged = weight.clone()
    diverged[0, 0] = math.inf
    assert all(math.isnan(value) for value in gradient_alignment(torch.ones(20, 16), diverged, 4))
    assert all(math.isnan(value) for value in gradient_alignment(torch.full((20, 16), math.nan), weight, 4))
    with pytest.raises(ValueError, match="grad shape"):
        gradient_alignment(torch.ones(16, 20), weight, 4)
    with pytest.raises(ValueError, match="k must"):
        gradient_alignment(torch.ones(20, 16), weight, 0)


@pytest.mark.parametrize("case", ["rank below k", "zero", "non-finite"])
def test_critical_layer_metrics_without_a_defined_subspace(case):
    rng = np.random.default_rng(5)
    weight = {
        "rank below k": torch.tensor(rng.standard_normal((20, 2)) @ rng.standard_normal((2, 16)), dtype=torch.float32),
        "zero": torch.zeros(20, 16),
        "non-finite": torch.full((20, 16), math.inf),
    }[case]
    metrics, basis = critical_layer_metrics(weight, grad=torch.ones(20, 16), previous_basis=torch.eye(20)[:, :4], k=4)
    assert basis is None
    if case == "non-finite":  # measured, and it diverged
        assert all(math.isnan(metrics[key]) for key in RANK_KEYS + CLOBBER_KEYS)
    else:  # nothing to measure
        assert all(metrics[key] is None for key in CLOBBER_KEYS)
    if case == "rank below k":
        assert metrics["stable_rank"] == pytest.approx(numpy_rank_metrics(weight.double().numpy())[0], rel=1e-4)


# ---- rank-collapse warnings -----------------------------------------------------------------------

NORMAL, CRITICAL = "transformer.h.0.mlp.c_fc.weight", "lm_head.weight"


def warning_steps(detector: RankTrendDetector, layer: str, series: dict[int, float]) -> list[int]:
    return [step for step, value in series.items() if detector.update(layer, step, value)]


def test_no_warning_during_warmup_even_with_a_drop():
    series = {step: 10.0 if step < 50 else 0.1 for step in range(200)}
    assert warning_steps(RankTrendDetector(RankTrendConfig(warmup_steps=200)), CRITICAL, series) == []


@pytest.mark.parametrize("every", [1, 50])
def test_no_warning_on_stationary_noise(every):
    rng = np.random.default_rng(6)
    series = {step: 10.0 * (1 + rng.uniform(-0.05, 0.05)) for step in range(0, 1000, every)}
    for layer in (NORMAL, CRITICAL):
        assert warning_steps(RankTrendDetector(), layer, series) == []


def test_a_sustained_drop_warns_until_it_recovers():
    series = {step: 10.0 if step < 500 or step >= 800 else 3.0 for step in range(1000)}
    warned = warning_steps(RankTrendDetector(), NORMAL, series)
    assert 500 < warned[0] < 600  # the 50-step EMA needs about 60 steps to lose half of a 70% drop
    assert warned == list(range(warned[0], warned[-1] + 1)) and 800 < warned[-1] < 850


def test_critical_threshold_fires_earlier_on_the_same_series():
    series = {step: 10.0 - 9.0 * max(0, step - 200) / 800 for step in range(0, 1001, 10)}  # 10 -> 1
    detector = RankTrendDetector()
    first_normal = warning_steps(detector, NORMAL, series)[0]
    first_critical = warning_steps(detector, CRITICAL, series)[0]
    assert first_critical < first_normal


@pytest.mark.parametrize("every", [1, 25, 50])
def test_a_rank_that_fell_in_warmup_and_then_rose_never_warns(every):
    """The smoke run's lm_head (E0M7, manifold): stable rank 6.2 -> 1.60 by step 100 (the end of warm-up),
    then slowly up. An EMA carried through warm-up remembers the early 6.2 and warned once it forgot."""
    series = {step: 6.2 - 4.6 * step / 100 if step <= 100 else 1.6 + 0.08 * (step - 100) / 100
              for step in range(every, 1001, every)}
    detector = RankTrendDetector(RankTrendConfig(warmup_steps=100))
    assert warning_steps(detector, CRITICAL, series) == []


@pytest.mark.parametrize("layer", [NORMAL, CRITICAL])
@pytest.mark.parametrize("every", [1, 25, 50])
def test_a_collapse_after_warmup_warns_as_documented(every, layer):
    """A drop by d = 80% after a flat stretch warns at the first check at least ln(d / (d - t)) / -ln(beta)
    steps after the last check before it (t the threshold): 49 steps (normal) or 24 (critical), so within
    2 checks at rank_every 25 or 50. Warm-up ends at 200, inside the flat stretch."""
    drop_step = 500
    series = {step: 10.0 if step < drop_step else 2.0 for step in range(every, 1001, every)}
    detector = RankTrendDetector()
    threshold = detector.config.critical_drop_threshold if layer == CRITICAL else detector.config.drop_threshold
    lag = math.ceil(math.log(0.8 / (0.8 - threshold)) / -math.log(detector.config.ema_beta))
    assert lag == (24 if layer == CRITICAL else 49)
    last_before = max(step for step in series if step < drop_step)
    expected = min(step for step in series if step >= last_before + lag)
    warned = warning_steps(detector, layer, series)
    assert warned[0] == expected and warned == [step for step in series if step >= expected]
    assert len([step for step in series if drop_step <= step <= expected]) <= (2 if every >= 25 else lag)


@pytest.mark.parametrize("resume_at", [60, 200, 520])  # in warm-up, at its end, mid-collapse
def test_resuming_from_the_state_dict_gives_identical_decisions(resume_at):
    rng = np.random.default_rng(11)
    series = {step: (6.0 if step < 100 else 10.0 if step < 500 else 2.0) * (1 + rng.uniform(-0.05, 0.05))
              for step in range(0, 1000, 20)}
    expected = warning_steps(RankTrendDetector(), CRITICAL, series)
    first = RankTrendDetector()
    before = warning_steps(first, CRITICAL, {step: v for step, v in series.items() if step < resume_at})
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)  # as the trainer's checkpoint does
    saved.seek(0)
    resumed = RankTrendDetector()
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    after = warning_steps(resumed, CRITICAL, {step: v for step, v in series.items() if step >= resume_at})
    assert expected and before + after == expected


def test_warmup_is_counted_in_steps_not_checks():
    series = {step: 10.0 if step <= 200 else 1.0 for step in range(0, 1000, 50)}
    detector = RankTrendDetector(RankTrendConfig(warmup_steps=200))
    assert warning_steps(detector, NORMAL, series)[0] == 250


def test_nan_values_neither_warn_nor_poison_the_ema():
    rng = np.random.default_rng(7)
    series = {step: 10.0 * (1 + rng.uniform(-0.05, 0.05)) if step < 500 else 3.0 for step in range(0, 1000, 10)}
    with_gaps = {step: math.nan if step % 30 == 0 else value for step, value in series.items()}
    with_gaps[600] = math.inf
    clean_steps = {step: value for step, value in series.items() if math.isfinite(with_gaps[step])}
    expected = warning_steps(RankTrendDetector(), NORMAL, clean_steps)
    assert expected and warning_steps(RankTrendDetector(), NORMAL, with_gaps) == expected


def test_critical_patterns_are_globs_matched_anywhere():
    detector = RankTrendDetector()
    assert detector.is_critical("transformer.h.3.attn.c_proj.weight")
    assert detector.is_critical(CRITICAL)
    assert not detector.is_critical(NORMAL)
    custom = RankTrendDetector(RankTrendConfig(critical_patterns=("h.1.*.c_fc",)))
    assert custom.is_critical("transformer.h.1.mlp.c_fc.weight")
    assert not custom.is_critical("transformer.h.2.mlp.c_fc.weight")


@pytest.mark.parametrize("bad", [{"drop_threshold": 1.5}, {"critical_drop_threshold": 0}, {"ema_beta": 1.0},
                                 {"warmup_steps": -1}, {"critical_patterns": "lm_head"}, {"metric": "spectral_norm"}])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RankTrendConfig(**bad)


def test_steps_going_backwards_raise():
    detector = RankTrendDetector()
    detector.update(NORMAL, 100, 5.0)
    with pytest.raises(ValueError, match="step 50"):
        detector.update(NORMAL, 50, 5.0)
