import pickle

import numpy as np
import pytest
import torch

import altgrad.data as data
from altgrad.data import get_batch, load_data

TEXT = "hello world, hello altgrad!\n" * 50


def test_get_batch_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    again = get_batch(tokens, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_saved_generator_state_resumes_the_same_batches():
    tokens = np.arange(500, dtype=np.uint16) % 7
    gen = torch.Generator().manual_seed(1)
    get_batch(tokens, 2, 16, gen)
    state = gen.get_state()
    expected = [get_batch(tokens, 2, 16, gen)[0] for _ in range(3)]
    gen.set_state(state)
    assert all(torch.equal(get_batch(tokens, 2, 16, gen)[0], e) for e in expected)


def test_get_batch_covers_the_last_token_and_rejects_short_data():
    tokens = np.arange(10, dtype=np.uint16)
    _, y = get_batch(tokens, 64, 9, torch.Generator().manual_seed(2))
    assert y.max().item() == 9  # only one window fits, and it ends on the last token
    with pytest.raises(ValueError, match="block_size=10"):
        get_batch(tokens, 1, 10, torch.Generator())


def test_text_file_is_character_level(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = load_data(str(path))
    assert corpus.vocab_size == len(set(TEXT)) and corpus.name == "tiny.txt"
    assert corpus.train.dtype == np.uint16 and len(corpus.train) == int(0.9 * len(TEXT))
    assert corpus.decode(np.concatenate([corpus.train, corpus.val])) == TEXT


def test_nanogpt_dir_with_and_without_meta(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "val.bin")
    corpus = load_data(str(tmp_path))
    assert (len(corpus.train), len(corpus.val)) == (100, 20) and corpus.train[42] == 42
    assert corpus.vocab_size == 50304 and corpus.decode is None
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 100, "itos": {i: chr(ord("a") + i % 26) for i in range(100)}}, f)
    corpus = load_data(str(tmp_path))
    assert corpus.vocab_size == 100 and corpus.decode([0, 1, 27]) == "abb"


@pytest.mark.parametrize("spec, message", [
    ("nowhere/at/all.txt", "'nowhere/at/all.txt'.*no such file"),
    ("shakespeare", "'shakespeare' is not 'builtin'"),
])
def test_unknown_sources_raise_naming_them(spec, message):
    with pytest.raises(ValueError, match=message):
        load_data(spec)


def test_data_dir_without_bins_raises(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="val.bin"):
        load_data(str(tmp_path))


def test_builtin_corpus_is_real_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ALTGRAD_CACHE", str(tmp_path))
    corpus = load_data("builtin")
    assert len(corpus.train) + len(corpus.val) > 100_000
    assert len(corpus.val) == pytest.approx(0.1 * (len(corpus.train) + len(corpus.val)), abs=1)
    assert 60 <= corpus.vocab_size <= 100
    assert corpus.train.max() < corpus.vocab_size
    assert "def " in corpus.decode(corpus.train[:20_000]) and corpus.name == "builtin"
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob("*.tmp"))

    def no_rebuild(max_chars):
        raise AssertionError("the second load should read the cache")

    monkeypatch.setattr(data, "_stdlib_text", no_rebuild)
    cached = load_data("builtin")
    assert np.array_equal(cached.train, corpus.train) and cached.vocab_size == corpus.vocab_size


def test_fingerprint_follows_the_tokens_and_a_frozen_builtin_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BUILTIN_MAX_CHARS", 20_000)
    monkeypatch.setenv("ALTGRAD_CACHE", str(tmp_path / "cache"))
    builtin = load_data("builtin")
    frozen = data.freeze_builtin(tmp_path / "frozen")
    assert frozen.fingerprint == builtin.fingerprint
    assert np.array_equal(frozen.train, builtin.train) and np.array_equal(frozen.val, builtin.val)
    assert frozen.decode(frozen.val[:50]) == builtin.decode(builtin.val[:50])
    assert data.freeze_builtin(tmp_path / "frozen").fingerprint == builtin.fingerprint  # idempotent
    changed = np.array(frozen.val)
    changed[7] = (changed[7] + 1) % frozen.vocab_size  # one token differs
    (tmp_path / "frozen" / "val.bin").write_bytes(changed.astype("<u2").tobytes())
    assert load_data(str(tmp_path / "frozen")).fingerprint != builtin.fingerprint
    with pytest.raises(ValueError, match="already holds other data"):
        data.freeze_builtin(tmp_path / "frozen")


def test_fingerprint_of_a_large_corpus_samples_it_but_sees_its_length(monkeypatch):
    monkeypatch.setattr(data, "FINGERPRINT_FULL_TOKENS", 1000)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 10_000).astype(np.uint16)
    base = data.TokenData(tokens, tokens[:2000], 50, "x").fingerprint
    longer = data.TokenData(np.concatenate([tokens, tokens[:1]]), tokens[:2000], 50, "x").fingerprint
    inside_a_chunk = tokens.copy()
    inside_a_chunk[0] += 1  # the first chunk always starts at 0
    assert base != longer
    assert base != data.TokenData(inside_a_chunk, tokens[:2000], 50, "x").fingerprint
    assert base != data.TokenData(tokens, tokens[:2000], 51, "x").fingerprint


def test_validation_batches_are_fixed_evenly_spaced_and_end_on_the_last_token():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = data.validation_batches(tokens, 3, 4, 10)
    assert len(batches) == 3 and all(x.shape == (4, 10) for x, _ in batches)
    starts = [int(s) for x, _ in batches for s in x[:, 0]]
    assert starts[0] == 0 and starts[-1] == 1000 - 11 and starts == sorted(starts)
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced, up to rounding
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = data.validation_batches(tokens, 3, 4, 10)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_every_seed_evaluates_on_the_same_windows(tmp_path):
    from altgrad.config import parse_cell
    from altgrad.trainer import Trainer

    seen = []
    for seed in (0, 1):
        cell = parse_cell({"model": {"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 16}, "seed": seed,
                           "steps": 1, "eval_iters": 2, "batch_size": 2})
        trainer = Trainer(cell, trial_id=f"s{seed}", progress=False)
        windows = []
        trainer.model.transformer.wte.register_forward_pre_hook(lambda m, args: windows.append(args[0].clone()))
        trainer.evaluate()
        seen.append(torch.cat(windows))
    assert torch.equal(seen[0], seen[1])
