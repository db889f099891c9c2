"""Helpers shared by the tests (and by tools/ that build on them): a synthetic corpus, project copies with their
constants edited down, the agent as program.md describes it, a loopback data server, train.py's runs and
their logs, train.main() on a fake clock, plain references, and a CUDA driver for torch's own wrappers.
Fixtures are in conftest.py; nothing here touches ~/.cache/autoresearch or the network.
"""

import contextlib
import copy
import gc
import http.server
import io
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from datetime import datetime, timezone
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402

# --- the tools a test needs that a machine may lack: missing, the test fails, unless the opt-out names them ------

AGENTS_BIN = os.path.join(ROOT, "night", "node_modules", ".bin")


def working_bwrap():
    """bwrap's path where it is installed and can create its namespaces (a container may forbid them), else None."""
    path = shutil.which("bwrap")
    ok = path and subprocess.run([path, "--ro-bind", "/", "/", "true"], capture_output=True).returncode == 0
    return path if ok else None


TOOLS = {  # name: (where it is, or None; how to get it)
    "claude": (lambda: shutil.which("claude", path=AGENTS_BIN), "`npm ci --prefix night` installs the pinned Claude Code"),
    "codex": (lambda: shutil.which("codex", path=AGENTS_BIN), "`npm ci --prefix night` installs the pinned Codex"),
    "uv": (lambda: os.environ.get("UV") or shutil.which("uv"), "`pip install uv`"),
    "g++": (lambda: shutil.which("g++"), "a C++ compiler for inductor (`apt-get install g++`)"),
    "bwrap": (working_bwrap, "bubblewrap, able to create its namespaces here (`apt-get install bubblewrap`)"),
}
TOOLS_OPT_OUT = "AUTORESEARCH_TESTS_WITHOUT"  # e.g. "claude,codex": their tests skip, and the summary says why


def require(tool):
    """The tool's path. Where it is missing the test fails with how to get it, unless TOOLS_OPT_OUT names it: then
    it skips, with the reason in pytest's summary (-rs)."""
    where, how = TOOLS[tool]
    if path := where():
        return path
    message = f"{tool} is missing: {how}"
    if tool in re.split(r"[,\s]+", os.environ.get(TOOLS_OPT_OUT, "")):
        pytest.skip(f"{message} ({TOOLS_OPT_OUT} names it)")
    pytest.fail(f"{message}; or set {TOOLS_OPT_OUT}={tool} to skip the tests that need it", pytrace=False)


def git(directory, *args, env=None):
    """stdout of a git command in `directory` (stripped); a failing command raises."""
    return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


def branch_made(directory, branch):
    """When git's reflog says `branch` was created, in whole seconds (what analysis.py counts a night from)."""
    log = git(directory, "reflog", "show", "--date=unix", "--format=%gd", f"refs/heads/{branch}", "--")
    return int(log.splitlines()[-1].rsplit("@{", 1)[1].rstrip("}"))


def judge_time(seconds):
    """A judge.log time field for a moment in Unix seconds (UTC, whole seconds, as evaluate_bpb writes it)."""
    return f"{datetime.fromtimestamp(seconds, timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


# --- a synthetic corpus, climbmix-shaped --------------------------------------------------------------------

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


# --- prepare.py pointed elsewhere, its settings changed as an edited prepare.py would -----------------------

def point_prepare_at(mp, root):
    for name, sub in (("DATA_DIR", "data"), ("TOKENIZER_DIR", "tokenizer"), ("TOKENS_DIR", "tokens")):
        mp.setattr(prepare, name, str(root / sub))


def judge_settings(mp, **values):
    """Set the benchmark's constants for a test as an edited prepare.py would: the module's names and the judge's
    own copy (evaluate_bpb puts back whatever was reassigned in the module alone)."""
    for name, value in values.items():
        mp.setattr(prepare, name, value)
        mp.setitem(prepare.JUDGE_SETTINGS, name, value)


# --- a CUDA driver for torch's own Python layer -------------------------------------------------------------

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


# --- the project as an agent sees it: a copy with its constants edited down ---------------------------------

TINY_PREPARE = dict(MAX_SEQ_LEN="64", TIME_BUDGET="1", EVAL_TOKENS="4 * 8 * 64")  # a run: about 7 s on 2 cores


TINY_TRAIN = dict(DEPTH="2", ASPECT_RATIO="32", HEAD_DIM="32", DEVICE_BATCH_SIZE="2", TOTAL_BATCH_SIZE="2 * 2 * 64")


PROJECT_FILES = ["train.py", "prepare.py", "machine.py", "files.py", "analysis.py", "program.md", "README.md", "pyproject.toml",
                 "uv.lock", ".python-version", ".gitignore"]


