import math

import pytest
import torch
import torch.nn as nn

from altgrad.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=32)


def make(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG.__dict__, **overrides}))


def tokens(shape=(3, 16), seed=1) -> torch.Tensor:
    return torch.randint(CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_module_names_are_nanogpt_s():
    names = {name for name, _ in make().named_modules()}
    for i in range(2):
        for sub in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.{i}.{sub}" in names
    assert {"transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"} <= names
    linears = [name for name, m in make().named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 9 and linears[-1] == "lm_head"


def test_forward_shapes_and_initial_loss():
    logits, loss = make()(tokens(), tokens(seed=2))
    assert logits.shape == (3, 16, CONFIG.vocab_size)
    assert loss.item() == pytest.approx(math.log(CONFIG.vocab_size), rel=0.05)  # small init: near uniform
    logits_only, no_loss = make()(tokens())
    assert no_loss is None and torch.equal(logits_only, logits)


def test_attention_is_causal():
    model, idx = make(), tokens()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % CONFIG.vocab_size
    before, after = model(idx)[0], model(changed)[0]
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_head_is_separate_unless_tied():
    untied, tied = make(), make(tie_weights=True)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert tied.lm_head.weight is tied.transformer.wte.weight
    embedding = CONFIG.vocab_size * CONFIG.n_embd
    assert untied.num_params() - tied.num_params() == embedding
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)
    assert tied.num_params() - tied.num_params(non_embedding=True) == CONFIG.block_size * CONFIG.n_embd


def test_nanogpt_init():
    model = make(n_embd=64, n_layer=4, vocab_size=256)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_same_seed_same_model_and_too_long_input_rejected():
    assert torch.equal(make(seed=3)(tokens())[0], make(seed=3)(tokens())[0])
    with pytest.raises(ValueError, match="block_size=16"):
        make()(tokens((1, 17)))
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(vocab_size=8, n_embd=30, n_head=4)


def test_trains_without_bias_or_dropout_issues():
    model = make(bias=False, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = tokens((4, 17))
    losses = []
    for _ in range(10):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
