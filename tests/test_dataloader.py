"""The dataloader: BOS-aligned best-fit packing, equal to a plain implementation of the original's, batch for batch.

The reference below reads the parquet files itself, tokenizes every slice of 128 documents, and scans one
list in arrival order for every document it places, as the original's loader does: the longest document that
fits, the earliest among equals; when none fits, the shortest, cropped. The real loader
(length-ordered buffer, background reading, token cache) must give the same (inputs, targets, epoch) across
an epoch boundary, from a cold token cache and from a warm one. tools/bench_dataloader.py times the two.

    uv run pytest tests/test_dataloader.py
"""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import prepare
from helpers import make_documents, reference_dataloader, write_shard


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(got, expected):
    for i, ((x, y, e), (rx, ry, re)) in enumerate(zip(got, expected)):
        assert x.dtype == torch.int64 and x.shape == rx.shape, i
        assert torch.equal(x, rx) and torch.equal(y, ry), f"batch {i} differs"
        assert e == re, f"batch {i}: epoch {e} != {re}"


@pytest.fixture
def small_corpus(tokenizer, own_cache):
    """Two small training shards: one row group cut into slices 128, 128, 44; row groups of 50 and 20."""
    data = own_cache / "data"
    docs = [make_documents(300, seed=7, mean_words=15), make_documents(70, seed=8, mean_words=15)]
    write_shard(str(data / "shard_00000.parquet"), docs[0], row_group_size=300)
    write_shard(str(data / "shard_00001.parquet"), docs[1], row_group_size=50)
    write_shard(str(data / prepare.VAL_FILENAME), make_documents(50, seed=9))
    return sum(len(ids) + 1 for shard in docs for ids in tokenizer.encode(shard))


@pytest.mark.parametrize("B,T,buffer_size", [(4, 64, 1000), (3, 200, 50), (2, 16, 7), (1, 500, 1)])
def test_rows_equal_the_reference_across_an_epoch_boundary(tokenizer, small_corpus, B, T, buffer_size):
    n = small_corpus // (B * T) + 5  # one epoch and a bit
    expected = take(reference_dataloader(tokenizer, B, T, "train", buffer_size), n)
    assert expected[-1][2] > expected[0][2]  # the epoch counter moves within the compared batches
    cold = take(prepare.make_dataloader(tokenizer, B, T, "train", buffer_size, device="cpu"), n)
    assert_same_batches(cold, expected)
    assert os.listdir(prepare.TOKENS_DIR)  # the cold pass filled the token cache
    warm = take(prepare.make_dataloader(tokenizer, B, T, "train", buffer_size, device="cpu"), n)
    assert_same_batches(warm, expected)


def _train_docs(tokenizer):
    return [tokenizer.encode(docs) for name, docs in _shards().items() if name != prepare.VAL_FILENAME]


def _shards():
    return {name: pq.read_table(os.path.join(prepare.DATA_DIR, name)).column("text").to_pylist()
            for name in sorted(os.listdir(prepare.DATA_DIR)) if name.endswith(".parquet")}


def test_every_row_starts_with_bos_and_targets_are_shifted_inputs(tokenizer):
    bos = tokenizer.get_bos_token_id()
    loader = prepare.make_dataloader(tokenizer, 8, 96, "train", device="cpu")
    for _ in range(5):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (8, 96) and x.device.type == "cpu"
        assert torch.all(x[:, 0] == bos)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert epoch == 1


def test_rows_are_whole_documents_then_one_cropped_one(tokenizer):
    """Split every row at BOS: all pieces but the last are whole training documents; the last is a prefix."""
    bos = tokenizer.get_bos_token_id()
    docs = {tuple([bos] + ids) for shard in _train_docs(tokenizer) for ids in shard}
    x, y, _ = next(prepare.make_dataloader(tokenizer, 16, 128, "train", device="cpu"))
    for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
        starts = [i for i, t in enumerate(row) if t == bos]
        pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [len(row)])]
        assert all(p in docs for p in pieces[:-1])
        assert any(d[:len(pieces[-1])] == pieces[-1] for d in docs)


def test_validation_loader_is_deterministic_and_only_reads_the_validation_shard(tokenizer):
    first = take(prepare.make_dataloader(tokenizer, 4, 64, "val", device="cpu"), 6)
    second = take(prepare.make_dataloader(tokenizer, 4, 64, "val", device="cpu"), 6)
    assert_same_batches(second, first)
    assert_same_batches(first, take(reference_dataloader(tokenizer, 4, 64, "val"), 6))
    train_first = next(prepare.make_dataloader(tokenizer, 4, 64, "train", device="cpu"))
    assert not torch.equal(train_first[0], first[0][0])


def test_document_buffer_best_fit_rules():
    buffer = prepare.DocumentBuffer()
    docs = [np.full(n, i) for i, n in enumerate([5, 9, 5, 3, 9, 12])]
    for d in docs:
        buffer.add(d)
    assert buffer.take_best_fit(9)[0] == 1    # the longest that fits, the earliest of the two 9s
    assert buffer.take_best_fit(100)[0] == 5  # 12
    assert buffer.take_best_fit(8)[0] == 0    # 5s: the earliest
    assert buffer.take_best_fit(2)[0] == 3    # nothing fits: the shortest (3) is taken, to be cropped
    assert buffer.take_best_fit(9)[0] == 4
    assert buffer.take_best_fit(1)[0] == 2
    assert buffer.count == 0 and buffer.lengths == []


def test_token_cache_ignores_a_replaced_shard(tokenizer, own_cache):
    """A shard rewritten with other text must be re-tokenized, not served from the old cache."""
    data = own_cache / "data"
    write_shard(str(data / prepare.VAL_FILENAME), ["alpha beta gamma"] * 20)
    first = next(prepare.make_dataloader(tokenizer, 2, 16, "val", device="cpu"))[0]
    write_shard(str(data / prepare.VAL_FILENAME), ["one two three four five"] * 30)
    os.utime(data / prepare.VAL_FILENAME, ns=(1, 1))  # a different mtime, even within one clock tick
    second = next(prepare.make_dataloader(tokenizer, 2, 16, "val", device="cpu"))[0]
    assert second[0, 1:4].tolist() == tokenizer.encode("one two three")[:3]
    assert not torch.equal(first, second)


def test_missing_data_is_a_one_line_error(tokenizer, own_cache):
    with pytest.raises(SystemExit) as e:
        next(prepare.make_dataloader(tokenizer, 2, 16, "train", device="cpu"))
    assert "no train shards" in str(e.value) and "uv run prepare.py" in str(e.value)


def test_corrupt_shard_is_named_with_the_fix(tokenizer, own_cache):
    data = own_cache / "data"
    write_shard(str(data / "shard_00000.parquet"), ["fine text"] * 10)
    (data / "shard_00001.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(SystemExit) as e:
        next(prepare.make_dataloader(tokenizer, 2, 16, "train", device="cpu"))
    message = str(e.value)
    assert "shard_00001.parquet" in message and "not a valid parquet file" in message
    assert "uv run prepare.py" in message and "\n" not in message
