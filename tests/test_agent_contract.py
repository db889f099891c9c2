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

from conftest import CRASH, GREP, HEADER, RUN  # read out of program.md; the night itself is in conftest


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
    assert "!! results.tsv" in ignored and "!! run.log" in ignored and "!! judge.log" in ignored
    assert agent.git("ls-files", "results.tsv", "run.log") == ""
    assert agent.git("log", "--format=%s", "--", "prepare.py") == "the project"
    assert agent.git("diff", "main", "--", "prepare.py") == ""
