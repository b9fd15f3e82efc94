"""Training data for ``tokenforge train``: a corpus, a tokenizer, a train/val split and batches.

Sources (``--data``):
  * nothing: the Python standard library's own ``.py`` files on this machine (found through
    ``sysconfig``, site-packages excluded): ~30 MB of real text that needs no download;
  * a text file, or a directory of text files (read recursively, in sorted order);
  * a nanoGPT-style pre-tokenized ``.bin`` (flat uint16 token ids), or a directory holding
    ``train.bin`` and ``val.bin``.
Text is tokenized byte-level (vocab 256) unless a Hugging Face ``tokenizers`` JSON file is given.

Batches are drawn at random offsets, but deterministically: global micro-batch ``position`` comes
from a generator seeded with (seed, position), so the sampler's whole state is one integer that a
checkpoint saves, and data-parallel ranks take disjoint slices of the same global batch (the same
rows a single process would see with the global batch size).
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".html", ".csv", ".tex")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, lossless, no files needed."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer from its JSON file (``pip install tokenizers``)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("--tokenizer needs the Hugging Face tokenizers package: pip install tokenizers") from exc
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        self.name = os.path.basename(path)

    def encode(self, text: str) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.int32
        return np.asarray(self._tok.encode(text).ids, dtype=dtype)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def text_files(root: str, suffixes: Optional[tuple] = TEXT_SUFFIXES) -> list[str]:
    """Every text file under ``root`` in sorted (deterministic) order; site-packages skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in sorted(filenames):
            if suffixes is None or f.endswith(suffixes):
                out.append(os.path.join(dirpath, f))
    return out


def _read_files(files: list[str], max_bytes: Optional[int]) -> bytes:
    chunks, total = [], 0
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue  # unreadable file: skip it, the corpus is still deterministic on this machine
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"\n".join(chunks)
    return blob[:max_bytes] if max_bytes is not None else blob


def _read_bin(path: str) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


@dataclass
class Corpus:
    train: np.ndarray       # 1-D token ids (uint8 / uint16 / int32; memmapped for .bin)
    val: np.ndarray
    vocab_size: int         # the tokenizer's vocabulary (the model's must be at least this)
    source: str             # what was read, for the run summary
    tokenizer: str

    @property
    def num_tokens(self) -> int:
        return len(self.train) + len(self.val)


def load_corpus(data: Optional[str] = None, tokenizer: Optional[str] = None, val_fraction: float = 0.1,
                max_bytes: Optional[int] = None) -> Corpus:
    """Read and tokenize ``data`` (None: the stdlib corpus) and split off the last ``val_fraction``
    of it for validation (a directory with train.bin/val.bin keeps its own split)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if data is not None and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    if data is not None and os.path.isdir(data) and os.path.exists(os.path.join(data, "train.bin")):
        train, val = _read_bin(os.path.join(data, "train.bin")), None
        if os.path.exists(os.path.join(data, "val.bin")):
            val = _read_bin(os.path.join(data, "val.bin"))
        return _split(train, val, val_fraction, _bin_vocab(train), f"{data}/train.bin (uint16)", "pre-tokenized")
    if data is not None and data.endswith(".bin"):
        tokens = _read_bin(data)
        return _split(tokens, None, val_fraction, _bin_vocab(tokens), f"{data} (uint16)", "pre-tokenized")
    tok = HFTokenizer(tokenizer) if tokenizer else ByteTokenizer()
    if data is None:
        root = stdlib_dir()
        files = text_files(root, (".py",))
        source = f"Python stdlib source ({root}, {len(files)} files)"
    elif os.path.isdir(data):
        files = text_files(data)
        source = f"{data} ({len(files)} text files)"
    else:
        files = [data]
        source = data
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) found under {data}")
    tokens = tok.encode_bytes(_read_files(files, max_bytes))
    return _split(tokens, None, val_fraction, tok.vocab_size, source, tok.name)


def _bin_vocab(tokens: np.ndarray) -> int:
    # nanoGPT .bin files carry no header: the GPT-2 vocabulary (50257) is the usual one; the model's
    # vocab must cover the largest id, which we check on a sample rather than scanning GBs.
    sample = tokens[: min(len(tokens), 1 << 22)]
    return max(50257, int(sample.max()) + 1) if len(sample) else 50257


def _split(tokens, val, val_fraction, vocab, source, tokenizer) -> Corpus:
    if val is None:
        cut = int(len(tokens) * (1 - val_fraction))
        tokens, val = tokens[:cut], tokens[cut:]
    return Corpus(train=tokens, val=val, vocab_size=vocab, source=source, tokenizer=tokenizer)


class BatchSampler:
    """Deterministic random-offset batches over 1-D ``tokens``; state = ``position`` (global
    micro-batches drawn so far). Rank ``rank`` of ``world`` gets rows [rank*B, (rank+1)*B) of each
    global micro-batch of ``batch_size * world`` rows."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world: int = 1, position: int = 0):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"{len(tokens)} tokens are too few for seq_len {seq_len}; use more data or a "
                             "shorter --seq-len")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world, self.position = seed, rank, world, position
        self._arange = np.arange(seq_len + 1)

    def _starts(self, position: int) -> np.ndarray:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + position * 7919 + 12345) % (1 << 62))
        high = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, high, (self.batch_size * self.world,), generator=g).numpy()
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch_at(self, position: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._starts(position)[:, None] + self._arange[None, :]
        rows = torch.from_numpy(np.asarray(self.tokens[idx]).astype(np.int64))
        if device is not None and torch.device(device).type == "cuda":
            rows = rows.pin_memory().to(device, non_blocking=True)
        elif device is not None:
            rows = rows.to(device)
        return rows[:, :-1], rows[:, 1:]

    def next(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair, each (batch_size, seq_len) int64."""
        out = self.batch_at(self.position, device)
        self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size * self.world,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(f"checkpoint was trained with seq_len {state['seq_len']}, this run uses {self.seq_len}")
        self.position = int(state["position"])
