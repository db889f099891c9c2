"""
The fixed half of autoresearch: constants, one-time data preparation, and the runtime utilities that
train.py imports (tokenizer, dataloader, and evaluate_bpb, the metric). The agent never edits this file.

    uv run prepare.py                          # 10 training shards + the validation shard, then the tokenizer
    uv run prepare.py --num-shards -1          # all 6542 training shards
    uv run prepare.py --download-workers 16    # more parallel downloads

Everything lives under ~/.cache/autoresearch (data/ and tokenizer/), or under $AUTORESEARCH_CACHE_DIR if set.
Downloads come from $HF_ENDPOINT (default https://huggingface.co), so a mirror can stand in for the hub.
"""

import argparse
import bisect
import copy
import gc
import hashlib
import itertools
import math
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from multiprocessing import Pool

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from files import CACHE_DIR, JUDGE_LOG, JUDGE_LOGGED, VAL_DIGEST, hf_endpoint, judge_line, sweep_temporary_files, write_durably

# ---------------------------------------------------------------------------
# Constants (fixed: they define the benchmark)
# ---------------------------------------------------------------------------

MAX_SEQ_LEN = 2048              # context length for training and evaluation
TIME_BUDGET = 300               # seconds of training (wall clock, compilation excluded)
EVAL_TOKENS = 40 * 524288       # tokens seen by the validation evaluation
VOCAB_SIZE = 8192               # tokenizer size, special tokens included
MAX_SHARD = 6542                # shards are shard_00000.parquet ... shard_06542.parquet
VAL_SHARD = MAX_SHARD           # the validation shard is pinned to the last one, whatever else is downloaded
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"

# GPT-4's split pattern, with numbers split into groups of at most 2 digits (not 3)
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]   # every document starts with it
TOKENIZER_MAX_CHARS = 1_000_000_000  # characters of training text fed to BPE
TOKENIZER_DOC_CAP = 10_000      # each document is cut to its first this many characters for BPE

# ---------------------------------------------------------------------------
# Where things live and how downloads behave (operational: not part of the benchmark)
# ---------------------------------------------------------------------------

DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
TOKENS_DIR = os.path.join(CACHE_DIR, "tokens")  # tokenized shards, so each run does not re-tokenize them
BASE_URL = f"{hf_endpoint()}/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
DOWNLOAD_ATTEMPTS = 5           # per shard
RETRY_WAIT = 2                  # seconds after the first failed attempt, doubling after each later one
CHUNK_SIZE = 1024 * 1024        # bytes per streamed write
DOWNLOAD_TIMEOUT = 30           # seconds without data before an attempt fails
ROUND_TRIP_SAMPLE = "Hello world! 12345 tokens: café, naïve, 東京, 🚀 done."  # a tokenizer must give it back
RUN_LIMIT = 600                 # seconds a run of train.py may last in all (program.md): then the watchdog ends it

# ---------------------------------------------------------------------------
# The judge's own record of the run: which script and process, when training ran, what read the validation data
# ---------------------------------------------------------------------------

