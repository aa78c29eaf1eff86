"""The probes' numbers against independent computations, and probes that never change training."""

import numpy as np
import pandas as pd
import pytest
import torch

from altgrad.config import parse_cell
from altgrad.trainer import Trainer

TINY = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}, "batch_size": 4,
        "eval_every": 5, "eval_iters": 1, "warmup_steps": 2}


def _trainer(tmp_path, **keys):
    cell = parse_cell({**TINY, "steps": 10, "diagnostics": {"flips_every": 1, "rank_every": 5}, **keys})
    return Trainer(cell, trial_id="t", results_root=str(tmp_path / "res"), progress=False)


def _kurtosis(x: np.ndarray) -> float:
    """Pearson kurtosis, as scipy.stats.kurtosis(fisher=False, bias=True) computes it."""
    x = x.astype(np.float64).ravel()
    centred = x - x.mean()
    return float((centred ** 4).mean() / (centred ** 2).mean() ** 2)


def test_probes_never_change_training(tmp_path):
    watched = _trainer(tmp_path / "a", format="E4M3", optimizer="grid", ulp_lr=1.0)
    blind = Trainer(parse_cell({**TINY, "steps": 10, "format": "E4M3", "optimizer": "grid", "ulp_lr": 1.0,
                                "diagnostics": {"flips_every": 0, "rank_every": 0, "stats": False}}),
                    trial_id="t", results_root=str(tmp_path / "b"), progress=False)
    watched.run(), blind.run()
    assert [r["train_loss"] for r in watched.rows["steps"]] == [r["train_loss"] for r in blind.rows["steps"]]
    assert len(watched.rows["layers"]) == 2 * len(watched.layers) and len(blind.rows["layers"]) == 0


def test_layer_signals_match_a_direct_computation_at_the_check(tmp_path):
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is the kurtosis oracle")
    trainer = _trainer(tmp_path, format="E5M2", optimizer="adamw", steps=5)
    name, layer = "transformer.h.0.mlp.c_fc", trainer.layers["transformer.h.0.mlp.c_fc"]
    seen = {}
    layer.register_forward_pre_hook(  # training forwards only: an evaluation follows the check
        lambda m, args: seen.__setitem__("input", args[0].detach().clone()) if m.training else None)
    original_step = trainer.optimizer.step

    def step_watching_adam():  # the gradient and Adam's second moment just before the check's step
        state = trainer.optimizer.state[layer.weight]
        if state:
            seen["grad"], seen["v"], seen["taken"] = layer.weight.grad.clone(), state["exp_avg_sq"].clone(), int(state["step"])
        original_step()
    trainer.optimizer.step = step_watching_adam
    trainer.run()
    row = next(r for r in trainer.rows["layers"] if r["layer"] == name and r["step"] == 5)
    weight = layer.weight.detach().numpy()
    assert row["weight_kurtosis"] == pytest.approx(scipy_stats.kurtosis(weight.ravel(), fisher=False), rel=1e-9)
    assert row["weight_kurtosis"] == pytest.approx(_kurtosis(weight), rel=1e-9)
    assert row["weight_amax"] == pytest.approx(np.abs(weight).max(), rel=1e-7)
    inputs = seen["input"].numpy()
    assert row["input_kurtosis"] == pytest.approx(_kurtosis(inputs), rel=1e-9)
    assert row["input_amax"] == pytest.approx(np.abs(inputs).max(), rel=1e-7)
    grad = seen["grad"].double().numpy()
    assert row["grad_norm"] == pytest.approx(np.linalg.norm(grad), rel=1e-9)
    v_hat = seen["v"].double().numpy() / (1 - 0.95 ** seen["taken"])
    held = v_hat > 0
    assert row["adam_ratio"] == pytest.approx((grad[held] ** 2 / v_hat[held]).mean(), rel=1e-9)
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    assert row["master_stable_rank"] == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-6)
    assert row["master_spectral_norm"] == pytest.approx(s[0], rel=1e-6)
    q = np.linalg.svd(layer.quantized_weight().double().numpy(), compute_uv=False)
    assert row["spectral_norm"] == pytest.approx(q[0], rel=1e-6) and row["spectral_norm"] != row["master_spectral_norm"]


def test_adam_ratio_is_null_before_adam_has_a_second_moment(tmp_path):
    trainer = _trainer(tmp_path, steps=1, diagnostics={"rank_every": 1})
    trainer.run()
    layers = pd.DataFrame(trainer.rows["layers"].rows)
    assert layers["adam_ratio"].isna().all() and layers["grad_norm"].gt(0).all()
    assert layers["master_stable_rank"].gt(1).all() and layers["input_kurtosis"].gt(1).all()


def test_a_constant_input_has_no_kurtosis_not_a_nan(tmp_path):
    from altgrad.probes import _kurtosis_and_amax, _measured

    x = torch.full((4, 4), 2.0)
    assert _measured(_kurtosis_and_amax(x), torch.isfinite(x).all()) == [None, 2.0]
    y = torch.tensor([1.0, float("inf")])
    kurtosis, amax = _measured(_kurtosis_and_amax(y), torch.isfinite(y).all())
    assert amax == float("inf") and kurtosis != kurtosis  # a measured non-finite value stays NaN
