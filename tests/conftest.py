"""Shared fixtures: a synthetic corpus written as tiny climbmix-shaped shards, and a tokenizer trained on it.

Everything lives in pytest's tmp dirs; nothing touches ~/.cache/autoresearch or the network.
"""

import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import weakref
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

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


def point_prepare_at(mp, root):
    for name, sub in (("DATA_DIR", "data"), ("TOKENIZER_DIR", "tokenizer"), ("TOKENS_DIR", "tokens")):
        mp.setattr(prepare, name, str(root / sub))


@pytest.fixture(scope="session")
def filled_cache(tiny_cache, tmp_path_factory):
    """The tiny cache (data, tokenizer) with a token cache of its own, filled once, as a first run leaves it."""
    root = tmp_path_factory.mktemp("filled") / "cache"
    shutil.copytree(tiny_cache.dir, root, ignore=shutil.ignore_patterns("tokens"))
    with pytest.MonkeyPatch.context() as mp:
        point_prepare_at(mp, root)
        tokenizer = prepare.Tokenizer.from_directory()
        for path in prepare.list_shards("train"):
            list(prepare.shard_token_slices(path, tokenizer))
    return root


@pytest.fixture(scope="session", autouse=True)
def nothing_written_where_the_suite_runs():
    """No test leaves a judge's log, a ledger or a run log in the directory pytest runs in."""
    def state():
        names = ("judge.log", "results.tsv", "run.log")
        return {name: os.path.exists(name) and os.stat(name).st_mtime_ns for name in names}
    before = state()
    yield
    assert state() == before, f"a test wrote into {os.getcwd()}: {state()} (was {before})"


@pytest.fixture(autouse=True)
def no_home_cache(monkeypatch, tmp_path):
    """Every test starts with prepare's directories (and the judge's log) in its own tmp dir, never
    ~/.cache/autoresearch or the working directory."""
    for name in ("DATA_DIR", "TOKENIZER_DIR", "TOKENS_DIR"):
        monkeypatch.setattr(prepare, name, str(tmp_path / "cache" / name.lower()))
    monkeypatch.setattr(prepare, "JUDGE_LOG", str(tmp_path / "judge.log"))  # not the working directory


def judge_settings(mp, **values):
    """Set the benchmark's constants for a test as an edited prepare.py would: the module's names and the judge's
    own copy (evaluate_bpb puts back whatever was reassigned in the module alone)."""
    for name, value in values.items():
        mp.setattr(prepare, name, value)
        mp.setitem(prepare.JUDGE_SETTINGS, name, value)


@pytest.fixture
def use_cache(monkeypatch, tiny_cache):
    """Point prepare at the tiny cache for one test (a token cache of its own)."""
    monkeypatch.setattr(prepare, "DATA_DIR", tiny_cache.data_dir)
    monkeypatch.setattr(prepare, "TOKENIZER_DIR", tiny_cache.tokenizer_dir)
    return tiny_cache


@pytest.fixture
def tokenizer(use_cache):
    return prepare.Tokenizer.from_directory()


# --- a CUDA driver for torch's own Python layer -----------------------------------------------------------

class FakeCudaDriver:
    """The entry points that torch.cuda's Python functions call into its C extension (device count and properties,
    the current device, the memory fraction, the allocator's statistics and cache, synchronisation), answered
    for one GPU without a driver, so that CPU tests run torch's own wrappers, with every argument check they
    make, on the devices our code passes them. Each entry point takes the device index as an int, as the
    compiled one does (a torch.device is a TypeError there). allocate() and free() stand in for what CUDA's
    caching allocator counts; calls lists every entry point reached, in order. No tensor is ever on CUDA."""

    def __init__(self, name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, capability=(9, 0), fraction=1.0):
        self.properties = SimpleNamespace(name=name, total_memory=total_memory, major=capability[0],
                                          minor=capability[1], multi_processor_count=132)
        self.fraction, self.allocated, self.peak, self.calls = fraction, 0, 0, []

    def _index(self, entry_point, index):
        if type(index) is not int:  # the compiled entry points parse a long
            raise TypeError(f"{entry_point}(): argument 'device' must be int, not {type(index).__name__}")
        assert index == 0, f"{entry_point}: there is one GPU, not {index}"
        self.calls.append(entry_point)

    def install(self, mp):
        C = torch._C
        mp.setattr(C, "_cuda_getDeviceCount", lambda: 1)
        mp.setattr(torch.cuda, "_cached_device_count", None)
        mp.setattr(torch.cuda, "_initialized", True)  # what a successful _cuda_init() leaves behind: _lazy_init is done
        mp.setattr(torch.cuda, "default_generators", (torch.Generator(),))  # also _cuda_init's (torch.compile saves them)
        mp.setattr(torch.cuda, "_get_device_properties", lambda i: self._index("getDeviceProperties", i) or
                   self.properties, raising=False)  # defined by _cuda_init
        mp.setattr(C, "_cuda_getDevice", lambda: 0)
        mp.setattr(torch.cuda, "_exchange_device", lambda i: self._index("exchangeDevice", i) or 0)
        mp.setattr(torch.cuda, "_maybe_exchange_device", lambda i: self._index("maybeExchangeDevice", i) or 0)
        mp.setattr(C, "_cuda_getMemoryFraction", lambda i: self._index("getMemoryFraction", i) or self.fraction)
        mp.setattr(C, "_cuda_setMemoryFraction", lambda f, i: self._index("setMemoryFraction", i) or
                   setattr(self, "fraction", f))
        mp.setattr(C, "_cuda_memoryStats", lambda i: self._index("memoryStats", i) or {
            "allocated_bytes": {"all": {"current": self.allocated, "peak": self.peak}}})
        mp.setattr(C, "_cuda_resetPeakMemoryStats", lambda i: self._index("resetPeakMemoryStats", i) or
                   setattr(self, "peak", self.allocated))
        mp.setattr(C, "_cuda_synchronize", lambda: self.calls.append("synchronize"))
        mp.setattr(C, "_cuda_emptyCache", lambda: self.calls.append("emptyCache"))
        return self

    def allocate(self, nbytes, owner):
        """Count nbytes until `owner` (a tensor) is freed; past the memory fraction, raise what CUDA raises."""
        limit = self.properties.total_memory * self.fraction
        if self.allocated + nbytes > limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {nbytes / 2**20:.2f} MiB. GPU 0 has a total capacity of "
                f"{self.properties.total_memory / 2**30:.2f} GiB of which {(limit - self.allocated) / 2**20:.2f} MiB "
                f"is free. Of the allocated memory {self.allocated / 2**20:.2f} MiB is allocated by PyTorch")
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        weakref.finalize(owner, self.free, nbytes)

    def free(self, nbytes):
        self.allocated -= nbytes