def _script_sha256():
    """sha256 of the script this process runs (train.py), read when prepare is imported: as the run started."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, TypeError):
        return "-"


RUN_SCRIPT_SHA256 = _script_sha256()
RUN_ID = uuid.uuid4().hex[:12]  # one per process: the audit counts each run's evaluations
RUN_STARTED = time.time()       # the judge's own clock, started as the run imports it (train.py's clock is its own)
# every setting above as imported (names from files.py included): evaluate_bpb puts back whatever a run reassigns
JUDGE_SETTINGS = {name: copy.deepcopy(value) for name, value in globals().items()
                  if name.isupper() and not callable(value) and not isinstance(value, type(sys))}
_VAL_STEM = VAL_FILENAME[:-len(".parquet")]  # in the validation shard's path and in its token cache's
_judge = dict(
    evaluating=False,        # inside evaluate_bpb
    training_started=None,   # when the first train loader that handed out a second batch handed out its first
    steps=[],                # when each optimizer step of the process ended (the memory fit's probes included)
    val_opened=0,            # times the validation split was read outside the evaluation
)


def _note_optimizer_step(optimizer, args, kwargs):
    """torch.optim's global hook, after every step of every optimizer: the judge's own step times."""
    _judge["steps"].append(time.time())


def _note_validation_read(event, args):
    """Python's audit hook: a file of the validation shard (its parquet file, its token cache) opened by Python
    code outside the evaluation (pyarrow's own reads are C++ and unseen: list_shards counts those)."""
    if event == "open" and not _judge["evaluating"] and isinstance(args[0], str) and _VAL_STEM in args[0]:
        _judge["val_opened"] += 1


register_optimizer_step_post_hook(_note_optimizer_step)
sys.addaudithook(_note_validation_read)  # for the life of the process: no code can take it out

WATCHDOG = """
import os, signal, sys, time
run, limit = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + limit
while time.monotonic() < end:
    if os.getppid() != run:  # the run is over: this process was handed to another parent
        sys.exit(0)
    time.sleep(min(1.0, max(end - time.monotonic(), 0.01)))
print(f"\\nerror: this run passed {limit:g} s, the limit of a run (program.md): the judge's watchdog ended it; "
      f"log it as a crash", file=sys.stderr, flush=True)
os.kill(run, signal.SIGTERM)
for _ in range(100):  # 10 s to end, then killed
    time.sleep(0.1)
    if os.getppid() != run:
        sys.exit(0)
os.kill(run, signal.SIGKILL)
"""


def start_watchdog(limit=RUN_LIMIT):
    """A process of its own that ends this run once it has lasted `limit` seconds: one line on stderr (run.log),
    SIGTERM, and SIGKILL 10 s later; the GPU's memory goes with the process. A process, not a thread: a run stuck
    in a CUDA call, holding Python's lock, is ended all the same. It leaves when the run does."""
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(limit)], stdin=subprocess.DEVNULL)


if os.path.basename(getattr(sys.modules.get("__main__"), "__file__", None) or "") == "train.py":
    start_watchdog()  # a run of train.py (imported by anything else, tests included, no watchdog starts)

# ---------------------------------------------------------------------------
# Shards on disk
# ---------------------------------------------------------------------------

