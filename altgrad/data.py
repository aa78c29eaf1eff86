"""Token streams to train on, and reproducible batches from them.

``load_data(spec)`` understands three sources:

* ``"builtin"``: the running Python's standard-library sources, character level. Real text that every
  machine has without a download, so a sweep runs anywhere. Characters outside printable ASCII (plus
  tab and newline) become one placeholder, which keeps the vocabulary under 100. The token array is
  cached under ``$ALTGRAD_CACHE`` (default ``~/.cache/altgrad``), keyed by Python version and size cap.
* a nanoGPT data dir: ``train.bin`` and ``val.bin`` (uint16 tokens, memory-mapped) and an optional
  ``meta.pkl`` with ``vocab_size`` and ``itos``. Without it the tokens are taken to be GPT-2 BPE, as
  nanoGPT does, with its padded vocabulary of 50304 (reading the whole file for its maximum would
  not scale to large corpora).
* a ``.txt`` file, character level, its last 10% held out for validation.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import platform
import re
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

# 4 Mi characters: over ten times the tokens a 300-step cell reads (16 x 64 x 300), built in about a second.
BUILTIN_MAX_CHARS = 4 * 2**20
_BUILTIN_VERSION = 1  # bump when the corpus recipe changes, so old caches are not reused
VAL_FRACTION = 0.1
GPT2_VOCAB_SIZE = 50304  # GPT-2's 50257 tokens padded to a multiple of 64, nanoGPT's default
PLACEHOLDER = "\ufffd"  # stands for every character outside the builtin corpus's alphabet
_OUTSIDE_ALPHABET = re.compile(r"[^\t\n\x20-\x7e]")
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}  # installed packages differ per machine


@dataclass(frozen=True, eq=False)
class TokenData:
    """A corpus as 1-D uint16 token arrays. ``decode`` turns token ids back into text where the
    vocabulary is known (None otherwise); ``alphabet`` is the character vocabulary where there is one."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    name: str
    decode: Callable[[Iterable[int]], str] | None = None
    alphabet: str | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """16 hex digits that change whenever the tokens or the vocabulary size do, so that runs on
        different data are never resumed or compared as one. The builtin corpus comes from the running
        Python's sources and so differs between Python versions; a frozen copy (:func:`freeze_builtin`)
        has the builtin's fingerprint. Arrays over ``FINGERPRINT_FULL_TOKENS`` are hashed in
        ``FINGERPRINT_CHUNKS`` evenly spaced chunks plus their length (reading a 10 GB corpus whole at
        every trial start would cost more than a short trial)."""
        digest = hashlib.sha256(f"vocab={self.vocab_size}".encode())
        for tokens in (self.train, self.val):
            digest.update(f"|{len(tokens)}|".encode())
            for chunk in _fingerprint_chunks(tokens):
                digest.update(np.ascontiguousarray(chunk, dtype="<u2").tobytes())
        return digest.hexdigest()[:16]


FINGERPRINT_FULL_TOKENS = 2**25  # 64 MiB of uint16 tokens
FINGERPRINT_CHUNKS, FINGERPRINT_CHUNK_TOKENS = 256, 2**16


def _fingerprint_chunks(tokens: np.ndarray) -> Iterable[np.ndarray]:
    if len(tokens) <= FINGERPRINT_FULL_TOKENS:
        yield tokens
        return
    last = max(0, len(tokens) - FINGERPRINT_CHUNK_TOKENS)
    starts = np.linspace(0, last, FINGERPRINT_CHUNKS).astype(np.int64)
    for start in starts:
        yield tokens[start:start + FINGERPRINT_CHUNK_TOKENS]


def load_data(spec: str) -> TokenData:
    """``"builtin"``, a nanoGPT data dir, or a ``.txt`` file (see the module docstring)."""
    if spec == "builtin":
        return _builtin()
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        return _nanogpt_dir(path)
    if path.is_file() and path.suffix == ".txt":
        return _text_file(path)
    missing = "" if path.exists() else ": no such file or directory"
    raise ValueError(f"data {spec!r} is not 'builtin', a nanoGPT data dir (train.bin, val.bin) or a .txt file{missing}")


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens, and the same windows one token on, as
    int64 (B, T) CPU tensors. The starts come from ``generator`` alone, so a seed (or a saved generator
    state) fixes the whole sequence of batches."""
    if len(tokens) <= block_size:
        raise ValueError(f"{len(tokens)} tokens are too few for block_size={block_size}")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()
    offsets = starts[:, None] + np.arange(block_size)
    return torch.from_numpy(tokens[offsets].astype(np.int64)), torch.from_numpy(tokens[offsets + 1].astype(np.int64))


def validation_batches(tokens: np.ndarray, n_batches: int, batch_size: int, block_size: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: ``n_batches * batch_size`` windows at evenly spaced starts over the
    whole split (no randomness, so every trial and every evaluation sees the same tokens; evenly spaced
    so that the set covers the split rather than one corner of it)."""
    if len(tokens) <= block_size:
        raise ValueError(f"{len(tokens)} tokens are too few for block_size={block_size}")
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * batch_size).round().astype(np.int64)
    offsets = starts.reshape(n_batches, batch_size)[..., None] + np.arange(block_size)
    return [(torch.from_numpy(tokens[o].astype(np.int64)), torch.from_numpy(tokens[o + 1].astype(np.int64)))
            for o in offsets]


def _decode(table, ids: Iterable[int]) -> str:
    return "".join(table[int(i)] for i in ids)


def _split(tokens: np.ndarray, alphabet: str, name: str) -> TokenData:
    n_train = int(len(tokens) * (1 - VAL_FRACTION))
    return TokenData(tokens[:n_train], tokens[n_train:], len(alphabet), name, partial(_decode, alphabet), alphabet)