@pytest.fixture
def fake_cuda(monkeypatch):
    """One H100 (80 GiB) behind torch.cuda's real Python layer; the test changes .properties or .fraction as it
    needs. Only where torch is built with CUDA and no real GPU is present."""
    if not torch.backends.cuda.is_built():
        pytest.skip("this torch is built without CUDA: torch.cuda's wrappers refuse before the driver")
    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: the GPU check runs these lines for real")
    return FakeCudaDriver().install(monkeypatch)


# --- the project as an agent sees it: a copy with its constants edited down --------------------------------

TINY_PREPARE = dict(MAX_SEQ_LEN="64", TIME_BUDGET="1", EVAL_TOKENS="4 * 8 * 64")  # a run: about 7 s on 2 cores
TINY_TRAIN = dict(DEPTH="2", ASPECT_RATIO="32", HEAD_DIM="32", DEVICE_BATCH_SIZE="2", TOTAL_BATCH_SIZE="2 * 2 * 64")
PROJECT_FILES = ["train.py", "prepare.py", "machine.py", "analysis.py", "program.md", "README.md", "pyproject.toml",
                 "uv.lock", ".python-version", ".gitignore"]


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


# --- the agent, as program.md describes it, and one scripted night ------------------------------------------

with open(os.path.join(ROOT, "program.md")) as f:
    PROGRAM = f.read()


def code_lines(markdown):
    """The lines of a markdown text's fenced code blocks, each block dedented."""
    return [line for block in re.findall(r"```\n(.*?)```", markdown, flags=re.S)
            for line in textwrap.dedent(block).splitlines()]


def one_command(lines, prefix, where):
    """The one line of `lines` (code lines of the file named `where`) that starts with `prefix`."""
    found = sorted({line for line in lines if line.startswith(prefix)})
    assert len(found) == 1, f"{where} should show exactly one `{prefix}...` command, found {found}"
    return found[0]


CODE_LINES = code_lines(PROGRAM)


def command(prefix):
    """The one code line of program.md that starts with `prefix`."""
    return one_command(CODE_LINES, prefix, "program.md")


RUN = command("uv run train.py")
GREP = command("grep ")
CRASH = command("tail ")
DECIDE = command("uv run analysis.py --decide")
AMEND = command("git commit --amend")
HEADER = command("commit\t")
RESET = re.search(r"`(git reset --hard [^`]+)`", PROGRAM).group(1)