def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def check_parquet(path):
    """Raise ValueError unless path is a whole parquet file with a `text` column."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a valid parquet file ({e})") from None
    if "text" not in schema.names:
        raise ValueError(f"{path} has no `text` column")


def list_shards(split):
    """Sorted, checked shard paths of a split: 'val' is the pinned validation shard, 'train' every other one."""
    assert split in ("train", "val"), split
    if split == "val" and not _judge["evaluating"]:
        _judge["val_opened"] += 1  # the validation split read by anything but the evaluation: the audit's finding
    names = sorted(f for f in os.listdir(DATA_DIR) if f.endswith(".parquet")) if os.path.isdir(DATA_DIR) else []
    names = [f for f in names if (f == VAL_FILENAME) == (split == "val")]
    if not names:
        sys.exit(f"error: no {split} shards in {DATA_DIR}; run `uv run prepare.py` first")
    paths = [os.path.join(DATA_DIR, f) for f in names]
    for path in paths:  # a broken shard fails now, at start-up, not in the middle of a run
        try:
            check_parquet(path)
        except ValueError as e:
            sys.exit(f"error: {e}; delete it and run `uv run prepare.py` to download it again")
    return paths


def read_row_group(path, row_group):
    """The documents (strings) of one row group of a shard."""
    try:
        return pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    except (OSError, pa.ArrowException) as e:
        sys.exit(f"error: {path} could not be read ({e}); delete it and run `uv run prepare.py` to download it again")


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------

def download_shard(index, data_dir, base_url, first_wait):
    """Fetch one shard into a temporary file, checked and synced before its rename; True when it is whole."""
    name = shard_filename(index)
    path = os.path.join(data_dir, name)
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            with requests.get(f"{base_url}/{name}", stream=True, timeout=DOWNLOAD_TIMEOUT) as response:
                response.raise_for_status()

                def save(f):
                    for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
                        f.write(chunk)
                write_durably(path, save, check=check_parquet)  # a body cut short has no parquet footer
            print(f"  {name} done")
            return True
        except (requests.RequestException, OSError, ValueError) as e:
            print(f"  {name}: attempt {attempt}/{DOWNLOAD_ATTEMPTS} failed: {str(e).splitlines()[0]}")
            if attempt < DOWNLOAD_ATTEMPTS:
                time.sleep(first_wait * 2 ** (attempt - 1))
    return False


def download_data(num_shards, download_workers=8):
    """Download training shards 0..num_shards-1 plus the validation shard; return the names that failed."""
    os.makedirs(DATA_DIR, exist_ok=True)
    sweep_temporary_files(DATA_DIR)  # left by interrupted runs
    wanted = list(range(num_shards)) + [VAL_SHARD]
    missing = []
    for index in wanted:
        path = os.path.join(DATA_DIR, shard_filename(index))
        if os.path.exists(path):
            try:
                check_parquet(path)
                continue
            except ValueError as e:
                print(f"  {e}: downloading it again")
                os.remove(path)
        missing.append(index)
    if not missing:
        print(f"Data: all {len(wanted)} shards already present in {DATA_DIR}")
        return []
    workers = min(download_workers, len(missing))
    print(f"Data: downloading {len(missing)} of {len(wanted)} shards from {BASE_URL} with {workers} workers")
    with Pool(processes=workers) as pool:
        ok = pool.map(partial(download_shard, data_dir=DATA_DIR, base_url=BASE_URL, first_wait=RETRY_WAIT), missing)
    failed = [shard_filename(i) for i, good in zip(missing, ok) if not good]
    print(f"Data: {len(wanted) - len(failed)}/{len(wanted)} shards ready in {DATA_DIR}")
    return failed

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def tokenizer_training_texts():
    """Training documents only (never the validation shard), each cut to TOKENIZER_DOC_CAP characters."""
    nchars = 0
    for path in list_shards("train"):
        for row_group in range(pq.read_metadata(path).num_row_groups):
            for text in read_row_group(path, row_group):
                doc = text[:TOKENIZER_DOC_CAP]
                nchars += len(doc)
                yield doc
                if nchars >= TOKENIZER_MAX_CHARS:
                    return


def load_encoding(path):
    """The tiktoken encoding saved at path; ValueError naming the file when it is damaged."""
    try:
        with open(path, "rb") as f:
            enc = pickle.load(f)
    except Exception as e:  # empty (EOFError), cut short or garbage (UnpicklingError, ...)
        raise ValueError(f"{path} cannot be read ({type(e).__name__})") from None
    if not isinstance(enc, tiktoken.Encoding) or enc.n_vocab != VOCAB_SIZE or BOS_TOKEN not in enc.special_tokens_set:
        raise ValueError(f"{path} is not a tokenizer of {VOCAB_SIZE} tokens with {BOS_TOKEN}")
    if enc.decode(enc.encode_ordinary(ROUND_TRIP_SAMPLE)) != ROUND_TRIP_SAMPLE:
        raise ValueError(f"{path} does not give text back as it was")
    return enc


def load_token_bytes(path, device="cpu"):
    """token_bytes.pt (the byte length of each token); ValueError naming the file when it is damaged."""
    try:
        token_bytes = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__})") from None
    if (not isinstance(token_bytes, torch.Tensor) or token_bytes.shape != (VOCAB_SIZE,)
            or token_bytes.dtype != torch.int32 or token_bytes.min() < 0):
        raise ValueError(f"{path} does not hold one byte count per token ({VOCAB_SIZE})")
    return token_bytes


def token_byte_lengths(enc):
    """Bytes of each token's decoded text (special tokens 0); a piece of a multi-byte character decodes to
    U+FFFD and counts 3."""
    special = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    return torch.tensor([0 if i in special else len(enc.decode([i]).encode("utf-8")) for i in range(enc.n_vocab)],
                        dtype=torch.int32)


def train_tokenizer():
    """Train BPE with rustbpe, save it as a tiktoken encoding plus the byte length of every token.

    What is already there is checked first: a tokenizer that loads and round-trips is kept (token_bytes.pt
    rebuilt from it if that is what is damaged); a damaged one is trained again."""
    tokenizer_path = os.path.join(TOKENIZER_DIR, "tokenizer.pkl")
    token_bytes_path = os.path.join(TOKENIZER_DIR, "token_bytes.pt")
    sweep_temporary_files(TOKENIZER_DIR)
    if os.path.exists(tokenizer_path):
        try:
            enc = load_encoding(tokenizer_path)
        except ValueError as e:
            print(f"Tokenizer: {e}: training it again")
        else:
            try:
                load_token_bytes(token_bytes_path)
                print(f"Tokenizer: already trained in {TOKENIZER_DIR}")
            except ValueError as e:
                print(f"Tokenizer: {e}: rebuilding it from tokenizer.pkl")
                write_durably(token_bytes_path, lambda f: torch.save(token_byte_lengths(enc), f))
            return
    shards = [f for f in os.listdir(DATA_DIR) if f.endswith(".parquet")] if os.path.isdir(DATA_DIR) else []
    if len(shards) < 2 or VAL_FILENAME not in shards:
        sys.exit(f"error: tokenizer training needs at least one training shard and {VAL_FILENAME} in {DATA_DIR}; "
                 f"run `uv run prepare.py` with the network available")
    print("Tokenizer: training BPE ...")
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(tokenizer_training_texts(), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    mergeable_ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    offset = len(mergeable_ranks)
    if offset != VOCAB_SIZE - len(SPECIAL_TOKENS):
        sys.exit(f"error: BPE found only {offset} tokens (needs {VOCAB_SIZE - len(SPECIAL_TOKENS)}); "
                 f"the training shards hold too little text: download more with `uv run prepare.py --num-shards N`")
    enc = tiktoken.Encoding(
        name="rustbpe",
        pat_str=bpe.get_pattern(),
        mergeable_ranks=mergeable_ranks,
        special_tokens={name: offset + i for i, name in enumerate(SPECIAL_TOKENS)},
    )
    assert enc.decode(enc.encode_ordinary(ROUND_TRIP_SAMPLE)) == ROUND_TRIP_SAMPLE, "tokenizer round trip failed"
    token_bytes = token_byte_lengths(enc)
    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    write_durably(token_bytes_path, lambda f: torch.save(token_bytes, f))  # first: a tokenizer.pkl implies it
    write_durably(tokenizer_path, lambda f: pickle.dump(enc, f))
    print(f"Tokenizer: {enc.n_vocab} tokens trained in {time.time() - t0:.1f}s, saved to {TOKENIZER_DIR}")


class Tokenizer:
    """The trained tiktoken encoding, with BOS handling."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)
        self.fingerprint = hashlib.sha256(pickle.dumps(enc)).hexdigest()[:16]  # names its token cache

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        """The tokenizer, with both its files checked: a missing or damaged one is one line and exit 1."""
        tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            sys.exit(f"error: no tokenizer at {path}; run `uv run prepare.py` first")
        try:
            enc = load_encoding(path)
            load_token_bytes(os.path.join(tokenizer_dir, "token_bytes.pt"))  # read at the end: checked now
        except ValueError as e:
            sys.exit(f"error: {e}; run `uv run prepare.py` to rebuild it")
        return cls(enc)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def _token_id(self, token):
        """A token id, or the id of a special-token string."""
        return token if isinstance(token, int) else self.enc.encode_single_token(token)

    def encode(self, text, prepend=None, num_threads=8):
        """Ordinary encoding of a string or a list of strings; prepend (an id or special token) goes first."""
        if isinstance(text, str):
            ids = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list):
            ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")
        if prepend is not None:
            prepend_id = self._token_id(prepend)
            ids = [[prepend_id] + row for row in ids]
        return ids[0] if isinstance(text, str) else ids

    def encode_arrays(self, texts, prepend, num_threads=8):
        """encode(texts, prepend=...) as uint16 arrays, tokenized in parallel without Python lists of ints."""
        assert self.enc.n_vocab <= 2**16, "uint16 token arrays need a vocabulary of at most 65536"
        prepend_id = self._token_id(prepend)

        def encode_one(text):
            ids = self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())  # ordinary
            row = np.empty(len(ids) + 1, dtype=np.uint16)
            row[0], row[1:] = prepend_id, ids
            return row

        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(encode_one, texts))

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu"):
    path = os.path.join(TOKENIZER_DIR, "token_bytes.pt")
    if not os.path.exists(path):
        sys.exit(f"error: no {path}; run `uv run prepare.py` first")
    try:
        return load_token_bytes(path, device)
    except ValueError as e:
        sys.exit(f"error: {e}; run `uv run prepare.py` to rebuild it")

