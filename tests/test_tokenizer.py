"""The tokenizer prepare.py trains: vocabulary, special tokens, token_bytes, round trips, and its training text.

The shared tokenizer is trained once per session on the tiny corpus (conftest.tiny_cache). The training-text
tests train their own, on corpora that make the rules visible: a validation-only word that must stay in
pieces, documents longer than the 10,000-character cut, and a character budget.

    uv run pytest tests/test_tokenizer.py
"""

import os
import shutil
import types

import numpy as np
import pytest
import rustbpe
import torch

import prepare
from helpers import make_documents, write_shard

pytestmark = pytest.mark.usefixtures("own_cache")  # what prepare.py trains and writes, in a cache of its own


def test_vocabulary_and_special_tokens(tokenizer):
    enc = tokenizer.enc
    assert tokenizer.get_vocab_size() == prepare.VOCAB_SIZE == 8192
    assert {name: enc.encode_single_token(name) for name in prepare.SPECIAL_TOKENS} == {
        "<|reserved_0|>": 8188, "<|reserved_1|>": 8189, "<|reserved_2|>": 8190, "<|reserved_3|>": 8191}
    assert tokenizer.get_bos_token_id() == 8188
    assert tokenizer.encode("hi", prepend="<|reserved_0|>")[0] == 8188
    assert tokenizer.encode(["a", "b"], prepend=8188) == [[8188] + tokenizer.encode("a"), [8188] + tokenizer.encode("b")]
    assert tokenizer.encode("<|reserved_1|>") != [8189]  # ordinary encoding: special text is just text


def test_token_bytes_are_utf8_lengths_of_decoded_tokens(tokenizer, tiny_cache):
    token_bytes = prepare.load_token_bytes(os.path.join(tiny_cache.tokenizer_dir, "token_bytes.pt"))
    enc = tokenizer.enc
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (8192,)
    partial = 0
    for i in range(8188):
        raw = enc.decode_single_token_bytes(i)
        try:
            expected = len(raw.decode("utf-8").encode("utf-8"))  # == len(raw) for whole characters
        except UnicodeDecodeError:  # a piece of a multi-byte character: decodes to U+FFFD (3 bytes each)
            expected = len(raw.decode("utf-8", errors="replace").encode("utf-8"))
            partial += 1
        assert token_bytes[i] == expected, i
    assert partial > 0, "the corpus has non-Latin text, so some tokens are pieces of characters"
    assert token_bytes[8188:].tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("text", [
    "Digits 0 7 42 123 2026 3.14159 and 1,000,000.",
    "Accents: café, naïve, Ångström, ñandú, Øresund.",
    "CJK: 東京都の天気は晴れです。中文字符。한국어.",
    "Emoji: 🚀🔥 👩‍👩‍👧 ok 😀!",
    "  mixed\twhitespace\n\nand lines\r\n",
])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < 8188 for i in ids)


def test_encode_arrays_equals_encode_with_prepend(tokenizer):
    texts = ["plain words", "", "text that spells <|reserved_0|> is ordinary text", "東京 🚀 12345", "x" * 5000]
    arrays = tokenizer.encode_arrays(texts, prepend="<|reserved_0|>")
    assert [a.dtype for a in arrays] == [np.uint16] * len(texts)
    assert [a.tolist() for a in arrays] == tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())


def test_numbers_split_into_groups_of_at_most_two_digits(tokenizer):
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("1234567")]
    assert "".join(pieces) == "1234567"
    assert all(len(p) <= 2 for p in pieces)


@pytest.fixture
def spy_bpe(monkeypatch):
    """Record every text rustbpe is given; train the real rustbpe on it."""
    seen = []

    class RecordingTokenizer:
        def __init__(self):
            self.bpe = rustbpe.Tokenizer()

        def train_from_iterator(self, texts, vocab_size, pattern):
            def record():
                for text in texts:
                    seen.append(text)
                    yield text
            return self.bpe.train_from_iterator(record(), vocab_size, pattern=pattern)

        def __getattr__(self, name):
            return getattr(self.bpe, name)

    monkeypatch.setattr(prepare, "rustbpe", types.SimpleNamespace(Tokenizer=RecordingTokenizer))
    return seen


def test_validation_documents_never_reach_tokenizer_training(spy_bpe):
    long_doc = "x" + " ".join(make_documents(1, seed=5, mean_words=4000))  # longer than the 10,000 cut
    train = [make_documents(1200, seed=1) + [long_doc], make_documents(1200, seed=2)]
    val = [" zqvalonly" * 400] * 50 + make_documents(200, seed=3)
    for i, docs in enumerate(train):
        write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(i)), docs)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), val)
    prepare.train_tokenizer()
    assert spy_bpe == [doc[:10_000] for doc in train[0] + train[1]]
    assert len(long_doc) > 10_000 and long_doc[:10_000] in spy_bpe
    # and in effect: a word that fills the validation shard was never merged
    tokenizer = prepare.Tokenizer.from_directory()
    assert len(tokenizer.encode(" zqvalonly")) >= 4


def test_training_stops_at_the_character_budget(spy_bpe, monkeypatch):
    monkeypatch.setattr(prepare, "TOKENIZER_MAX_CHARS", 50_000)
    monkeypatch.setattr(prepare, "VOCAB_SIZE", 256 + 4 + 100)  # small enough for 50,000 characters
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(0)), make_documents(1000, seed=1))
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), make_documents(10, seed=3))
    prepare.train_tokenizer()
    total = sum(map(len, spy_bpe))
    assert 50_000 <= total < 50_000 + len(spy_bpe[-1])  # the document that crossed the budget was the last


def test_already_trained_is_skipped(tiny_cache, capsys):
    shutil.copytree(tiny_cache.tokenizer_dir, prepare.TOKENIZER_DIR)
    prepare.train_tokenizer()  # no data at all: would fail if it tried to train
    assert "already trained" in capsys.readouterr().out


def test_needs_a_training_shard_and_the_validation_shard():
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), make_documents(10, seed=3))
    with pytest.raises(SystemExit) as e:
        prepare.train_tokenizer()
    assert "at least one training shard" in str(e.value) and "uv run prepare.py" in str(e.value)
    assert not os.path.exists(prepare.TOKENIZER_DIR)


def test_too_little_text_is_a_clear_error_and_writes_nothing():
    write_shard(os.path.join(prepare.DATA_DIR, prepare.shard_filename(0)), ["tiny text"] * 10)
    write_shard(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), ["tiny"])
    with pytest.raises(SystemExit) as e:
        prepare.train_tokenizer()
    assert "BPE found only" in str(e.value) and "--num-shards" in str(e.value)
    assert not os.path.exists(os.path.join(prepare.TOKENIZER_DIR, "tokenizer.pkl"))


def test_missing_tokenizer_is_a_one_line_error():
    with pytest.raises(SystemExit) as e:
        prepare.Tokenizer.from_directory()
    assert "no tokenizer" in str(e.value) and "uv run prepare.py" in str(e.value)
    with pytest.raises(SystemExit) as e:
        prepare.get_token_bytes()
    assert "token_bytes.pt" in str(e.value) and "uv run prepare.py" in str(e.value)