def parameters_M(depth, aspect_ratio, head_dim, vocab=8192):
    """The summary's num_params_M for train.py's constants, worked out from the architecture, not from train.py:
    width depth * aspect rounded up to whole heads; per layer q, k, v and the projection (4 C^2) and the MLP
    (8 C^2); the token embedding, lm_head and a value embedding on every other layer (V C each, the last layer
    included); a 32 -> heads gate per value embedding; two scalars a layer."""
    width = -(-depth * int(aspect_ratio) // int(head_dim)) * int(head_dim)
    heads, value_layers = width // int(head_dim), (depth + 1) // 2
    total = (2 + value_layers) * vocab * width + depth * 12 * width**2 + value_layers * 32 * heads + 2 * depth
    return f"{total / 1e6:.1f}"


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


# --- the agent, as program.md describes it ------------------------------------------------------------------

with open(os.path.join(ROOT, "program.md")) as f:
    PROGRAM = f.read()


def code_lines(markdown):
    """The lines of a markdown text's fenced code blocks, each block dedented."""
    return [line for block in re.findall(r"```\n(.*?)```", markdown, flags=re.S)
            for line in textwrap.dedent(block).splitlines()]


EXAMPLE = {"<tag>": "nov23", "<gpu>": "H100", "<i>": "1", "<id>": "w1-2", "<commit>": "abc1234", "<job>": "3",
           "<base>": "HEAD", "<sha256>": "0" * 64, "<description>": "an idea", "<what you tried>": "an idea"}
COMMAND_WORDS = {"git", "uv", "grep", "tail", "cat", "mkdir", "scp", "sky", "sha256sum"}
FORBIDDEN_COMMANDS = [  # what no night's settings may let through
    "uv add numpy", "uv sync", "uv lock --upgrade", "uv pip install x", "uv run --with numpy train.py",
    "pip install x", "python -m pip install x", "git push", "git push origin autoresearch/nov23",
    "sed -i 's/300/600/' prepare.py", "echo 'TIME_BUDGET = 600' >> prepare.py", "rm -rf .git",
    "uv run train.py > run.log 2>&1 && git push", "git commit -am x; curl https://example.com",
    "curl -s https://example.com", "python3 -c 'open(\"machine.py\", \"a\").write(\"#\")'",
]
JUDGE_LOG_WRITES = [  # what a one-GPU night's settings may not let through: the judge's log is the run's own
    "cat logs/w1-2.judge.log >> judge.log", "grep x run.log > judge.log", "tail -n 1 run.log >> judge.log",
    "uv run train.py > judge.log 2>&1",
]


def protocol_commands(*names):
    """Every command the named protocols (program.md, parallel/program.md) show, in code blocks or inline,
    placeholders filled in."""
    commands = set()
    for name in names:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for command in code_lines(text) + inline:
            if command.split()[0] in COMMAND_WORDS and len(command.split()) > 1:  # not a bare `sky`
                for key, value in EXAMPLE.items():
                    command = command.replace(key, value)
                commands.add(command)
    return sorted(commands)


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
        self.uv = require("uv")
        self.logs = []  # (description, exit status, run.log) of every training run, for tests of the run itself

    def sh(self, cmd, check=True):
        return self.run(cmd, check).stdout

    def run(self, cmd, check=True):
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


# --- the data set on loopback -------------------------------------------------------------------------------

PREFIX = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"


def parquet_bytes(docs):
    out = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), out)
    return out.getvalue()