# ---------------------------------------------------------------------------
# Tokens: each row group of a shard tokenized once, into the token cache
# ---------------------------------------------------------------------------

def shard_token_groups(path, tokenizer):
    """Each non-empty row group of a shard as (tokens, doc_lengths): its documents' uint16 tokens end to end, each
    document BOS first, and their lengths.

    Each row group is tokenized once and kept in the token cache, tokens/<tokenizer>/<shard>/<group>.npz,
    so later runs read tokens instead of re-tokenizing the same text.
    """
    stem = os.path.basename(path)[:-len(".parquet")]
    cache_dir = os.path.join(TOKENS_DIR, tokenizer.fingerprint, stem)
    stat = os.stat(path)
    source = np.array([stat.st_size, stat.st_mtime_ns, 0], dtype=np.int64)  # a replaced shard invalidates its cache
    metadata = pq.read_metadata(path)
    for row_group in range(metadata.num_row_groups):
        if metadata.row_group(row_group).num_rows == 0:
            continue
        cache = os.path.join(cache_dir, f"{row_group:05d}.npz")
        num_rows = metadata.row_group(row_group).num_rows
        source[2] = row_group  # and a file copied from another row group is not taken for this one
        group = read_token_cache(cache, source, num_rows, tokenizer) if os.path.exists(cache) else None
        if group is None:
            texts = read_row_group(path, row_group)
            docs = tokenizer.encode_arrays(texts, prepend=tokenizer.get_bos_token_id())
            group = np.concatenate(docs), np.array([len(d) for d in docs])
            arrays = dict(source=source, tokens=group[0], doc_lengths=group[1])
            try:
                os.makedirs(cache_dir, exist_ok=True)
                write_durably(cache, lambda f: np.savez(f, **arrays))
            except OSError as e:  # the cache only saves time: a full disk must not stop a run
                print(f"warning: token cache not written ({e})", file=sys.stderr)
        yield group


