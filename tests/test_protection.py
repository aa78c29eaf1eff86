"""Adaptive low-rank protection: the check's signals against constructed cases and numpy, the layer's
protected mode (switches keep the function, W_p stays frozen, unprotect merges exactly), and the
controller in short trainer runs (the loss falls, resume across a switch is bit-identical)."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import yaml

from altgrad.config import parse_cell
from altgrad.diagnostics import gradient_alignment
from altgrad.layers import QuantConfig, QuantLinear
from altgrad.protection import LAYER_KEYS, ProtectionConfig, ProtectionController, protection_metrics
from altgrad.trainer import Trainer

TINY = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}, "batch_size": 8,
        "eval_every": 25, "eval_iters": 2, "warmup_steps": 10}
HAIR_TRIGGER = ProtectionConfig(mode="adaptive_svd", every=10, principal_threshold=0.0, release_threshold=0.0)
WATCHED = {"lm_head", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
           "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"}


def orthonormal(rows, cols, generator):
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def spiked(m, n, values, generator):
    """U diag(values) Vᵀ with seeded orthonormal U, V: a weight whose singular vectors are known."""
    r = len(values)
    u, v = orthonormal(m, r, generator), orthonormal(n, r, generator)
    return u, (u * torch.tensor(values, dtype=torch.float64)) @ v.mT


# ---- the check's signals --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 24), (24, 48)])
def test_alignment_is_one_zero_and_half_for_gradients_inside_outside_and_half_in_the_principal_subspace(shape):
    g = torch.Generator().manual_seed(0)
    m, n = shape
    k = 4
    u, weight = spiked(m, n, [20.0 - i for i in range(min(m, n))], g)
    inside = u[:, :k] @ torch.randn(k, n, generator=g, dtype=torch.float64)
    complement = torch.eye(m, dtype=torch.float64) - u[:, :k] @ u[:, :k].mT
    outside = complement @ torch.randn(m, n, generator=g, dtype=torch.float64)
    half = inside / inside.norm() + outside / outside.norm()  # orthogonal parts of equal norm
    for grad, principal in ((inside, 1.0), (outside, 0.0), (half, 0.5)):
        metrics = protection_metrics(weight.float(), grad.float(), k=k)
        assert (metrics["principal_alignment"], metrics["minor_alignment"]) == pytest.approx(
            (principal, 1 - principal), abs=1e-5)
        assert metrics["principal_alignment"] == pytest.approx(gradient_alignment(grad.float(), weight.float(), k)[0])


def test_concentration_and_reconstruction_error_match_numpy_svd_and_rank_shrinks_as_spikes_emerge():
    g = torch.Generator().manual_seed(1)
    m, n, k = 64, 40, 4
    noise = torch.randn(m, n, generator=g, dtype=torch.float64) / m**0.5
    bulk = protection_metrics(noise.float(), k=k)
    assert bulk["minor_rank"] == n - k  # a noise bulk: nothing stands out, so all but the top k train
    _, spikes = spiked(m, n, [30.0 - i for i in range(12)], g)
    weight = (noise + spikes).float()
    metrics = protection_metrics(weight, k=k)
    assert metrics["minor_rank"] == n - 12  # the 12 spikes are principal: the trained rank shrinks
    assert metrics["principal_alignment"] is None and metrics["minor_alignment"] is None  # no gradient
    s = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    energy = (s**2).sum()
    assert metrics["spectral_concentration"] == pytest.approx((s[:k] ** 2).sum() / energy, rel=1e-9)
    assert metrics["reconstruction_error"] == pytest.approx(np.sqrt((s[12:] ** 2).sum() / energy), rel=1e-6)


def test_unmeasurable_signals_are_none_and_a_diverged_weight_is_nan():
    zero = protection_metrics(torch.zeros(8, 6), torch.ones(8, 6), k=2)
    assert zero["spectral_concentration"] is None and zero["reconstruction_error"] is None
    assert zero["principal_alignment"] is None  # no top-k subspace in a zero weight
    assert protection_metrics(torch.eye(8, 6), torch.zeros(8, 6), k=2)["principal_alignment"] is None
    diverged = torch.eye(8, 6)
    diverged[0, 0] = float("inf")
    assert all(np.isnan(protection_metrics(diverged, torch.ones(8, 6), k=2)[key]) for key in LAYER_KEYS[1:])


@pytest.mark.parametrize("value, fragment", [
    ({"mode": "lora"}, "mode='lora'"), ({"layers": "lm_head"}, "layers='lm_head'"), ({"every": 0}, "every=0"),
    ({"principal_threshold": 1.5}, "principal_threshold=1.5"),
    ({"release_threshold": 0.5}, "release_threshold=0.5"), ({"min_rank": 0}, "min_rank=0"),
])
def test_bad_config_values_raise_one_line_naming_the_key_and_value(value, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        ProtectionConfig(**value)


def test_the_grid_optimizer_is_rejected_and_off_accepts_anything():
    with pytest.raises(ValueError, match="optimizer=grid"):
        ProtectionConfig(mode="adaptive_svd").check_optimizer("grid")
    ProtectionConfig(mode="off").check_optimizer("grid")


# ---- the layer's protected mode ----------------------------------------------------------------

def trained_layer(fmt: str, seed: int = 0) -> QuantLinear:
    """A QuantLinear whose delayed scale has a history (one training forward), in eval mode."""
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(nn.Linear(48, 24), QuantConfig(weight=fmt))
    layer(torch.randn(4, 48)).sum().backward()
    layer.weight.grad = None
    return layer.eval()


def minor_split(layer: QuantLinear, rank: int):
    """Factors of the weight's r minor singular components, from numpy's SVD (an independent split)."""
    u, s, vh = np.linalg.svd(layer.weight.detach().double().numpy())
    root = np.sqrt(s[-rank:])
    return torch.tensor(u[:, -rank:] * root).float(), torch.tensor(root[:, None] * vh[-rank:]).float()


@pytest.mark.parametrize("fmt", ["E4M3", "fp32"])
def test_switching_on_keeps_the_function_and_the_effective_weight_within_one_rounding(fmt):
    layer = trained_layer(fmt)
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    before, weight, quantized = layer(x), layer.weight.detach().clone(), layer.quantized_weight()
    layer.protect(*minor_split(layer, 16))
    assert layer.protected_rank == 16 and layer.protected_base.requires_grad is False
    effective = layer.effective_weight().detach()
    # One rounding of W - P, then one of (W - P) + P: within 2^-23 of the larger of |W| and |W_p|.
    bound = 2.0**-23 * torch.maximum(weight.abs(), layer.protected_base.abs())
    assert ((effective - weight).abs() <= bound).all()
    assert torch.equal(layer.weight, effective)  # the mirror is what the forward rounds
    if fmt == "E4M3":  # an fp32-rounding nudge moves no E4M3 code here, so the output is bitwise the same
        assert torch.equal(layer.quantized_weight(), quantized) and torch.equal(layer(x), before)
    else:  # fp32: the output moves by the weight's rounding only
        scale = x.abs() @ weight.abs().mT
        assert ((layer(x) - before).abs() <= 4 * 2.0**-23 * scale + 1e-12).all()


def test_unprotect_merges_exactly_what_the_forward_computed_and_the_weight_trains_again():
    layer = trained_layer("E4M3")
    layer.protect(*minor_split(layer, 8))
    with torch.no_grad():  # as training would have moved them
        layer.protected_b.add_(torch.randn(layer.protected_b.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(4))
    effective, output = layer.effective_weight().detach().clone(), layer(x)
    layer.unprotect()
    assert layer.protected_rank == 0 and layer.protected_b is None and layer.protected_base is None
    assert torch.equal(layer.weight, effective) and torch.equal(layer(x), output)
    layer.train()(x).sum().backward()
    assert layer.weight.grad is not None


def test_a_protected_layers_state_dict_restores_the_mode_in_a_fresh_layer():
    layer = trained_layer("E4M3")
    layer.protect(*minor_split(layer, 8))
    fresh = trained_layer("E4M3", seed=1)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 48)
    assert fresh.protected_rank == 8 and torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.protected_base, layer.protected_base)
    plain = trained_layer("E4M3", seed=2).state_dict()
    fresh.load_state_dict(plain)
    assert fresh.protected_rank == 0 and torch.equal(fresh.weight, plain["weight"])


# ---- the controller in a trainer -----------------------------------------------------------------

def tiny_trainer(tmp_path, config=HAIR_TRIGGER, trial_id="t", **overrides):
    protection = {**dataclasses.asdict(config), "layers": list(config.layers)}
    cell = parse_cell({**TINY, "steps": 100, "diagnostics": {"flips_every": 1, "rank_every": 10},
                       "protection": protection, **overrides})
    trainer = Trainer(cell, trial_id=trial_id, results_root=str(tmp_path / "res"),
                      checkpoint_path=tmp_path / f"{trial_id}.pt", progress=False)
    assert isinstance(trainer.probes[-1], ProtectionController) and trainer.probes[-1].config == config
    return trainer


@pytest.mark.parametrize("optimizer", ["adamw", "manifold_adamw"])
def test_a_protected_layers_base_does_not_move_between_checks_while_its_factors_train(optimizer, tmp_path):
    trainer = tiny_trainer(tmp_path, optimizer=optimizer, format="E4M3")
    for _ in range(10):
        trainer._train_step()
    protected = {name: layer for name, layer in trainer.layers.items() if layer.protected_rank}
    assert set(protected) == WATCHED  # the hair trigger switched every watched layer at step 10
    frozen = {name: (layer.protected_base.clone(), layer.protected_b.detach().clone()) for name, layer in protected.items()}
    for _ in range(9):
        trainer._train_step()
    for name, layer in protected.items():
        base, b = frozen[name]
        assert torch.equal(layer.protected_base, base), name
        assert not torch.equal(layer.protected_b, b), name  # the factors train
        assert layer.protected_b.grad is None, name  # and their gradient does not leak into the next step
        assert torch.equal(layer.weight, layer.effective_weight()), name  # the mirror follows them
    trainer._train_step()  # step 20: a new cycle recomputes W_p from the current weight
    assert all(not torch.equal(layer.protected_base, frozen[name][0]) for name, layer in protected.items())


def test_a_hair_trigger_switches_the_watched_layers_and_the_loss_still_falls(tmp_path):
    trainer = tiny_trainer(tmp_path, steps=60)
    trainer.run()
    losses = [row["train_loss"] for row in trainer.rows["steps"]]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5, (losses[:10], losses[-10:])
    rows = trainer.rows["layers"].rows
    for row in rows:
        if row["layer"] in WATCHED:
            assert row["protected_rank"] > 0 and 0 <= row["principal_alignment"] <= 1
            assert 0 < row["reconstruction_error"] < 1 and 0 < row["spectral_concentration"] < 1
        else:
            assert row["protected_rank"] == 0 and "reconstruction_error" not in row
    assert {row["step"] for row in rows} == set(range(10, 61, 10))


def test_a_layer_released_below_the_release_threshold_trains_whole_again(tmp_path):
    trainer = tiny_trainer(tmp_path)
    controller = trainer.probes[-1]
    for _ in range(10):
        trainer._train_step()
    assert all(layer.protected_rank for layer in controller.layers.values())
    controller.config = dataclasses.replace(HAIR_TRIGGER, principal_threshold=1.0, release_threshold=1.0)
    for _ in range(10):
        trainer._train_step()
    assert all(layer.protected_rank == 0 for layer in controller.layers.values())
    assert controller.groups == {} and controller.optimizer.param_groups == []
    assert all(layer.weight.grad is None for layer in controller.layers.values())  # zeroed after the step
    trainer._train_step()
    assert all(torch.isfinite(layer.weight).all() for layer in controller.layers.values())


def test_any_layer_switches_in_any_order_and_each_keeps_its_own_group(tmp_path):
    # The layers' groups hold factors of different ranks; a switch that is not the first group's (a layer
    # released while the ones before it stay, or cycles out of order) must leave the others' groups alone.
    trainer = tiny_trainer(tmp_path)
    controller = trainer.probes[-1]
    for _ in range(10):
        trainer._train_step()
    names = list(controller.groups)
    assert len(names) >= 3
    controller._release(names[1])
    controller._protect(names[-1], (controller.layers[names[-1]].protected_b.detach().clone()[:, :1],
                                    controller.layers[names[-1]].protected_a.detach().clone()[:1]))
    assert list(controller.groups) == [names[0], *names[2:-1], names[-1]]
    assert len(controller.optimizer.param_groups) == len(controller.groups)
    assert all(g is h for g, h in zip(controller.groups.values(), controller.optimizer.param_groups))
    trainer._train_step()
    assert all(torch.isfinite(layer.weight).all() for layer in controller.layers.values())


class _Crash(Exception):
    pass


def test_resume_across_switches_is_bit_identical(tmp_path):
    config = dataclasses.replace(HAIR_TRIGGER, every=7)  # switches at 7, cycles at 14, 21, ...
    # A warm-up schedule: the factors' lr changes at every step, before and after the resume at 20.
    overrides = dict(steps=40, eval_every=20, optimizer="manifold_adamw", format="E4M3", warmup_steps=30)
    straight = tiny_trainer(tmp_path / "a", config, **overrides)
    straight.run()

    def crash(metrics, checkpoint):
        if metrics["step"] == 20:
            raise _Crash

    with pytest.raises(_Crash):
        tiny_trainer(tmp_path / "b", config, **overrides).run(report=crash)
    resumed = tiny_trainer(tmp_path / "b", config, **overrides)
    controller, load = resumed.probes[-1], resumed.probes[-1].load_state_dict
    restored = []

    def checked_load(state):  # torch's load_state_dict makes new group dicts; later switches edit those
        load(state)
        restored.extend(controller.groups)
        assert all(any(g is h for h in controller.optimizer.param_groups) for g in controller.groups.values())

    controller.load_state_dict = checked_load
    resumed.run(resume=True)
    assert restored and resumed.step == 40
    losses = [row["train_loss"] for row in resumed.rows["steps"].arrow().to_pylist()]
    assert losses == [row["train_loss"] for row in straight.rows["steps"].arrow().to_pylist()]
    for name, layer in straight.layers.items():
        assert torch.equal(layer.weight, resumed.layers[name].weight), name


def test_altgrad_train_with_the_protection_key_writes_its_layer_columns(tmp_path):
    from altgrad.cli import main

    cell = tmp_path / "cell.yaml"
    cell.write_text(yaml.safe_dump({**TINY, "steps": 20, "diagnostics": {"flips_every": 1, "rank_every": 10}}) +
                    "protection: {mode: adaptive_svd, every: 10, principal_threshold: 0.0, release_threshold: 0.0}\n")
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({**TINY, "steps": 20, "diagnostics": {"flips_every": 1, "rank_every": 10}}) +
                   "protection: {mode: off}\n")  # YAML reads a bare off as false: still the off mode
    assert main(["train", str(cell), "--out", str(tmp_path / "out")]) == 0
    assert main(["train", str(off), "--out", str(tmp_path / "out")]) == 0
    layers = pd.read_parquet(tmp_path / "out" / "cell" / "layers")
    watched = layers[layers.layer.isin(WATCHED)]
    assert (watched.protected_rank > 0).all() and watched.reconstruction_error.between(0, 1).all()
    assert (layers[~layers.layer.isin(WATCHED)].protected_rank == 0).all()
    plain = pd.read_parquet(tmp_path / "out" / "off" / "layers")
    assert plain.protected_rank.isna().all() and plain.reconstruction_error.isna().all()
