"""Shared fixtures: a synthetic corpus written as tiny climbmix-shaped shards, and a tokenizer trained on it.

Everything lives in pytest's tmp dirs; nothing touches ~/.cache/autoresearch or the network.
"""

import os
import random
import re
import shutil
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402

SYLLABLES = ["ka", "to", "ri", "mu", "sen", "lo", "var", "pi", "que", "dra", "el", "on", "us", "tha", "gri", "zo",
             "bel", "nor", "fi", "ast", "ch", "wy", "ex", "ul", "mé", "ça", "ñu", "ør"]
EXTRAS = ["東京", "中文字符", "日本語", "🚀", "😀", "naïve", "café", "Ελληνικά", "русский", "2026", "3.14159"]


_vocab_rng = random.Random(1234)
VOCAB = ["".join(_vocab_rng.choice(SYLLABLES) for _ in range(_vocab_rng.randint(1, 5))) for _ in range(12000)]
ZIPF = [1.0 / (rank + 1) for rank in range(len(VOCAB))]


def make_documents(n, seed, mean_words=120):
    """n documents of pseudo-words from one shared vocabulary (Zipf), numbers, punctuation, non-Latin text."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        n_words = max(1, int(rng.lognormvariate(0, 1.0) * mean_words))
        words = rng.choices(VOCAB, ZIPF, k=n_words)
        for i in range(0, n_words, 9):
            roll = rng.random()
            if roll < 0.3:
                words[i] = str(rng.randint(0, 10 ** rng.randint(1, 7)))
            elif roll < 0.4:
                words[i] = rng.choice(EXTRAS)
            elif roll < 0.6:
                words[i] = words[i].capitalize() + rng.choice([".", ",", "!", "?", ";", ":\n"])
        docs.append(" ".join(words))
    return docs


def write_shard(path, docs, row_group_size=256):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)


def write_corpus(data_dir, train_docs=(1500, 1500), val_docs=600, seed=0):
    """Training shards 0..k-1 and the validation shard; returns {filename: documents}."""
    shards = {}
    for i, n in enumerate(train_docs):
        shards[prepare.shard_filename(i)] = make_documents(n, seed=seed * 100 + i)
    shards[prepare.VAL_FILENAME] = make_documents(val_docs, seed=seed * 100 + 99)
    for name, docs in shards.items():
        write_shard(os.path.join(data_dir, name), docs)
    return shards


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache dir (data/ + tokenizer/) with 2 training shards, the validation shard and a trained tokenizer."""
    cache = tmp_path_factory.mktemp("cache")
    data_dir, tokenizer_dir = str(cache / "data"), str(cache / "tokenizer")
    shards = write_corpus(data_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "DATA_DIR", data_dir)
        mp.setattr(prepare, "TOKENIZER_DIR", tokenizer_dir)
        prepare.train_tokenizer()
    return SimpleNamespace(dir=cache, data_dir=data_dir, tokenizer_dir=tokenizer_dir, shards=shards)


@pytest.fixture(autouse=True)
def no_home_cache(monkeypatch, tmp_path):
    """Every test starts with prepare's directories in its own tmp dir, never ~/.cache/autoresearch."""
    for name in ("DATA_DIR", "TOKENIZER_DIR", "TOKENS_DIR"):
        monkeypatch.setattr(prepare, name, str(tmp_path / "cache" / name.lower()))


@pytest.fixture
def use_cache(monkeypatch, tiny_cache):
    """Point prepare at the tiny cache for one test (a token cache of its own)."""
    monkeypatch.setattr(prepare, "DATA_DIR", tiny_cache.data_dir)
    monkeypatch.setattr(prepare, "TOKENIZER_DIR", tiny_cache.tokenizer_dir)
    return tiny_cache


@pytest.fixture
def tokenizer(use_cache):
    return prepare.Tokenizer.from_directory()


# --- the project as an agent sees it: a copy with its constants edited down --------------------------------

TINY_PREPARE = dict(MAX_SEQ_LEN="64", TIME_BUDGET="5", EVAL_TOKENS="4 * 8 * 64")
TINY_TRAIN = dict(DEPTH="2", ASPECT_RATIO="32", HEAD_DIM="32", DEVICE_BATCH_SIZE="2", TOTAL_BATCH_SIZE="2 * 2 * 64")
PROJECT_FILES = ["train.py", "prepare.py", "program.md", "README.md", "pyproject.toml", "uv.lock", ".python-version",
                 ".gitignore"]


def set_constants(path, **values):
    """Edit UPPER_CASE assignments the way an agent does: the value changes, the inline comment stays."""
    with open(path) as f:
        text = f.read()
    for name, value in values.items():
        text, n = re.subn(rf"^({name} = )[^#\n]*?(\s*#.*)?$", lambda m: m.group(1) + value + (m.group(2) or ""),
                          text, count=1, flags=re.M)
        assert n == 1, f"{name} is not assigned at the top level of {path}"
    with open(path, "w") as f:
        f.write(text)


def make_project(directory, prepare_constants=TINY_PREPARE, train_constants=TINY_TRAIN):
    """Copy the project files into `directory` and shrink the constants so a run takes seconds on a CPU."""
    os.makedirs(directory, exist_ok=True)
    for name in PROJECT_FILES:
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), os.path.join(directory, name))
    set_constants(os.path.join(directory, "prepare.py"), **prepare_constants)
    set_constants(os.path.join(directory, "train.py"), **train_constants)
    return directory