def token_slices(groups, slice_size=128):
    """The documents of row groups (shard_token_groups) as token arrays, in slices of 128 documents."""
    for tokens, lengths in groups:
        docs = np.split(tokens, np.cumsum(lengths)[:-1])
        for i in range(0, len(docs), slice_size):
            yield docs[i:i + slice_size]


def read_token_cache(cache, source, num_rows, tokenizer):
    """The cached (tokens, doc_lengths) of one row group, or None to tokenize it again: when its shard was replaced,
    or (with one warning line) when the file cannot be read or does not hold one BOS-led document per row."""
    try:
        with np.load(cache) as saved:
            if not np.array_equal(saved["source"], source):
                return None  # the shard was downloaded again since
            tokens, lengths = saved["tokens"], saved["doc_lengths"]
        starts = np.cumsum(lengths) - lengths
        if (tokens.dtype != np.uint16 or len(lengths) != num_rows or lengths.min(initial=1) < 1
                or lengths.sum() != len(tokens) or np.any(tokens[starts] != tokenizer.get_bos_token_id())
                or tokens.max(initial=0) >= tokenizer.get_vocab_size()):
            raise ValueError(f"it does not hold the {num_rows} documents of its row group")
    except Exception as e:  # the cache only saves time: whatever is wrong with it must not stop a run
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        print(f"warning: token cache {cache} is damaged ({why}); tokenizing its row group again", file=sys.stderr)
        return None
    return tokens, lengths


def validation_digest(groups):
    """(digest, tokens) of the validation shard's token stream, its row groups as shard_token_groups gives them:
    sha256 of each group's document lengths and tokens, in order (16 hex digits), and the count of tokens.
    Independent of MAX_SEQ_LEN and EVAL_TOKENS; about 20 ms for 20 M tokens."""
    digest, count = hashlib.sha256(), 0
    for tokens, lengths in groups:
        digest.update(np.ascontiguousarray(lengths, dtype="<i8"))
        digest.update(np.ascontiguousarray(tokens, dtype="<u2"))
        count += len(tokens)
    return digest.hexdigest()[:16], count


def token_batches(tokenizer, split):
    """Endless (documents, epoch): files in sorted order, slices of 128 tokenized documents; epoch from 1."""
    paths = list_shards(split)
    for epoch in itertools.count(1):
        for path in paths:
            for docs in token_slices(shard_token_groups(path, tokenizer)):
                yield docs, epoch


