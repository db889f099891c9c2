"""`uv run analysis.py --decide [COMMIT]`: keep, discard or rerun, from the judge's runs of the commit in judge.log.

Built in a temporary git repository on a night's branch: a ledger with a baseline pair, judge.log lines
written with the sha256 of each commit's train.py, and HEAD (or a named commit) to decide. The exact line is
checked for a clear keep, a discard, a rerun, a re-run that confirms and one that does not, the baseline's
own pair, no judge line for HEAD (one line, exit status 2), a val_bpb typed into the ledger that differs
from the judge's (the judge's counts), and runs of an earlier night (they never count). The margins are
computed here from a printed t-table: t(0.999, 1 df) = 318.309, t(0.999, 3 df) = 10.2145, t(0.8, 2 df) = 1.061,
t(0.8, 3 df) = 0.978. The best is the lowest mean of a kept commit, never its luckiest run; a tie is no gain.

    uv run pytest tests/test_decide.py
"""

import contextlib
import hashlib
import io
import math
import os
import time

import pytest

import analysis
from helpers import branch_made, git, judge_time

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
BASELINE = [1.000000, 1.000200]  # the pair: noise floor 0.000141 on 1 df


class Night:
    """A night's repository: main, the branch autoresearch/t, results.tsv and judge.log beside them."""

    def __init__(self, repo):
        self.repo = repo
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        git(repo, "config", "user.name", "agent")
        git(repo, "config", "user.email", "agent@example.com")
        (repo / "train.py").write_text("DEPTH = 8\n")
        git(repo, "add", "train.py")
        git(repo, "commit", "-qm", "the project")
        git(repo, "checkout", "-q", "-b", "autoresearch/t")
        self.baseline = self.head()
        (repo / "results.tsv").write_text(HEADER + "\n")
        (repo / "judge.log").write_text("")

    def head(self):
        return git(self.repo, "rev-parse", "--short=7", "HEAD")

    def commit(self, text):
        (self.repo / "train.py").write_text(f"DEPTH = 8\n{text}\n")
        git(self.repo, "commit", "-qam", text)
        return self.head()

    def judged(self, values, when=None):
        """The judge's lines for runs of HEAD's train.py."""
        sha = hashlib.sha256((self.repo / "train.py").read_bytes()).hexdigest()
        when = when or judge_time(time.time())
        with open(self.repo / "judge.log", "a") as f:
            for i, value in enumerate(values):
                f.write(f"{when}\t{sha}\t{value:.6f}\t20971520\trun=r{i}{value}\tdevice=cpu\n")

    def logged(self, commit, values, status, description):
        with open(self.repo / "results.tsv", "a") as f:
            f.writelines(f"{commit}\t{v:.6f}\t44.0\t{status}\t{description}\n" for v in values)

    def decide(self, *commit):
        """`uv run analysis.py --decide [COMMIT]`, in this process and from a directory that is no repository
        (the ledger's directory is the night's): (exit status, its one line)."""
        out, here = io.StringIO(), os.getcwd()
        os.chdir(self.repo.parent)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                status = analysis.main([str(self.repo / "results.tsv"), "--decide", *commit])
        except SystemExit as e:
            status = e.code
        finally:
            os.chdir(here)
        return status, out.getvalue().strip()


@pytest.fixture
def tonight(tmp_path):
    """A night with the baseline pair run and logged; nothing else yet."""
    n = Night(tmp_path / "repo")
    n.judged(BASELINE)
    n.logged(n.baseline, BASELINE, "keep", "baseline")
    return n


def pooled(*groups):
    squares = sum(sum((x - sum(g) / len(g)) ** 2 for x in g) for g in groups)
    df = sum(len(g) - 1 for g in groups)
    return math.sqrt(squares / df), df


def figures(n, commit, runs, margin_t):
    """The line's figures, worked out by hand: (runs text, best text, gain, margin, floor text)."""
    floor, df = pooled(BASELINE, *([runs] if len(runs) > 1 else []))
    gain = sum(BASELINE) / 2 - sum(runs) / len(runs)
    margin = margin_t * max(floor, analysis.MIN_NOISE) * math.sqrt(1 / len(runs) + 1 / 2)
    runs_text = f"{commit} runs {' '.join(f'{v:.6f}' for v in runs)} (mean {sum(runs) / len(runs):.6f})"
    best = f"best {n.baseline} runs 1.000000 1.000200 (mean 1.000100)"
    return runs_text, best, gain, margin, f"noise floor {floor:.6f} ({df} df)"


