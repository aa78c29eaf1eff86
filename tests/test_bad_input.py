"""Bad input, everywhere: one line naming the file, the key and the value, exit 2, nothing written."""

import pytest
import torch
import yaml

from altgrad.cli import main

TINY = {"model": {"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 16}, "batch_size": 2,
        "steps": 4, "eval_every": 2, "eval_iters": 1, "warmup_steps": 1}


def _cell(tmp_path, **keys):
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump({**TINY, **keys}))
    return path


def _nanogpt_dir(path, n_train, n_val):
    path.mkdir()
    (path / "train.bin").write_bytes(bytes(2 * n_train))
    (path / "val.bin").write_bytes(bytes(2 * n_val))
    return path


def _rejects(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.mark.parametrize("data, expected", [
    ("missing_dir", "does not exist"),
    ("empty_dir", "no train.bin or val.bin"),
    ("small_dir", "fewer than one window of block_size + 1 = 17"),
    ("notes.md", "neither a nanoGPT data dir nor a .txt file"),
])
def test_train_rejects_data_it_cannot_read_before_writing_anything(tmp_path, capsys, data, expected):
    (tmp_path / "empty_dir").mkdir()
    _nanogpt_dir(tmp_path / "small_dir", n_train=100, n_val=16)  # one val window needs 17 tokens
    (tmp_path / "notes.md").write_text("x" * 1000)
    cell = _cell(tmp_path, data=str(tmp_path / data))
    out = tmp_path / "out"
    _rejects(capsys, ["train", str(cell), "--out", str(out)], str(cell), "data:", expected)
    assert not out.exists()


def test_train_accepts_a_corpus_with_exactly_one_window(tmp_path, capsys):
    _nanogpt_dir(tmp_path / "just", n_train=17, n_val=17)
    cell = _cell(tmp_path, data=str(tmp_path / "just"), steps=2)
    assert main(["train", str(cell), "--out", str(tmp_path / "out")]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_train_rejects_cuda_where_torch_has_none(tmp_path, capsys):
    cell = _cell(tmp_path, device="cuda")
    _rejects(capsys, ["train", str(cell), "--out", str(tmp_path / "out")], "device:", "'cuda'", "no CUDA")
    assert not (tmp_path / "out").exists()


def test_model_shapes_that_cannot_work_are_named(tmp_path, capsys):
    cell = _cell(tmp_path, model={**TINY["model"], "n_embd": 18, "n_head": 4})
    _rejects(capsys, ["train", str(cell)], "model.n_embd", "18")


def test_yaml_syntax_errors_name_line_and_column(tmp_path, capsys):
    cell = tmp_path / "cell.yaml"
    cell.write_text("format: E4M3\nmodel: {n_layer: 2\nlr: 3e-3\n")
    _rejects(capsys, ["train", str(cell)], str(cell), "line 3, column", "not valid YAML")


def test_a_typo_in_a_matrix_axis_is_reported_at_the_axis(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "typo", "trial": TINY, "matrix": {"fromat": ["E4M3", "fp32"], "optimizer": ["adamw", "grid"]},
        "exclude": [{"format": "fp32", "optimizer": "grid"}]}))
    _rejects(capsys, ["sweep", str(sweep), "--out", str(tmp_path / "out")], "matrix.fromat", "not a cell key")
    assert not (tmp_path / "out").exists()


def test_sweep_checks_local_data_before_ray_starts(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "nodata", "trial": {**TINY, "data": str(tmp_path / "nowhere")},
                                     "matrix": {"seed": [0, 1]}}))
    _rejects(capsys, ["sweep", str(sweep), "--out", str(tmp_path / "out")], "data:", "does not exist")
    assert not (tmp_path / "out").exists()


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    cell = _cell(tmp_path, data=str(corpus), steps=4)
    out = tmp_path / "out"
    assert main(["train", str(cell), "--out", str(out), "--set", "steps=2"]) == 0
    capsys.readouterr()  # the first run's progress bar
    corpus.write_text("pack my box with five dozen liquor jugs\n" * 40)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _rejects(capsys, ["train", str(cell), "--out", str(out), "--resume"], "data:", "fingerprint")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("keys, expected", [
    ({"optimizer": "grid", "format": "E4M3", "protection": {"mode": "adaptive_svd"}}, "protection.mode:"),
    ({"protection": {"mode": "adaptive_svd", "layers": ["*.c_attnn"]}}, "'*.c_attnn' matches no linear layer"),
    ({"protection": {"mode": "adaptive_svd"}, "model": {**TINY["model"], "tie_weights": True}}, "tied"),
    ({"protection": {"mode": "svd"}}, "mode='svd' is not one of off, adaptive_svd"),
])
def test_train_rejects_protection_that_cannot_work(tmp_path, capsys, keys, expected):
    cell = _cell(tmp_path, **keys)
    out = tmp_path / "out"
    _rejects(capsys, ["train", str(cell), "--out", str(out)], str(cell), expected)
    assert not out.exists()