def record_validation_digest():
    """Tokenize the validation shard (into the token cache) and record its digest beside the tokenizer, where a night
    does not write: the morning audit checks the digest of what the judge scored against it."""
    tokenizer = Tokenizer.from_directory()
    digest, tokens = validation_digest(shard_token_groups(list_shards("val")[0], tokenizer))
    write_durably(os.path.join(TOKENIZER_DIR, VAL_DIGEST), lambda f: f.write(f"{digest} {tokens} {VAL_FILENAME}\n".encode()))
    print(f"Validation: {tokens:,} tokens, digest {digest}")

# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing, no padding
# ---------------------------------------------------------------------------

class DocumentBuffer:
    """Tokenized documents waiting to be packed, grouped by length so that a best fit is a bisection.

    Same choices as a linear scan of one list in arrival order: the longest document that fits, the
    earliest among equally long ones; when none fits, the shortest, the earliest among equals.
    """

    def __init__(self):
        self.lengths = []   # sorted distinct lengths present
        self.by_length = {} # length -> deque of documents (np arrays) in arrival order
        self.count = 0

    def add(self, doc):
        n = len(doc)
        if n not in self.by_length:
            bisect.insort(self.lengths, n)
            self.by_length[n] = deque()
        self.by_length[n].append(doc)
        self.count += 1

    def _take(self, i):
        n = self.lengths[i]
        queue = self.by_length[n]
        doc = queue.popleft()
        if not queue:
            del self.lengths[i], self.by_length[n]
        self.count -= 1
        return doc

    def take_best_fit(self, room):
        """Longest document of at most `room` tokens, or else the shortest document (to be cropped)."""
        i = bisect.bisect_right(self.lengths, room) - 1
        return self._take(max(i, 0))


def make_dataloader(tokenizer, B, T, split, buffer_size=1000, device=None, prefetch=4):
    """Endless (inputs, targets, epoch): B x T int64 rows on `device` (default CUDA if available, else CPU).

    Each row is T + 1 tokens of whole documents, chosen best-fit from a buffer of `buffer_size`; when no
    document fits the room left, the shortest is cropped to fill the row. Every row starts with BOS.
    The next slices of documents are read (from the token cache, or tokenized) in a background thread
    while rows are packed. A train loader also keeps the judge's clock: training began when the first train
    loader to hand out a second batch handed out its first (the memory fit's probes take one each).
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return packed_rows(token_batches(tokenizer, split), B, T, buffer_size, device, prefetch, timed=split == "train")


def packed_rows(stream, B, T, buffer_size, device, prefetch, timed=False):
    """make_dataloader's batches, packed from a stream of (documents, epoch)."""
    executor = ThreadPoolExecutor(max_workers=1)  # one worker: slices are read in order
    pending = deque(executor.submit(next, stream) for _ in range(prefetch))
    buffer = DocumentBuffer()
    epoch, first = 1, None
    pin = device.type == "cuda"
    try:
        for handed in itertools.count(1):
            rows = np.empty((B, T + 1), dtype=np.int64)
            for row in rows:
                pos = 0
                while pos < T + 1:
                    while buffer.count < buffer_size:
                        docs, epoch = pending.popleft().result()
                        pending.append(executor.submit(next, stream))
                        for doc in docs:
                            buffer.add(doc)
                    doc = buffer.take_best_fit(T + 1 - pos)
                    n = min(len(doc), T + 1 - pos)
                    row[pos:pos + n] = doc[:n]
                    pos += n
            # inputs and targets side by side in one fresh host tensor: one copy to the device, and no
            # staging buffer reused while an earlier non-blocking copy may still be reading it
            host = torch.from_numpy(np.stack([rows[:, :-1], rows[:, 1:]]))
            if pin:
                host = host.pin_memory()
            both = host.to(device, non_blocking=pin)
            if timed and handed == 1:
                first = time.time()
            if timed and handed == 2 and (_judge["training_started"] is None or first < _judge["training_started"]):
                _judge["training_started"] = first
            yield both[0], both[1], epoch
    finally:
        executor.shutdown(wait=False, cancel_futures=True)

# ---------------------------------------------------------------------------
# Evaluation: the fixed metric
# ---------------------------------------------------------------------------

