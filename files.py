"""
The files autoresearch writes, and how: the cache's files durably (never half-written under their final name),
the temporary files of runs that died swept away, and judge.log, the judge's own record of every evaluation
(written by prepare.py's evaluate_bpb, read by analysis.py's audit and --decide). Fixed like prepare.py.
Standard library only, so that the morning report and the night's hooks start fast.
"""

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

AGENT_FILES = ["train.py"]     # the only file a night may change; every other file of the project is fixed
LEDGER_HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]  # results.tsv's, tab-separated
STATUSES = ("keep", "discard", "crash")
GIT_TIMEOUT = 30                # seconds a git command of the audit or of the night's hooks may take
STALE_TEMPORARY = 3600          # seconds after which another machine's temporary file counts as abandoned
CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
VAL_DIGEST = "val_digest.txt"   # in the tokenizer's folder: the validation tokens' digest, recorded by prepare.py
JUDGE_LOG = "judge.log"         # evaluate_bpb appends a line per evaluation here, in the directory of the run
JUDGE_LOGGED = ["EVAL_TOKENS", "MAX_SEQ_LEN", "TIME_BUDGET", "VOCAB_SIZE"]  # prepare.py's settings each line records
JUDGE_FIELDS = ["run", "elapsed", "training", "steps", "step_seconds", "longest_step", "training_claimed",
                "eval_seconds", *JUDGE_LOGGED, "device", "torch", "precision", "val_digest", "val_opened", "replaced"]
# judge.log's key=value fields, after time, sha256, val_bpb and tokens
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # judge.log's first field, in UTC

def hf_endpoint():
    """Where the data set and the kernel hub are downloaded from: $HF_ENDPOINT (a mirror), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


# ---------------------------------------------------------------------------
# Files in the cache: durable, and never half-written under their final name
# ---------------------------------------------------------------------------

def remove_quietly(*paths):
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def temporary_name(path):
    """path.<host>.<pid>.<thread>.tmp: unique to this writer, even with runs on other machines sharing the cache."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp"


def write_durably(path, write, check=None):
    """write(f) into a temporary file, flush and fsync it, check(temporary path) if given, then rename it to
    path: a crash or power cut leaves the old state or the whole new file, never a part of one."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    try:  # the rename itself reaches the disk with the directory (POSIX only)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def writer_is_gone(name):
    """Whether the run that wrote the temporary file `name` is gone: True or False for this machine's runs,
    None for another machine's (its age decides)."""
    try:
        stem, pid, _thread, _ = name.rsplit(".", 3)
        pid = int(pid)
    except ValueError:
        return True  # not one of ours, or an older format: nobody writes it any more
    if stem.endswith("." + socket.gethostname()) and os.name == "posix":
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False
    return None  # another machine's: judged by its age


def sweep_temporary_files(directory):
    """Remove the temporary files of runs that died (interrupted downloads, a killed run); never a live one's."""
    for parent, _, names in os.walk(directory):
        for name in names:
            if not name.endswith(".tmp"):
                continue
            path = os.path.join(parent, name)
            gone = writer_is_gone(name)
            try:
                if gone is None:
                    gone = time.time() - os.path.getmtime(path) > STALE_TEMPORARY
                if gone:
                    os.remove(path)
            except OSError:
                pass  # removed by another run meanwhile

# ---------------------------------------------------------------------------
# judge.log: one tab-separated line per evaluation
# ---------------------------------------------------------------------------

def judge_line(sha256, val_bpb, tokens, fields):
    """The line for one evaluation: time (UTC), sha256 of the script that ran, val_bpb as train.py prints it,
    tokens scored, then every one of JUDGE_FIELDS as key=value."""
    assert list(fields) == JUDGE_FIELDS, f"judge.log's fields are {JUDGE_FIELDS}, not {list(fields)}"
    extra = "".join(f"\t{key}={value}" for key, value in fields.items())
    return f"{datetime.now(timezone.utc).strftime(TIME_FORMAT)}\t{sha256}\t{val_bpb:.6f}\t{tokens}{extra}\n"


def recorded_val_digest(tokenizer_dir=os.path.join(CACHE_DIR, "tokenizer")):
    """The validation tokens' digest prepare.py recorded beside the tokenizer, or None (a cache prepared before it
    recorded one, or none at all)."""
    try:
        with open(os.path.join(tokenizer_dir, VAL_DIGEST), encoding="utf-8") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return None


@dataclass
class JudgeRun:
    line: int          # line number in judge.log
    time: float        # when the judge wrote it (seconds since the epoch)
    sha256: str        # of the train.py that ran
    val_bpb: str       # 6 decimals, as train.py printed it
    fields: dict       # the key=value fields (JUDGE_FIELDS)


def read_judge_log(path):
    """Every evaluation in judge.log; lines that are not the judge's are skipped."""
    runs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\r\n").split("\t")
            try:
                when = datetime.strptime(fields[0], TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()
            except ValueError:
                continue
            extra = dict(field.split("=", 1) for field in fields[4:] if "=" in field)
            if len(fields) >= 4 and extra:
                runs.append(JudgeRun(number, when, fields[1], fields[2], extra))
    return runs

# ---------------------------------------------------------------------------
# results.tsv, the agent's ledger, and git: read by the morning report and by the night's hooks
# ---------------------------------------------------------------------------

@dataclass
class Row:
    line: int          # line number in results.tsv
    commit: str
    val_bpb: float
    val_bpb_text: str  # as written, for the comparison with the judge's log
    memory_gb: float
    status: str
    description: str


def read_ledger(path):
    """(rows, problems): every well-formed row, and one message per line that was skipped."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()  # \n, \r\n and \r alike
    rows, problems = [], []
    header_seen = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if not header_seen:
            header_seen = True
            if [f.strip() for f in fields] == LEDGER_HEADER:
                continue
            problems.append(f"line {number}: expected the header {chr(9).join(LEDGER_HEADER)!r}; read as a row")
        if len(fields) != len(LEDGER_HEADER):
            problems.append(f"line {number}: {len(fields)} tab-separated fields instead of {len(LEDGER_HEADER)}; skipped")
            continue
        commit, val_bpb, memory_gb, status, description = (f.strip() for f in fields)
        try:
            value, memory = float(val_bpb), float(memory_gb)
        except ValueError:
            problems.append(f"line {number}: val_bpb {val_bpb!r} or memory_gb {memory_gb!r} is not a number; skipped")
            continue
        if status.lower() not in STATUSES:
            problems.append(f"line {number}: status {status!r} is not one of {', '.join(STATUSES)}; skipped")
            continue
        rows.append(Row(number, commit, value, val_bpb, memory, status.lower(), description))
    return rows, problems


def git(directory, *args):
    """stdout of a git command in `directory`, or None when it fails (or takes more than GIT_TIMEOUT)."""
    try:
        result = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=GIT_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