def test_the_baseline_is_run_twice_then_kept(tmp_path):
    n = Night(tmp_path / "repo")
    n.judged(BASELINE[:1])
    assert n.decide() == (0, f"rerun: {n.baseline} runs 1.000000 (mean 1.000000): the baseline; run it again, the "
                             f"pair measures the night's noise")
    n.judged(BASELINE[1:])
    assert n.decide() == (0, f"keep: {n.baseline} runs 1.000000 1.000200 (mean 1.000100): the baseline; "
                             f"noise floor 0.000141 (1 df)")


@pytest.mark.parametrize("runs,decision,kind", [
    ([0.900000], "keep", "clear"),        # gain 0.1001 >= 318.309 * 0.000141 * sqrt(1.5) = 0.0551
    ([1.000500], "discard", "worse"),     # not lower than the best
    ([0.999000], "rerun", "small"),       # lower, by less than the clear margin
    ([0.999000, 0.999100], "keep", "confirmed"),    # mean gain 0.00105 >= 1.061 * pooled floor
    ([0.999900, 1.000250], "discard", "unconfirmed"),  # mean gain 0.000025 < the confirming margin
])
def test_decisions(tonight, runs, decision, kind):
    commit = tonight.commit(f"# idea: {kind}")
    tonight.judged(runs)
    runs_text, best, gain, margin, floor = figures(tonight, commit, runs, 318.309 if len(runs) == 1 else 1.061)
    if decision == "discard" and gain <= 0:
        why = f"gain {gain:+.6f}: not lower than the best"
    else:
        why = (f"gain {gain:+.6f} {'>=' if decision == 'keep' else '<'} margin {margin:.6f} "
               f"{'to keep at once' if len(runs) == 1 else 'to confirm'}")
    then = "; run it again, then decide again" if decision == "rerun" else ""
    status, line = tonight.decide()
    assert status == 0 and line == f"{decision}: {runs_text}, {best}: {why}; {floor}{then}"


def test_no_finished_run_of_head_is_one_line_and_exit_2(tonight):
    tonight.commit("# an idea that crashed")
    status, line = tonight.decide()
    assert status == 2 and "\n" not in line
    assert line == (f"error: no finished run of {tonight.head()}'s train.py in judge.log tonight: run it first "
                    f"(`uv run train.py > run.log 2>&1`); a run that crashed is logged as a crash, not decided")


def test_the_judges_number_counts_not_one_typed_into_the_ledger(tonight):
    commit = tonight.commit("# a worse idea")
    tonight.judged([1.000800])
    tonight.logged(commit, [0.800000], "keep", "a typed number")  # what the agent claims; the judge wrote 1.000800
    status, line = tonight.decide()
    assert status == 0 and line.startswith(f"discard: {commit} runs 1.000800 (mean 1.000800), best {tonight.baseline} ")


def test_a_named_commit_is_decided_where_head_is_elsewhere(tonight):
    """parallel/program.md's worktrees: the experiment's commit is not HEAD."""
    commit = tonight.commit("# idea in a worktree")
    tonight.judged([0.900000])
    git(tonight.repo, "reset", "-q", "--hard", "HEAD~1")  # HEAD back at the tip, as in the agent's repository
    full = git(tonight.repo, "rev-parse", commit)
    status, line = tonight.decide(commit)
    assert status == 0 and line.startswith(f"keep: {commit} runs 0.900000 ") and full.startswith(commit)


def test_runs_of_an_earlier_night_never_count(tonight):
    """The baseline's train.py repeats across nights: its runs before this branch was made are not tonight's."""
    commit = tonight.commit("# idea")
    tonight.judged([0.999000], when="2020-01-01T00:00:00Z")  # the same train.py, run long ago
    status, line = tonight.decide()
    assert status == 2 and line.startswith(f"error: no finished run of {commit}'s train.py")
    tonight.judged([0.999000])
    assert tonight.decide()[1].startswith(f"rerun: {commit} runs 0.999000 (mean 0.999000)")  # one run tonight, not two