def evaluate_bpb(model, tokenizer, batch_size, training_seconds=None):
    """Validation bits per byte: summed cross-entropy (nats) of byte-carrying targets / (ln 2 * their bytes).

    Independent of the vocabulary size; special tokens (0 bytes) are left out of both sums. The same
    EVAL_TOKENS // MAX_SEQ_LEN rows from the start of the validation shard every time, whatever the batch
    size (rows of a last, partial batch past them are not counted); runs on the model's device. A batch
    that does not fit in memory is halved and the evaluation started again: the number does not change.

    The judge runs on the settings and the code of prepare.py as it was imported: whatever a run reassigned
    in this module (through any name) is put back for the evaluation (and restored after), and named in the
    judge's line. It loads its own tokenizer (`tokenizer` is train.py's and is not used), reads the whole
    validation shard's tokens once, scores those and logs their digest. Each result is appended to JUDGE_LOG
    with the run, the judge's own timing of its training (train loaders and optimizer steps; training_seconds
    is train.py's claim), the settings, the device, and what read the validation split outside the evaluation.
    """
    t0 = time.time()
    module = globals()
    replaced = [name for name, value in JUDGE_SETTINGS.items() if module.get(name) != value]
    replaced += [name for name, value in JUDGE_CODE.items() if module.get(name) is not value]
    swapped = {name: module.get(name) for name in replaced}
    module.update({name: JUDGE_SETTINGS.get(name, JUDGE_CODE.get(name)) for name in replaced})
    _judge["evaluating"] = True
    try:
        own_tokenizer = Tokenizer.from_directory()
        device = next(model.parameters()).device
        groups = list(shard_token_groups(list_shards("val")[0], own_tokenizer))
        val_bpb = _bits_per_byte_fitted(model, batch_size, device, groups)
        fields = dict(run=RUN_ID, elapsed=f"{t0 - RUN_STARTED:.1f}", **training_record(t0),
                      training_claimed="-" if training_seconds is None else f"{training_seconds:.1f}",
                      eval_seconds=f"{time.time() - t0:.1f}", **{name: JUDGE_SETTINGS[name] for name in JUDGE_LOGGED},
                      device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                      torch=torch.__version__, precision=str(torch.get_autocast_dtype(device.type))[6:]
                      if torch.is_autocast_enabled(device.type) else "float32",  # train.py evaluates as it trained
                      val_digest=validation_digest(groups)[0],
                      val_opened=_judge["val_opened"], replaced=",".join(replaced) or "-")
        log_evaluation(val_bpb, EVAL_TOKENS // MAX_SEQ_LEN * MAX_SEQ_LEN, fields)
        return val_bpb
    finally:
        _judge["evaluating"] = False
        module.update({name: value for name, value in swapped.items() if value is not None})


def training_record(now):
    """The judge's timing of the training, as judge.log's fields: seconds from its start (a train loader's first of
    two batches) to `now`, the optimizer steps since, and their median and longest seconds ("-" where unseen)."""
    started = _judge["training_started"]
    if started is None:
        return dict(training="-", steps=0, step_seconds="-", longest_step="-")
    ends = [started] + [t for t in _judge["steps"] if started <= t <= now]
    gaps = sorted(b - a for a, b in zip(ends, ends[1:]))
    return dict(training=f"{now - started:.1f}", steps=len(gaps),
                step_seconds=f"{gaps[len(gaps) // 2]:.3f}" if gaps else "-", longest_step=f"{gaps[-1]:.3f}" if gaps else "-")


def _bits_per_byte_fitted(model, batch_size, device, groups):
    """_bits_per_byte at the largest batch, from batch_size down by halves, that fits in memory."""
    token_bytes = get_token_bytes(device)
    rows = EVAL_TOKENS // MAX_SEQ_LEN
    while True:
        try:
            return _bits_per_byte(model, batch_size, rows, token_bytes, device, groups)
        except Exception as e:
            if batch_size == 1 or not is_out_of_memory(e):
                raise
        print(f"Evaluation batch {batch_size} does not fit in memory: using {batch_size // 2}", flush=True)
        batch_size //= 2
        release_memory(device)


def _bits_per_byte(model, batch_size, rows, token_bytes, device, groups):
    """Bits per byte of `rows` rows packed from the validation shard's row groups, read once by the judge."""
    stream = ((docs, epoch) for epoch in itertools.count(1) for docs in token_slices(groups))
    loader = packed_rows(stream, batch_size, MAX_SEQ_LEN, 1000, device, prefetch=4)
    nats, nbytes = [], []
    try:
        with torch.no_grad():
            for start in range(0, rows, batch_size):
                x, y, _ = next(loader)
                loss = model(x, y, reduction="none").view(-1)   # (B*T,) nats per target
                counted = torch.arange(y.numel(), device=device) < (rows - start) * MAX_SEQ_LEN  # (B*T,)
                target_bytes = token_bytes[y.view(-1)] * counted  # (B*T,)
                nats.append((loss * (target_bytes > 0)).sum())
                nbytes.append(target_bytes.sum())
    finally:
        loader.close()
    total_nats = sum(t.item() for t in nats)
    total_bytes = sum(t.item() for t in nbytes)
    return total_nats / (math.log(2) * total_bytes)


def log_evaluation(val_bpb, tokens, fields):
    """The judge's own record, for the morning audit (analysis.py): one line appended to JUDGE_LOG (its format:
    files.judge_line), with the sha256 of the train.py that ran. Never stops a run."""
    try:
        with open(JUDGE_LOG, "a", encoding="utf-8") as f:
            f.write(judge_line(RUN_SCRIPT_SHA256, val_bpb, tokens, fields))
    except OSError as e:
        print(f"warning: {JUDGE_LOG} not written ({e}); the morning audit will miss this evaluation", file=sys.stderr)


# Out of memory, on any device: the evaluation halves its batch (the memory fit in machine.py skips a size)

def is_out_of_memory(error):
    """A failed allocation on any device: CUDA's OutOfMemoryError, the CPU or MPS allocator's RuntimeError."""
    message = str(error)
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message))


