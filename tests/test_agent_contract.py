"""program.md, played literally: a scripted agent follows the contract on a copy of the project in its own git
repository, with the constants edited down so a run takes seconds and tiny shards in a tmp cache.

The run command, the grep command, the crash command, the reset command and the results.tsv header are read
out of program.md's code blocks, so the text and this test cannot drift apart. The agent makes its branch,
runs the baseline, keeps it, commits a worse edit and resets it, commits a syntax error and logs a crash,
commits an edit that diverges (FAIL) and logs a crash, then checks the ledger kept every row through the
resets, in the right format, untracked, with prepare.py never changed.

    uv run pytest tests/test_agent_contract.py
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_project, set_constants

with open(os.path.join(ROOT, "program.md")) as f:
    PROGRAM = f.read()
CODE_LINES = [line for block in re.findall(r"```\n(.*?)```", PROGRAM, flags=re.S) for line in block.splitlines()]


def command(prefix):
    """The one code line of program.md that starts with `prefix`."""
    found = sorted({line for line in CODE_LINES if line.startswith(prefix)})
    assert len(found) == 1, f"program.md should show exactly one `{prefix}...` command, found {found}"
    return found[0]


RUN = command("uv run train.py")
GREP = command("grep ")
CRASH = command("tail ")
HEADER = command("commit\t")
RESET = re.search(r"`(git reset --hard [^`]+)`", PROGRAM).group(1)


class Agent:
    """Does what program.md says, in a shell, in the project directory."""

    def __init__(self, project, cache_dir):
        self.project = project
        self.env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache_dir), UV_NO_SYNC="1", UV_FROZEN="1",
                        UV_PROJECT_ENVIRONMENT=sys.prefix)  # the already-synced environment, left untouched
        self.uv = os.environ.get("UV") or shutil.which("uv")

    def sh(self, cmd, check=True):
        if cmd.startswith("uv run ") and not self.uv:
            cmd = f"{sys.executable} {cmd[len('uv run '):]}"  # the same command without uv on PATH
        result = subprocess.run(cmd, shell=True, cwd=self.project, env=self.env, capture_output=True, text=True,
                                timeout=600)
        assert not check or result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def git(self, *args):
        return self.sh("git " + " ".join(args)).strip()

    def experiment(self, description, edit=None):
        """Edit, commit, run, read the result, log it; keep or reset. Returns (status, val_bpb, tail)."""
        start = self.git("rev-parse", "HEAD")
        if edit:
            edit(os.path.join(self.project, "train.py"))
            self.git("commit", "-qam", f"'{description}'")
        commit = self.git("rev-parse", "--short=7", "HEAD")
        self.sh(RUN, check=False)
        result = self.sh(GREP, check=False)
        tail = ""
        values = dict(re.findall(r"^(val_bpb|peak_vram_mb):\s+(\S+)$", result, flags=re.M))
        if not values:
            tail = self.sh(CRASH)
            status, val_bpb, memory_gb = "crash", 0.0, 0.0
        else:
            val_bpb, memory_gb = float(values["val_bpb"]), float(values["peak_vram_mb"]) / 1024
            status = "keep" if edit is None or val_bpb < self.best else "discard"
        with open(os.path.join(self.project, "results.tsv"), "a") as f:
            f.write(f"{commit}\t{val_bpb:.6f}\t{memory_gb:.1f}\t{status}\t{description}\n")
        if status == "keep":
            self.best = val_bpb
        else:
            self.sh(RESET)
            assert self.git("rev-parse", "HEAD") == start
        return status, val_bpb, tail


@pytest.fixture(scope="module")
def night(tiny_cache, tmp_path_factory):
    """One scripted night: setup, baseline, a worse idea, a syntax error, a divergence."""
    project = str(make_project(tmp_path_factory.mktemp("agent") / "autoresearch"))
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
    runs = {
        "baseline": agent.experiment("baseline"),
        "worse": agent.experiment("learning rates to zero",
                                  lambda p: set_constants(p, MATRIX_LR="0.0", EMBEDDING_LR="0.0", UNEMBEDDING_LR="0.0")),
        "syntax": agent.experiment("half-written edit", lambda p: open(p, "a").write("\ndef broken(:\n")),
        "nan": agent.experiment("MATRIX_LR 1e30", lambda p: set_constants(p, MATRIX_LR="1e30")),
    }
    return agent, runs, baseline_commit


def test_commands_come_from_program_md():
    assert RUN == "uv run train.py > run.log 2>&1"
    assert GREP == 'grep "^val_bpb:\\|^peak_vram_mb:" run.log'
    assert CRASH == "tail -n 50 run.log"
    assert HEADER.split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]


def test_each_experiment_ends_as_the_contract_says(night):
    agent, runs, baseline_commit = night
    assert runs["baseline"][0] == "keep" and 0 < runs["baseline"][1] < 10
    assert runs["worse"][0] == "discard" and runs["worse"][1] > runs["baseline"][1]
    assert runs["syntax"][0] == "crash" and "SyntaxError" in runs["syntax"][2]
    assert runs["nan"][0] == "crash" and runs["nan"][2].rstrip().endswith("FAIL")
    assert agent.git("rev-parse", "HEAD") == baseline_commit  # every failed idea was reset away
    assert agent.git("rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/nov22"
    assert "broken" not in open(os.path.join(agent.project, "train.py")).read()


def test_ledger_survives_the_resets_in_the_right_format(night):
    agent, runs, _ = night
    with open(os.path.join(agent.project, "results.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == HEADER and len(lines) == 5
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        assert len(row) == 5
        assert re.fullmatch(r"[0-9a-f]{7}", row[0]) and re.fullmatch(r"\d+\.\d{6}", row[1])
        assert re.fullmatch(r"\d+\.\d", row[2])
    assert [row[3] for row in rows] == ["keep", "discard", "crash", "crash"]
    assert [row[1:3] for row in rows[2:]] == [["0.000000", "0.0"], ["0.000000", "0.0"]]
    assert len({row[0] for row in rows}) == 4  # each experiment had its own commit


def test_ledger_and_log_stay_untracked_and_prepare_py_unchanged(night):
    agent, _, _ = night
    assert agent.git("status", "--porcelain") == ""  # clean: nothing tracked changed, nothing new unignored
    ignored = agent.git("status", "--porcelain", "--ignored").splitlines()
    assert "!! results.tsv" in ignored and "!! run.log" in ignored
    assert agent.git("ls-files", "results.tsv", "run.log") == ""
    assert agent.git("log", "--format=%s", "--", "prepare.py") == "the project"
    assert agent.git("diff", "main", "--", "prepare.py") == ""