class Agent:
    """Does what program.md says, in a shell, in the project directory."""

    def __init__(self, project, cache_dir):
        self.project = project
        self.env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache_dir), UV_NO_SYNC="1", UV_FROZEN="1",
                        UV_PROJECT_ENVIRONMENT=sys.prefix)  # the already-synced environment, left untouched
        self.uv = os.environ.get("UV") or shutil.which("uv")
        self.logs = []  # (description, exit status, run.log) of every training run, for tests of the run itself

    def sh(self, cmd, check=True):
        return self.run(cmd, check).stdout

    def run(self, cmd, check=True):
        if cmd.startswith("uv run ") and not self.uv:
            cmd = f"{sys.executable} {cmd[len('uv run '):]}"  # the same command without uv on PATH
        result = subprocess.run(cmd, shell=True, cwd=self.project, env=self.env, capture_output=True, text=True,
                                timeout=600)
        assert not check or result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
        return result

    def git(self, *args):
        return self.sh("git " + " ".join(args)).strip()

    def experiment(self, description, edit=None, fix=None):
        """Edit, commit, run, read the result; on a crash fix it (amend) once if `fix` is given; decide, re-run
        while told to, log one row per run; keep or reset. Returns (status, [val_bpb per run], decisions, tail)."""
        start = self.git("rev-parse", "HEAD")
        if edit:
            edit(os.path.join(self.project, "train.py"))
            self.git("commit", "-qam", f"'{description}'")
        runs, decisions, tail = [], [], ""
        while True:
            exit_status = self.run(RUN, check=False).returncode
            with open(os.path.join(self.project, "run.log"), newline="") as f:  # keep the \r of the progress lines
                self.logs.append((description, exit_status, f.read()))
            values = dict(re.findall(r"^(val_bpb|peak_vram_mb):\s+(\S+)$", self.sh(GREP, check=False), flags=re.M))
            if not values:
                tail = self.sh(CRASH)
                if fix is None:
                    status, runs = "crash", [(0.0, 0.0)]
                    break
                fix(os.path.join(self.project, "train.py"))  # a trivial mistake: fixed, folded into the commit
                self.sh(AMEND)
                fix = None
                continue
            runs.append((float(values["val_bpb"]), float(values["peak_vram_mb"]) / 1024))
            decisions.append(self.sh(DECIDE).strip())
            status = decisions[-1].split(":")[0]
            if status != "rerun":
                break
        commit = self.git("rev-parse", "--short=7", "HEAD")
        with open(os.path.join(self.project, "results.tsv"), "a") as f:
            f.writelines(f"{commit}\t{v:.6f}\t{m:.1f}\t{status}\t{description}\n" for v, m in runs)
        if status != "keep":
            self.sh(RESET)
            assert self.git("rev-parse", "HEAD") == start
        return status, [v for v, _ in runs], decisions, tail


def replace_in(path, old, new):
    with open(path) as f:
        text = f.read()
    assert text.count(old) == 1, f"{old!r} is not in {path} once"
    with open(path, "w") as f:
        f.write(text.replace(old, new))


@pytest.fixture(scope="session")
def night(tiny_cache, tmp_path_factory):
    """One scripted night, shared by the contract and the morning report: setup, the baseline run twice, a
    worse idea, a syntax error, a divergence, and a better idea committed with a typo (fixed by amending),
    run again when told and kept. Tests that change the project work on a copy (copy_night)."""
    # the night's baseline has lm_head's learning rate 5 times the default: the better idea, back to the default,
    # gains 0.02 to 0.04 on the tiny model (the more steps, the less), 10 times its noise, however busy the machine
    project = str(make_project(tmp_path_factory.mktemp("agent") / "autoresearch",
                               train_constants=dict(TINY_TRAIN, UNEMBEDDING_LR="0.02")))
    agent = Agent(project, tiny_cache.dir)
    agent.git("init", "-q", "-b", "main")
    agent.git("add", "-A")
    agent.git("-c", "user.name=human", "-c", "user.email=h@example.com", "commit", "-qm", "'the project'")
    agent.git("config", "user.name", "agent")
    agent.git("config", "user.email", "agent@example.com")
    # setup, as program.md lists it
    assert agent.git("branch", "--list", "'autoresearch/*'") == ""
    agent.git("checkout", "-q", "-b", "autoresearch/nov22", "main")
    assert {"data", "tokenizer"} <= set(os.listdir(tiny_cache.dir))
    with open(os.path.join(project, "results.tsv"), "w") as f:
        f.write(HEADER + "\n")
    baseline_commit = agent.git("rev-parse", "HEAD")

    def better_with_a_typo(path):
        set_constants(path, UNEMBEDDING_LR="0.004")
        replace_in(path, "import gc\n", "import gc\nimport gcc\n")

    runs = {
        "baseline": agent.experiment("baseline"),
        "worse": agent.experiment("learning rates to zero",
                                  lambda p: set_constants(p, MATRIX_LR="0.0", EMBEDDING_LR="0.0", UNEMBEDDING_LR="0.0")),
        "syntax": agent.experiment("half-written edit", lambda p: open(p, "a").write("\ndef broken(:\n")),
        "nan": agent.experiment("MATRIX_LR 1e30", lambda p: set_constants(p, MATRIX_LR="1e30")),
        "better": agent.experiment("UNEMBEDDING_LR 0.02 -> 0.004", better_with_a_typo,
                                   fix=lambda p: replace_in(p, "import gcc\n", "")),
    }
    return agent, runs, baseline_commit


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist's loadgroup, the tests of the scripted night share one worker: the night is built once."""
    for item in items:
        if "night" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("night"))


if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `-n auto`'s workers: one thread each, for it and what it runs
    import torch
    torch.set_num_threads(1)  # a worker a core: more threads only fight over the cores
    os.environ["OMP_NUM_THREADS"] = "1"