def release_memory(device):
    """Hand cached blocks back after a failed allocation, so the next, smaller attempt can have them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# The judge's code as prepare.py was imported: evaluate_bpb runs on these functions whatever a run reassigns here
JUDGE_CODE = {name: value for name, value in globals().items()
              if callable(value) and getattr(value, "__module__", None) in (__name__, "files")}

# ---------------------------------------------------------------------------
# Main: download, then train the tokenizer
# ---------------------------------------------------------------------------

def check_prepared():
    """What a run needs, checked without downloading anything: the shards, the tokenizer, the validation digest.
    0 when all is there; else one line saying what is missing, and 1."""
    print(f"Cache directory: {CACHE_DIR}")
    try:
        shards = [os.path.basename(path) for split in ("train", "val") for path in list_shards(split)]
        Tokenizer.from_directory()
    except SystemExit as e:
        print(str(e).replace("error: ", "error: not ready: ", 1), file=sys.stderr)
        return 1
    print(f"Data: {len(shards) - 1} training shards and {VAL_FILENAME}")
    print(f"Tokenizer: {VOCAB_SIZE} tokens in {TOKENIZER_DIR}")
    if not os.path.exists(os.path.join(TOKENIZER_DIR, VAL_DIGEST)):
        print("Validation digest: not recorded (`uv run prepare.py` records it; the morning audit notes its absence)")
    print("Ready: `uv run train.py`")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download climbmix shards and train the tokenizer (one time).")
    parser.add_argument("--num-shards", type=int, default=10,
                        help=f"training shards to download, -1 for all {MAX_SHARD} (the validation shard is always added)")
    parser.add_argument("--download-workers", type=int, default=8, help="parallel download processes")
    parser.add_argument("--check", action="store_true", help="say whether the data and the tokenizer are ready, "
                        "download nothing (program.md's setup)")
    args = parser.parse_args(argv)
    if args.check:
        sys.exit(check_prepared())
    if args.num_shards == -1:
        args.num_shards = MAX_SHARD
    if not 1 <= args.num_shards <= MAX_SHARD:
        parser.error(f"--num-shards must be between 1 and {MAX_SHARD}, or -1 for all; got {args.num_shards}")
    if args.download_workers < 1:
        parser.error(f"--download-workers must be at least 1; got {args.download_workers}")

    print(f"Cache directory: {CACHE_DIR}")
    sweep_temporary_files(TOKENS_DIR)
    failed = download_data(args.num_shards, args.download_workers)
    if failed:
        sys.exit(f"error: {len(failed)} shard(s) still failed after {DOWNLOAD_ATTEMPTS} attempts: {', '.join(failed)}; "
                 f"check the network (or HF_ENDPOINT) and run `uv run prepare.py` again (finished shards are kept)")
    train_tokenizer()
    record_validation_digest()
    print("Done: ready to train with `uv run train.py`")


if __name__ == "__main__":
    main()