def test_the_best_is_a_mean_never_its_luckiest_run(tonight):
    """Two kept commits that disagree: a has the lower mean (0.996100), b the luckiest run (0.994000, mean
    0.996500). A new run of 0.995500 is lower than a's mean (a rerun), though not lower than b's luckiest run."""
    tonight.logged("aaaaaaa", [0.996000, 0.996200], "keep", "a")
    tonight.logged("bbbbbbb", [0.994000, 0.999000], "keep", "b, luckier once")
    tonight.logged("ccccccc", [0.900000], "discard", "lower, but discarded")  # never the best, whatever it ran
    tonight.logged("ddddddd", [0.000000], "crash", "a crash's 0.000000 is no run")
    commit = tonight.commit("# idea")
    tonight.judged([0.995500])
    floor, df = pooled(BASELINE, [0.996000, 0.996200], [0.994000, 0.999000])
    margin = {3: 10.2145}[df]  # t(0.999, 3 df), from a printed table
    status, line = tonight.decide()
    assert status == 0 and line == (
        f"rerun: {commit} runs 0.995500 (mean 0.995500), best aaaaaaa runs 0.996000 0.996200 (mean 0.996100): gain "
        f"+0.000600 < margin {margin * floor * math.sqrt(1 + 1 / 2):.6f} to keep at once; noise floor {floor:.6f} "
        f"({df} df); run it again, then decide again")


def test_a_run_equal_to_the_best_mean_is_not_lower(tonight):
    commit = tonight.commit("# no change in effect")
    tonight.judged([1.000100])  # the baseline's mean, to the digit
    status, line = tonight.decide()
    assert status == 0 and line.startswith(f"discard: {commit} runs 1.000100 (mean 1.000100), ")
    assert "gain +0.000000: not lower than the best" in line or "gain -0.000000: not lower than the best" in line


def test_a_commit_that_is_not_there_is_one_line_and_exit_2(tonight):
    assert tonight.decide("1234567") == (2, f"error: 1234567 is not a commit of {tonight.repo}")


def test_without_a_judges_log_nothing_is_decided(tonight):
    commit = tonight.commit("# idea")
    (tonight.repo / "judge.log").unlink()
    status, line = tonight.decide()
    assert status == 2 and line.startswith(f"error: no finished run of {commit}'s train.py in judge.log tonight")


def test_a_run_in_the_second_before_the_branch_counts_and_not_earlier(tonight):
    """judge.log and git's reflog both count whole seconds: a run stamped one second before the night's branch
    was made belongs to the night (the clocks' rounding), two seconds before does not."""
    commit = tonight.commit("# idea")
    made = branch_made(tonight.repo, "autoresearch/t")
    tonight.judged([0.999000], when=judge_time(made - 2))
    assert tonight.decide()[0] == 2
    tonight.judged([0.999100], when=judge_time(made - 1))
    assert tonight.decide()[1].startswith(f"rerun: {commit} runs 0.999100 (mean 0.999100)")


def test_with_no_pair_yet_the_floor_is_unknown_and_taken_as_the_least(tmp_path):
    """A ledger whose baseline ran once (an older night's protocol): no commit has two runs, so the floor is
    unknown, and the margins rest on MIN_NOISE (0.0001)."""
    n = Night(tmp_path / "repo")
    n.judged([1.000000])
    n.logged(n.baseline, [1.000000], "keep", "baseline, run once")
    commit = n.commit("# idea")
    n.judged([0.999000])
    margin = 318.309 * 0.0001 * math.sqrt(1 / 1 + 1 / 1)
    assert n.decide() == (0, f"rerun: {commit} runs 0.999000 (mean 0.999000), best {n.baseline} runs 1.000000 (mean "
                             f"1.000000): gain +0.001000 < margin {margin:.6f} to keep at once; noise floor unknown, "
                             f"taken as 0.000100; run it again, then decide again")


def test_a_confirmation_on_one_degree_of_freedom_uses_its_t():
    """decide() on its own: two runs, a floor on 1 df: the confirming margin is t(0.8, 1 df) = 1.376 times the
    floor times the standard error of the difference of the means."""
    decision, gain, margin = analysis.decide([0.99, 0.99], [1.0, 1.0], 0.01, 1)
    assert decision == "discard" and gain == pytest.approx(0.01) and margin == pytest.approx(1.3764 * 0.01, rel=1e-4)


def test_a_branch_named_with_decide_must_exist(tonight):
    tonight.commit("# idea")
    tonight.judged([0.999000])
    status, line = tonight.decide("HEAD", "--branch", "autoresearch/nosuch")
    assert status == (f"error: no branch 'autoresearch/nosuch' in {tonight.repo}; `git branch --list 'autoresearch/*'` "
                      f"lists the nights")