def _char_tokens(text: str) -> tuple[np.ndarray, str]:
    """Character-level uint16 tokens of ``text`` and the alphabet they index (its sorted characters)."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, tokens = np.unique(codepoints, return_inverse=True)
    if len(alphabet) > 2**16:
        raise ValueError(f"{len(alphabet)} distinct characters do not fit uint16 tokens")
    return tokens.astype(np.uint16), "".join(map(chr, alphabet))


def _text_file(path: Path) -> TokenData:
    tokens, alphabet = _char_tokens(path.read_text(encoding="utf-8"))
    return _split(tokens, alphabet, path.name)


def _nanogpt_dir(path: Path) -> TokenData:
    missing = [f for f in ("train.bin", "val.bin") if not (path / f).is_file()]
    if missing:
        raise ValueError(f"data {str(path)!r} has no {' or '.join(missing)}; a nanoGPT data dir has train.bin and val.bin")
    train, val = (np.memmap(path / f, dtype=np.uint16, mode="r") for f in ("train.bin", "val.bin"))
    if not (path / "meta.pkl").is_file():
        return TokenData(train, val, GPT2_VOCAB_SIZE, path.name)
    with open(path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    decode = partial(_decode, meta["itos"]) if "itos" in meta else None
    return TokenData(train, val, int(meta["vocab_size"]), path.name, decode)


def freeze_builtin(directory: str | Path) -> TokenData:
    """Write the builtin corpus of this Python as a nanoGPT data dir (train.bin, val.bin, meta.pkl with
    ``vocab_size``, ``itos`` and ``stoi``, as nanoGPT's char-level preparers write them).

    Every node of a cluster that reads this directory (``data: DIR``) trains on the same tokens, whatever
    Python it runs; the directory's fingerprint equals the builtin corpus's. An existing directory with
    other data raises ValueError; one holding the same corpus is left as it is."""
    directory = Path(directory)
    data = _builtin()
    if (directory / "train.bin").exists() or (directory / "val.bin").exists():
        existing = load_data(str(directory))
        if existing.fingerprint != data.fingerprint:
            raise ValueError(f"{directory} already holds other data (fingerprint {existing.fingerprint}, "
                             f"the builtin corpus is {data.fingerprint})")
        return existing
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": data.vocab_size, "itos": dict(enumerate(data.alphabet)),
            "stoi": {c: i for i, c in enumerate(data.alphabet)}}
    _write_atomically(directory / "meta.pkl", pickle.dumps(meta))
    for split in ("train", "val"):
        _write_atomically(directory / f"{split}.bin", np.asarray(getattr(data, split), dtype="<u2").tobytes())
    return load_data(str(directory))


def data_problem(spec: str, block_size: int) -> str | None:
    """Why ``spec`` cannot feed a model with this ``block_size`` (one batch needs ``block_size + 1``
    tokens in each split), or None. Cheap: it reads file sizes, not the tokens, except for a .txt file."""
    if spec == "builtin":
        return None
    path = Path(str(spec)).expanduser()
    if not path.exists():
        return f"{spec!r} does not exist (expected builtin, a nanoGPT data dir or a .txt file)"
    if path.is_dir():
        missing = [f for f in ("train.bin", "val.bin") if not (path / f).is_file()]
        if missing:
            return f"{spec!r} has no {' or '.join(missing)} (a nanoGPT data dir has train.bin and val.bin)"
        sizes = {split: (path / f"{split}.bin").stat().st_size // 2 for split in ("train", "val")}
    elif path.suffix == ".txt":
        try:
            n = len(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            return f"{spec!r} cannot be read as UTF-8 text ({error})"
        n_train = int(n * (1 - VAL_FRACTION))
        sizes = {"train": n_train, "val": n - n_train}
    else:
        return f"{spec!r} is neither a nanoGPT data dir nor a .txt file"
    for split, n in sizes.items():
        if n < block_size + 1:
            return (f"{spec!r} has {n} {split} tokens, fewer than one window of block_size + 1 = "
                    f"{block_size + 1}")
    return None


def _stdlib_files() -> Iterable[Path]:
    """The standard library's .py files, folder by folder in sorted order (installed packages left out)."""
    for folder, subfolders, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = sorted(set(subfolders) - _SKIPPED_DIRS)
        yield from (Path(folder, name) for name in sorted(files) if name.endswith(".py"))


def _stdlib_text(max_chars: int) -> str:
    parts, size = [], 0
    for path in _stdlib_files():
        if size >= max_chars:
            break
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
    return "".join(parts)[:max_chars]


def _builtin() -> TokenData:
    cache_dir = Path(os.environ.get("ALTGRAD_CACHE") or Path.home() / ".cache" / "altgrad")
    path = cache_dir / f"builtin-v{_BUILTIN_VERSION}-py{platform.python_version()}-{BUILTIN_MAX_CHARS}.npz"
    if not path.is_file():
        text = _OUTSIDE_ALPHABET.sub(PLACEHOLDER, _stdlib_text(BUILTIN_MAX_CHARS))
        tokens, alphabet = _char_tokens(text)
        _save_atomically(path, tokens=tokens, alphabet=np.array(list(alphabet)))
    with np.load(path) as cached:
        tokens, alphabet = cached["tokens"], "".join(cached["alphabet"])
    return _split(tokens, alphabet, "builtin")


def _save_atomically(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_atomically(path, buffer.getvalue())


def _write_atomically(path: Path, content: bytes) -> None:
    """Write to a hidden temporary file beside ``path``, then rename: a reader, or a trial building the
    same cache at the same time, never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
