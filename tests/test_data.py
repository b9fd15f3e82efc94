"""tokenforge.data: corpora, tokenizers, the train/val split and deterministic batches."""

import numpy as np
import pytest
import torch

from tokenforge import data
from tokenforge.data import BatchSampler, load_corpus


def test_stdlib_corpus_is_real_text():
    c = load_corpus(max_bytes=300_000)
    assert c.vocab_size == 256 and c.tokenizer == "bytes"
    assert "stdlib" in c.source
    assert len(c.train) + len(c.val) == 300_000
    assert len(c.val) == pytest.approx(30_000, abs=1)
    text = bytes(c.train[:20_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import" in text
    # Deterministic: the same bytes every time.
    assert np.array_equal(load_corpus(max_bytes=300_000).train, c.train)
    files = data.text_files(data.stdlib_dir(), (".py",))
    assert files and not any("site-packages" in f for f in files)


def test_text_file_and_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "b" / "c.md").write_text("é and more text " * 100)
    (tmp_path / "skip.bin.gz").write_bytes(b"\x00\x01")
    c = load_corpus(str(tmp_path), val_fraction=0.25)
    total = len("hello world " * 100) + 1 + len(("é and more text " * 100).encode())
    assert len(c.train) + len(c.val) == total
    assert len(c.val) == total - int(total * 0.75)
    one = load_corpus(str(tmp_path / "a.txt"))
    assert bytes(one.train[:11]) == b"hello world"


def test_bin_file_and_dir(tmp_path):
    ids = np.random.randint(0, 50257, size=10_000).astype(np.uint16)
    ids.tofile(tmp_path / "data.bin")
    c = load_corpus(str(tmp_path / "data.bin"))
    assert c.vocab_size == 50257 and c.tokenizer == "pre-tokenized"
    assert np.array_equal(np.concatenate([c.train, c.val]), ids)
    d = tmp_path / "owt"
    d.mkdir()
    ids[:8000].tofile(d / "train.bin")
    ids[8000:].tofile(d / "val.bin")
    c2 = load_corpus(str(d))
    assert np.array_equal(c2.train, ids[:8000]) and np.array_equal(c2.val, ids[8000:])


def test_hf_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 10, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path / "tok.json"
    tok.save(str(path))
    (tmp_path / "t.txt").write_text("the cat sat on the mat " * 50)
    c = load_corpus(str(tmp_path / "t.txt"), tokenizer=str(path))
    assert c.vocab_size == tok.get_vocab_size() and c.tokenizer == "tok.json"
    assert len(c.train) + len(c.val) == 300
    assert tok.decode([int(i) for i in c.train[:3]]) == "the cat sat"


def test_bad_sources_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(val_fraction=1.5)
    with pytest.raises(ValueError, match="too few"):
        BatchSampler(np.zeros(10, np.uint8), 2, 16)


def test_batches_are_shifted_deterministic_and_resumable():
    tokens = np.random.randint(0, 256, size=5000).astype(np.uint8)
    s = BatchSampler(tokens, batch_size=3, seq_len=17, seed=7)
    x, y = s.next()
    assert x.shape == y.shape == (3, 17) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    for row in range(3):  # and the rows are real windows of the corpus
        start = int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(tokens, 18)
                                   .__eq__(np.concatenate([x[row].numpy(), y[row, -1:].numpy()])).all(1))[0])
        assert np.array_equal(tokens[start:start + 17], x[row].numpy())
    seq = [s.next() for _ in range(4)]
    # A fresh sampler restored to the saved position draws the same next batches.
    t = BatchSampler(tokens, batch_size=3, seq_len=17, seed=7)
    state = {"position": 3, "seq_len": 17}
    t.load_state_dict(state)
    assert torch.equal(t.next()[0], seq[2][0]) and torch.equal(t.next()[0], seq[3][0])
    # Different seeds, different batches.
    assert not torch.equal(BatchSampler(tokens, 3, 17, seed=8).next()[0], x)
    with pytest.raises(ValueError, match="seq_len"):
        t.load_state_dict({"position": 0, "seq_len": 32})


def test_ranks_split_the_global_batch():
    tokens = np.random.randint(0, 256, size=5000).astype(np.uint8)
    whole = BatchSampler(tokens, batch_size=4, seq_len=9, seed=3)
    parts = [BatchSampler(tokens, batch_size=2, seq_len=9, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        x, _ = whole.next()
        xs = torch.cat([p.next()[0] for p in parts])
        assert torch.equal(x, xs)