class ShardServer:
    """Serves {filename: bytes}, pausing `pause` seconds half-way through each body; `plan[filename]` lists
    what the next requests get: 500, 404, 'ok', 'truncate' (the connection closes half-way through the
    announced length) or 'corrupt' (half the file, sent whole)."""

    def __init__(self, files, pause=0.0):
        self.files, self.plan, self.requests, self.pause = files, {}, [], pause
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path[len(PREFIX):] if self.path.startswith(PREFIX) else None
                server.requests.append(name)
                action = server.plan.get(name, []).pop(0) if server.plan.get(name) else "ok"
                if name not in server.files or action == 404:
                    self.send_error(404)
                elif action == 500:
                    self.send_error(500)
                else:
                    body = server.files[name]
                    if action == "corrupt":  # a whole response whose content is half a parquet file
                        body = body[:len(body) // 2]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    if server.pause:  # half-way through: a slow network, for runs that overlap
                        time.sleep(server.pause)
                    if action != "truncate":
                        self.wfile.write(body[len(body) // 2:])
                    self.close_connection = action == "truncate"

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()  # shutdown in 20 ms

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class InlinePool:
    """multiprocessing.Pool's part that download_data uses, run in this process so spies see the work."""
    created = []

    def __init__(self, processes):
        InlinePool.created.append(processes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return [fn(item) for item in items]


# --- train.py run as the agent runs it, and its log read ----------------------------------------------------

SUMMARY = [  # key, value format; values start in column 19
    ("val_bpb", r"\d+\.\d{6}"),
    ("training_seconds", r"\d+\.\d"),
    ("total_seconds", r"\d+\.\d"),
    ("peak_vram_mb", r"\d+\.\d"),
    ("mfu_percent", r"\d+\.\d{2}|n/a"),
    ("total_tokens_M", r"\d+\.\d"),
    ("num_steps", r"\d+"),
    ("num_params_M", r"\d+\.\d"),
    ("depth", r"\d+"),
]


def start_train(project, cache_dir):
    """The agent's command, with stdout and stderr in run.log, started."""
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache_dir))
    return subprocess.Popen(f"{sys.executable} train.py > run.log 2>&1", shell=True, cwd=project, env=env)


def finish_train(run, project, timeout=300):
    """(exit status, log text) of a started run, once it ends."""
    status = run.wait(timeout)
    with open(os.path.join(project, "run.log"), newline="") as f:  # keep the \r of the progress line
        return status, f.read()


def run_train(project, cache_dir, timeout=300):
    """The agent's command, with stdout and stderr in run.log; returns (exit status, log text)."""
    return finish_train(start_train(project, cache_dir), project, timeout)


def parse_summary(log):
    """The block after the last '---' line: {key: value string}, asserting the exact layout."""
    assert "\n---\n" in log, log[-2000:]
    lines = log.rsplit("\n---\n", 1)[1].rstrip("\n").split("\n")
    assert [line.split(":")[0] for line in lines] == [key for key, _ in SUMMARY]
    values = {}
    for line, (key, pattern) in zip(lines, SUMMARY):
        assert line[:18] == f"{key}:".ljust(18), repr(line)
        assert re.fullmatch(pattern, line[18:]), repr(line)
        values[key] = line[18:]
    return values


def progress_lines(log):
    """(step, percent done, dt in s, seconds remaining) of every progress line of a run."""
    return [(int(step), float(pct), int(ms) / 1000, int(remaining)) for step, pct, ms, remaining in
            re.findall(r"\rstep (\d{5}) \(([\d.]+)%\) \| .*? \| dt: (\d+)ms \| .*? \| remaining: (\d+)s", log)]


# --- references written plainly -----------------------------------------------------------------------------

class UniformModel(nn.Module):
    """Equal logits for every token: cross-entropy ln(V) at every position."""

    def __init__(self, vocab_size, extra_loss_on=None):
        super().__init__()
        self.vocab_size, self.extra_loss_on = vocab_size, extra_loss_on
        self.dummy = nn.Parameter(torch.zeros(1))  # evaluate_bpb reads the device from the parameters

    def forward(self, x, y, reduction="mean"):
        logits = torch.zeros(y.numel(), self.vocab_size) + self.dummy
        loss = F.cross_entropy(logits, y.reshape(-1), reduction=reduction)
        if self.extra_loss_on is not None:  # huge losses where the target is this token
            loss = loss + 1000.0 * (y.reshape(-1) == self.extra_loss_on)
        return loss


def reference_dataloader(tokenizer, B, T, split, buffer_size=1000):
    """The original's packing, written plainly: the longest document that fits (earliest among equals), else crop the
    shortest."""
    def slices():
        epoch = 1
        while True:
            for name in sorted(os.listdir(prepare.DATA_DIR)):
                if not name.endswith(".parquet") or (name == prepare.VAL_FILENAME) != (split == "val"):
                    continue
                pf = pq.ParquetFile(os.path.join(prepare.DATA_DIR, name))
                for rg in range(pf.num_row_groups):
                    texts = pf.read_row_group(rg).column("text").to_pylist()
                    for i in range(0, len(texts), 128):
                        yield texts[i:i + 128], epoch
            epoch += 1

    source = slices()
    bos = tokenizer.get_bos_token_id()
    buffer, epoch = [], 1
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    texts, epoch = next(source)
                    buffer.extend(tokenizer.encode(texts, prepend=bos))
                remaining = T + 1 - len(row)
                best = None
                for i, doc in enumerate(buffer):
                    if len(doc) <= remaining and (best is None or len(doc) > len(buffer[best])):
                        best = i
                if best is not None:
                    row.extend(buffer.pop(best))
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(shortest)[:remaining])
            rows.append(row)
        rows = torch.tensor(rows, dtype=torch.long)
        yield rows[:, :-1], rows[:, 1:], epoch


# --- train.main() in-process on a fake clock ----------------------------------------------------------------

BUDGET, STEP_SECONDS = 3, 0.25


def in_memory_fit():
    """Whether machine.fit_micro_batch's probe is on the call stack (its optimizer steps are undone)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "probe":
        frame = frame.f_back
    return frame is not None


FRESH_JUDGE = copy.deepcopy(prepare._judge)  # as prepare was imported: before any loader, step or read of this process


def fresh_judge(mp):
    """The judge's record of the process (its clock, the validation reads) started over, as in a new run."""
    mp.setattr(prepare, "_judge", copy.deepcopy(FRESH_JUDGE))


def start_tiny_main(mp, cache, budget=BUDGET):
    """train.main with the tiny constants, on the CPU, on a clock that only the forward passes move, run in the
    cache's folder (judge.log is written where a run runs: module-scoped runs too, never the working directory)."""
    import machine, train  # importing train.py prints its attention line: only where a test runs it
    mp.chdir(cache.dir)
    fresh_judge(mp)
    judge_settings(mp, MAX_SEQ_LEN=64, EVAL_TOKENS=2 * 2 * 64, TIME_BUDGET=budget)
    for name, value in dict(MAX_SEQ_LEN=64, EVAL_TOKENS=2 * 2 * 64, TIME_BUDGET=budget, DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=32,
                            DEVICE_BATCH_SIZE=2, TOTAL_BATCH_SIZE=2 * 2 * 64, WARMUP_RATIO=0.2,
                            FINAL_LR_FRAC=0.1).items():
        mp.setattr(train, name, value)
    mp.setattr(train, "training_device", lambda: train.torch.device("cpu"))
    mp.setattr(train, "flash_attn_func", machine.pytorch_attention)
    clock = SimpleNamespace(now=1000.0, losses=None, optimizer_calls=[])
    fake_time = SimpleNamespace(time=lambda: clock.now, perf_counter=time.perf_counter, sleep=time.sleep)
    mp.setattr(train, "time", fake_time)
    mp.setattr(machine, "time", fake_time)  # the memory fit times its probes
    mp.setattr(prepare, "time", fake_time)  # and the judge its evaluation
    forward = train.GPT.forward

    def timed_forward(self, idx, targets=None, reduction="mean"):
        clock.now += STEP_SECONDS / 2  # two micro-steps a step
        loss = forward(self, idx, targets, reduction)
        if clock.losses is not None and self.training and reduction == "mean":
            loss = loss - loss.detach() + clock.losses  # the same gradients, a chosen (finite) value
        return loss

    mp.setattr(train.GPT, "forward", timed_forward)
    step = train.MuonAdamW.step

    def recording_step(self):
        if not in_memory_fit():
            clock.optimizer_calls.append([(g["kind"], g["lr"] / g["initial_lr"], g.get("momentum"), g["weight_decay"])
                                          for g in self.param_groups])
        return step(self)

    mp.setattr(train.MuonAdamW, "step", recording_step)
    return clock


def run_main(capsys=None):
    """train.main(): (exit status, stdout), with the collector restored (main freezes and disables it). stdout from
    capsys where the test has it, else captured here (a module-scoped run)."""
    import train
    status, out = 0, io.StringIO()
    try:
        with contextlib.redirect_stdout(out) if capsys is None else contextlib.nullcontext():
            train.main()
    except SystemExit as e:
        status = e.code
    finally:
        gc.enable()
        gc.unfreeze()
    return status, out.getvalue() if capsys is None else capsys.readouterr().out


def polar_express_steps(X, rows, cols, coefficients):
    """Muon's orthogonalisation written plainly, on one matrix: for each (a, b, c), X = a X + X (b A + c A^2) with
    A = X^T X where it is tall, else X = a X + (b A + c A^2) X with A = X X^T; in X's dtype."""
    for a, b, c in coefficients:
        if rows > cols:  # tall: the small X^T X
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def summary_values(out):
    return dict(re.findall(r"^(\w+): +(\S+)$", out.rsplit("\n---\n", 1)[1], flags=re.M))


# --- the small machines' settings, as the docs give them ----------------------------------------------------

SMALL_MACHINES = os.path.join(ROOT, "docs", "small-machines.md")


def settings(machine):
    """{file: {NAME: value}} from the python block under '## On a <machine>' in docs/small-machines.md."""
    with open(SMALL_MACHINES) as f:
        text = f.read()
    section = re.search(rf"^## On a {machine}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, f"{SMALL_MACHINES} has no '## On a {machine}' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), flags=re.S).group(1)
    out, current = {"prepare.py": {}, "train.py": {}}, None
    for line in block.splitlines():
        if line.startswith("# "):
            current = line[2:].strip()
        else:
            name, value = (part.strip() for part in line.split("=", 1))
            out[current][name] = value
    return out
