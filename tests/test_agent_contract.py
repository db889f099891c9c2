"""program.md, played literally: a scripted agent follows the contract on a copy of the project in its own git
repository, with the constants edited down so a run takes seconds and tiny shards in a tmp cache.

The run, grep, crash, decide, amend and reset commands and the results.tsv header are read out of
program.md, so the text and this test cannot drift apart. The agent makes its branch, runs the baseline twice
(--decide asks for the pair) and keeps it, commits a worse edit and resets it, commits a syntax error and
logs a crash, commits an edit that diverges (FAIL) and logs a crash, commits a better edit with a typo, fixes
it by amending, runs it again when told and keeps it; then checks the ledger kept one row per run through the
resets, in the right format, untracked, with prepare.py never changed.

    uv run pytest tests/test_agent_contract.py
"""

import os
import re

from helpers import AMEND, CRASH, DECIDE, GREP, HEADER, RUN


def test_commands_come_from_program_md():
    assert RUN == "uv run train.py > run.log 2>&1"
    assert GREP == 'grep "^val_bpb:\\|^peak_vram_mb:" run.log'
    assert CRASH == "tail -n 50 run.log"
    assert DECIDE == "uv run analysis.py --decide"
    assert AMEND == "git commit --amend -a --no-edit"
    assert HEADER.split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]


def test_each_experiment_ends_as_the_contract_says(night):
    agent, runs, baseline_commit = night
    status, values, decisions, _ = runs["baseline"]
    assert status == "keep" and len(values) == 2 and all(0 < v < 10 for v in values)
    assert [d.split(":")[0] for d in decisions] == ["rerun", "keep"]  # the baseline is run twice
    status, values, decisions, _ = runs["worse"]
    assert status == "discard" and len(values) == 1 and values[0] > max(runs["baseline"][1])
    assert decisions[0].startswith("discard: ") and "not lower than the best" in decisions[0]
    assert runs["syntax"][0] == "crash" and "SyntaxError" in runs["syntax"][3] and runs["syntax"][2] == []
    assert runs["nan"][0] == "crash" and runs["nan"][3].rstrip().endswith("FAIL")
    status, values, decisions, tail = runs["better"]
    assert "ModuleNotFoundError: No module named 'gcc'" in tail  # the typo, fixed by amending the commit
    assert [d.split(":")[0] for d in decisions] == ["rerun", "keep"] and len(values) == 2, decisions
    assert "to confirm; noise floor" in decisions[1] and "(2 df)" in decisions[1]
    assert agent.git("rev-parse", "HEAD^") == baseline_commit  # the failed ideas were reset, the better one kept
    assert agent.git("rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/nov22"
    text = open(os.path.join(agent.project, "train.py")).read()
    assert "broken" not in text and "import gcc" not in text and "UNEMBEDDING_LR = 0.004 " in text
    assert agent.git("show", "HEAD:train.py") == text.rstrip("\n")  # the kept commit is the code that ran


def test_ledger_survives_the_resets_in_the_right_format(night):
    agent, runs, _ = night
    with open(os.path.join(agent.project, "results.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == HEADER and len(lines) == 8
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        assert len(row) == 5
        assert re.fullmatch(r"[0-9a-f]{7}", row[0]) and re.fullmatch(r"\d+\.\d{6}", row[1])
        assert re.fullmatch(r"\d+\.\d", row[2])
    assert [row[3] for row in rows] == ["keep", "keep", "discard", "crash", "crash", "keep", "keep"]
    assert [row[1:3] for row in rows[3:5]] == [["0.000000", "0.0"], ["0.000000", "0.0"]]
    assert [float(row[1]) for row in rows[:2]] == runs["baseline"][1]  # one row per run, each its own number
    assert [float(row[1]) for row in rows[5:]] == runs["better"][1]
    commits = [row[0] for row in rows]
    assert commits[0] == commits[1] and commits[5] == commits[6] and len(set(commits)) == 5
    assert commits[5] == agent.git("rev-parse", "--short=7", "HEAD")  # the amended commit's hash


def test_ledger_and_log_stay_untracked_and_prepare_py_unchanged(night):
    agent, _, _ = night
    assert agent.git("status", "--porcelain") == ""  # clean: nothing tracked changed, nothing new unignored
    ignored = agent.git("status", "--porcelain", "--ignored").splitlines()
    assert "!! results.tsv" in ignored and "!! run.log" in ignored and "!! judge.log" in ignored
    assert agent.git("ls-files", "results.tsv", "run.log") == ""
    assert agent.git("log", "--format=%s", "--", "prepare.py") == "the project"
    assert agent.git("diff", "main", "--", "prepare.py") == ""
