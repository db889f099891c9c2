"""The night's agent files (night/): Claude Code's settings, the two hooks, git's hooks and the Codex loop.

- The hooks are fed the JSON each agent sends, in a temporary git repository on autoresearch/t: a commit with
  prepare.py edited (unstaged, staged, added in the same command line), uv.lock edited, train.py alone, a push
  (alone, in a compound command, in Codex's argument-list form); stop with no ledger, a header only, one
  result, no new row since the last send-back, a STOP file; malformed input and unknown events. Exact
  decisions and messages.
- The guard refuses git's own options (-c, --git-dir, ...) slipped before a subcommand on a night.
- git's pre-commit and pre-push hooks, switched on through the environment as night/codex-night.sh does.
- night/codex-night.sh with a stand-in `codex` that adds ledger rows: the flags every turn carries, and where
  the loop ends (tests/test_agents.py runs it with the real Codex).
- Every command of program.md and parallel/program.md (code blocks and inline) is allowed by the Claude settings
  under Claude Code's matching as measured (`*` matches anything, compound commands split, a redirect target
  checked as an edit, `./x` read from the directory Claude Code starts in and `/x` from the settings file's
  folder), and none of a list of forbidden ones is (tests/test_agents.py runs the real Claude Code).
- The settings use only the documented keys, modes and rule syntax; nothing agent-specific sits at the root.

    uv run pytest tests/test_night.py
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import unittest.mock

import pytest

from helpers import FORBIDDEN_COMMANDS, JUDGE_LOG_WRITES, ROOT, protocol_commands
from night import hooks  # as the package path mutmut names it: night.hooks

NIGHT = os.path.join(ROOT, "night")
HOOKS = os.path.join(NIGHT, "hooks.py")
with open(os.path.join(NIGHT, "claude-settings.json")) as f:
    SETTINGS = json.load(f)  # a one-GPU night's
with open(os.path.join(ROOT, "parallel", "claude-settings.json")) as f:
    PARALLEL_SETTINGS = json.load(f)  # a parallel night's: the same, and the worktrees, SkyPilot, the clusters' logs
REFUSED_PREPARE = ("refused: this commit would record prepare.py; a night changes only train.py (undo the rest "
                   "with `git checkout HEAD -- prepare.py`)\n")
PYTHON_FIRST = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # git's hooks run `python3`: this one
AS_A_SCRIPT = {k: v for k, v in os.environ.items() if k != "MUTANT_UNDER_TEST"}  # hooks.py run by path is __main__,
                                                   # which mutmut's trampolines never mutate (nor can count)
REFUSED_PUSH = "refused: git push is not part of the night; the branch stays on this machine (program.md)\n"
REFUSED_OPTIONS = "refused: git's own options ({}) are not part of the night; run git as program.md writes it\n"


def git(repo, *args, env=None):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env)


@pytest.fixture
def repo(tmp_path):
    """A project on a night's branch, with the files a night touches and one it may not."""
    repo = tmp_path / "project"
    repo.mkdir()
    for name, text in (("train.py", "DEPTH = 8\n"), ("prepare.py", "TIME_BUDGET = 300\n"), ("uv.lock", "x\n")):
        (repo / name).write_text(text)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=h", "-c", "user.email=h@example.com", "commit", "-qm", "the project")
    git(repo, "checkout", "-q", "-b", "autoresearch/t")
    return repo


def hook(event, *args):
    """night/hooks.py as an agent runs it, in this process (mutation testing maps tests to functions in-process):
    (exit status, stdout, stderr). test_the_hook_runs_as_a_script runs it as the agents do, by path."""
    stdin = event if isinstance(event, str) else json.dumps(event)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            unittest.mock.patch("sys.stdin", io.StringIO(stdin)):
        status = hooks.main([HOOKS, *args])
    return status, out.getvalue(), err.getvalue()


def test_the_hook_runs_as_a_script(repo):
    """As Claude Code runs it: the event on stdin, the decision in the exit status and on stderr."""
    result = subprocess.run([sys.executable, HOOKS], input=json.dumps(bash(repo, "git push")), capture_output=True,
                            text=True, timeout=30, env=AS_A_SCRIPT)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", REFUSED_PUSH)


def bash(repo, command):
    """Claude Code's PreToolUse input for a shell command."""
    return {"session_id": "s", "hook_event_name": "PreToolUse", "tool_name": "Bash", "cwd": str(repo),
            "tool_input": {"command": command, "description": "a command"}}


def stop(repo, active=False):
    return {"session_id": "s", "hook_event_name": "Stop", "cwd": str(repo), "stop_hook_active": active}


# --- the guard ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,command,refusal", [
    ("prepare.py", 'git commit -am "a longer budget"', REFUSED_PREPARE),      # unstaged, taken by -a
    ("prepare.py", 'git commit -a -m "a longer budget"', REFUSED_PREPARE),    # the flags written apart
    ("prepare.py", 'git commit -m "a longer budget" -a', REFUSED_PREPARE),    # -a after the message
    ("prepare.py", 'git commit --all -m "a longer budget"', REFUSED_PREPARE),
    ("prepare.py", 'git commit -m "only the staged train.py"', ""),          # without -a: what is staged (nothing)
    ("prepare.py staged", 'git commit -m "a longer budget"', REFUSED_PREPARE),
    ("prepare.py", 'git add prepare.py && git commit -m "budget"', REFUSED_PREPARE),  # staged by the same line
    ("uv.lock", 'git commit -am "a newer torch"', REFUSED_PREPARE.replace("prepare.py", "uv.lock")),
    ("train.py", 'git commit -am "DEPTH 8 -> 10"', ""),
    ("prepare.py", 'git commit -m "only train.py" train.py', ""),             # the paths named are what it records
    ("train.py", "git push origin autoresearch/t", REFUSED_PUSH),
    ("train.py", "uv run train.py > run.log 2>&1; git -C . push", REFUSED_PUSH),
    ("train.py", "uv run train.py > run.log 2>&1", ""),
    ("train.py", 'git -c core.hooksPath=/dev/null commit -am "x"', REFUSED_OPTIONS.format("-c core.hooksPath=/dev/null")),
    ("train.py", 'git -C . --git-dir=.git commit -am "x"', REFUSED_OPTIONS.format("--git-dir=.git")),
    ("train.py", 'git --no-pager -C . log -1', ""),
    ("train.py", "git --no-pager push", REFUSED_PUSH), ("train.py", "git -P push", REFUSED_PUSH),  # -P: --no-pager
    ("train.py", "git -P log -1", ""),
    ("train.py", 'git -c a=b --git-dir=.git -c c=d commit -am "x"', REFUSED_OPTIONS.format("-c a=b --git-dir=.git -c c=d")),
    ("train.py", "git", ""), ("train.py", "git -C", ""), ("train.py", "git -C .", ""),  # no subcommand: nothing to guard
])
def test_the_guard_refuses_commits_of_other_files_and_pushes(repo, edit, command, refusal):
    name = edit.split()[0]
    (repo / name).write_text((repo / name).read_text() + "CHANGED = 1\n")
    if name == "prepare.py":
        (repo / "train.py").write_text("DEPTH = 10\n")
    if edit.endswith("staged"):
        git(repo, "add", name)
    assert hook(bash(repo, command)) == ((2, "", refusal) if refusal else (0, "", ""))


@pytest.mark.parametrize("command,words", [
    ('git commit -am "a b"; git push', [["git", "commit", "-am", "a b"], ["git", "push"]]),
    ("a && b || c | d & e\nf", [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]]),
    ("uv run train.py > run.log 2>&1 &", [["uv", "run", "train.py", ">", "run.log", "2>&1"]]),  # >& is no split
    ("x >&2; y &>log", [["x", ">&2"], ["y", "&>log"]]),
    ('git commit -m "say \\"hi\\" \\\\ there"', [["git", "commit", "-m", 'say "hi" \\ there']]),  # escapes in "..."
    ("git commit -m 'a \\ b'", [["git", "commit", "-m", "a \\ b"]]),  # none in '...'
    ("git\\ commit a\\;b", [["git commit", "a;b"]]),  # a backslash outside quotes takes the next character
    ('git commit -m ""', [["git", "commit", "-m", ""]]),  # an empty quoted word is a word
    ('echo "a;b"\'c|d\'e', [["echo", "a;bc|de"]]),
    ("  git\tpush\r ", [["git", "push"]]),
    ("trailing\\", [["trailing\\"]]),
    ("a\\b \\;x", [["ab", ";x"]]),  # an escaped character ends no word, and may start one
    ('echo "a\\', [["echo", "a\\"]]), ('echo "x\\y', [["echo", "xy"]]),  # unterminated: as far as it goes
    ("echo X aXb", [["echo", "X", "aXb"]]),  # no other character quotes, splits words or ends a command
    ("echo a\\b", [["echo", "ab"]]),  # an escape just before the end
])
def test_command_lines_are_split_into_commands_and_words_as_a_shell_would(command, words):
    assert hooks.split_commands(command) == words


@pytest.mark.parametrize("options,paths", [
    (["-am", "x"], ["prepare.py", "train.py"]), (["-a", "-m", "x"], ["prepare.py", "train.py"]),
    (["--all", "-m", "x"], ["prepare.py", "train.py"]), (["-qam", "x"], ["prepare.py", "train.py"]),
    (["-m", "x"], ["train.py"]),                                  # what is staged: train.py only
    (["-m", "x", "prepare.py"], ["prepare.py"]),                  # the paths named
    (["-m", "x", "--", "prepare.py"], ["prepare.py"]), (["--", "-m"], []),  # after --, paths only
    (["-F", "msg.txt"], ["train.py"]), (["-c", "HEAD"], ["train.py"]), (["-C", "HEAD"], ["train.py"]),
    (["--fixup", "HEAD"], ["train.py"]), (["-t", "tmpl"], ["train.py"]), (["-qm", "x"], ["train.py"]),
    (["-S", "key"], ["train.py"]), (["--amend", "--no-edit"], ["train.py"]), (["-aF", "msg.txt"], ["prepare.py", "train.py"]),
    (["--message", "x"], ["train.py"]), (["--date", "now"], ["train.py"]),  # long options with an a: not -a
    (["-aS", "-m", "x"], ["prepare.py", "train.py"]),                # -a beside an upper-case option
    (["-m", "x", "prepare.py", "--", "train.py"], ["prepare.py", "train.py"]),  # named before and after --
    (["-m", "prepare.py", "--", "train.py"], ["train.py"]),            # a message that looks like a path
])
def test_a_commit_records_what_its_options_say(repo, options, paths):
    """The paths a `git commit` would record, option by option (the value of -m, -F, -c, -C, -t, -S, --fixup is
    no path; -a in any cluster takes every tracked change; named paths, after -- too, replace the staged set)."""
    (repo / "prepare.py").write_text("TIME_BUDGET = 600\n")
    (repo / "train.py").write_text("DEPTH = 10\n")
    (repo / "msg.txt").write_text("x\n")
    git(repo, "add", "train.py")
    assert sorted(hooks.commit_changes(str(repo), options)) == paths


def test_a_named_path_counts_against_the_last_commit_even_when_staged(repo):
    (repo / "prepare.py").write_text("TIME_BUDGET = 600\n")
    git(repo, "add", "prepare.py")
    assert hook(bash(repo, 'git commit -m "x" prepare.py')) == (2, "", REFUSED_PREPARE)


def test_a_commit_of_several_fixed_files_names_each_and_how_to_undo_them(repo):
    for name in ("prepare.py", "uv.lock"):
        (repo / name).write_text("CHANGED\n")
    assert hook(bash(repo, 'git commit -am "x"')) == (2, "", "refused: this commit would record prepare.py, uv.lock; a "
                                                     "night changes only train.py (undo the rest with `git checkout "
                                                     "HEAD -- prepare.py uv.lock`)\n")


@pytest.mark.parametrize("command,refused", [
    ("git add newfile.py && git commit -m x", True),       # an untracked file, added in the same line
    ("git add -A && git commit -m x", True), ("git add . && git commit -m x", True),
    ("git add --all && git commit -m x", True), ("git add -u && git commit -m x", False),  # -u: tracked files only
    ("git add --update && git commit -m x", False), ("git add && git commit -m x", False),  # a bare add stages nothing
    ("git add -u . && git commit -m x", False), ("git add . --update && git commit -m x", False),  # -u with a path
    ("git add -Av && git commit -m x", True), ("git add -vu && git commit -m x", False),  # flags in a cluster
    ("git add train.py && git commit -m x", False),        # only what the night may change
    ("git add -- train.py && git commit -m x", False),
    ("GIT_AUTHOR_NAME=x git commit -am y", False), ("GIT_AUTHOR_NAME=x EDITOR=true git add newfile.py; git commit -m y", True),
    ("lower_case=1 git add newfile.py && git commit -m x", True),
])
def test_what_git_add_stages_in_the_same_line_counts(repo, command, refused):
    (repo / "train.py").write_text("DEPTH = 10\n")
    (repo / "newfile.py").write_text("import prepare\n")
    status, _, message = hook(bash(repo, command))
    assert (status, message.startswith("refused: this commit would record newfile.py")) == ((2, True) if refused else (0, False))


def test_git_add_stages_what_it_names_and_nothing_git_ignores(repo):
    """A dirty prepare.py that the line does not add, and files git ignores, are not what the commit records."""
    (repo / "train.py").write_text("DEPTH = 10\n")
    (repo / "prepare.py").write_text("TIME_BUDGET = 600\n")
    assert hook(bash(repo, "git add train.py && git commit -m x")) == (0, "", "")
    assert hook(bash(repo, "git add --update && git commit -m x")) == (2, "", REFUSED_PREPARE)  # every tracked change
    git(repo, "checkout", "-q", "--", "prepare.py")
    (repo / ".git" / "info" / "exclude").write_text("run.log\n")
    (repo / "run.log").write_text("step 1\n")
    assert hook(bash(repo, "git add -A && git commit -m x")) == (0, "", "")


def test_git_add_from_a_folder_names_paths_from_the_top(repo):
    """`git add -A` takes the whole tree from any folder, and a train.py in a folder is not the night's."""
    (repo / "sub").mkdir()
    (repo / "sub" / "train.py").write_text("DEPTH = 10\n")
    status, _, message = hook(bash(repo / "sub", "git add -A && git commit -m x"))
    assert (status, message.split(";")[0]) == (2, "refused: this commit would record sub/train.py")


def test_git_c_and_its_own_folder_are_both_guarded(repo, tmp_path):
    """Run from outside, `git -C` into the night is guarded; run from the night, a push anywhere is refused."""
    (repo / "prepare.py").write_text("TIME_BUDGET = 600\n")
    assert hook(bash(tmp_path, f'git -C {repo} commit -qam "x"')) == (2, "", REFUSED_PREPARE)
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    assert hook(bash(repo, f"git -C {other} push")) == (2, "", REFUSED_PUSH)


def test_a_worktree_of_the_night_is_guarded_through_git_c(repo, tmp_path):
    """parallel/program.md's worktrees: detached, in a repository with a night's branch; `git -C` reaches them."""
    worktree = tmp_path / "worktrees" / "w1"
    git(repo, "worktree", "add", "-q", "--detach", str(worktree), "HEAD")
    (worktree / "prepare.py").write_text("TIME_BUDGET = 600\n")
    assert hook(bash(repo, f'git -C {worktree} commit -qam "x"')) == (2, "", REFUSED_PREPARE)
    assert hook(bash(worktree, 'git commit -qam "x"')) == (2, "", REFUSED_PREPARE)  # or run in it
    assert hook(bash(repo, 'git -C ../worktrees/w1 commit -qam "x"')) == (2, "", REFUSED_PREPARE)  # from the event's cwd
    git(repo, "checkout", "-q", "main")
    git(repo, "branch", "-q", "-D", "autoresearch/t")  # no night left in the repository: nothing to guard
    assert hook(bash(worktree, 'git commit -qam "x"')) == (0, "", "")


def test_the_guard_reads_codex_commands_and_leaves_other_branches_alone(repo):
    codex = {"hook_event_name": "PreToolUse", "tool_name": "shell", "cwd": str(repo), "turn_id": "t",
             "tool_input": {"command": ["bash", "-lc", "git push"]}}
    assert hook(codex) == (2, "", REFUSED_PUSH)
    (repo / "prepare.py").write_text("TIME_BUDGET = 600\n")
    git(repo, "checkout", "-q", "main")  # not a night: someone working on the project
    assert hook(bash(repo, 'git commit -am "budget"')) == (0, "", "")
    assert hook(bash(repo, "git push")) == (0, "", "")


@pytest.mark.parametrize("command", ["GIT_DIR=x git push", "a=1 git push", "GIT_AUTHOR_NAME=x EDITOR=true git push"])
def test_variables_before_a_command_do_not_hide_it(repo, command):
    assert hook(bash(repo, command)) == (2, "", REFUSED_PUSH)


@pytest.mark.parametrize("command", ["FOO=bar", [], ""])
def test_a_command_line_with_no_command_is_allowed(repo, command):
    """Only variables, an empty line, Codex's empty argument list: nothing to guard, and no error."""
    event = dict(bash(repo, "x"), tool_input={"command": command})
    assert hook(event) == (0, "", "")


@pytest.mark.parametrize("stdin,note", [
    ("{not json", "night hook: unreadable input (JSONDecodeError): allowed\n"),
    ('{"tool_input": {"command": "git push"}}', "night hook: unreadable input (KeyError): allowed\n"),
    ('{"hook_event_name": "SessionStart"}', "night hook: no rule for the event 'SessionStart': allowed\n"),
    ('{"hook_event_name": "PreToolUse", "tool_input": "git push"}', ""),  # no command in it: nothing to guard
])
def test_bad_input_allows_the_action_and_says_so_in_one_line(stdin, note):
    assert hook(stdin) == (0, "", note)


# --- keep going --------------------------------------------------------------------------------------------

KEEP_GOING = {"decision": "block", "reason": (
    "The night goes on: pick up at program.md's loop, step 1, and keep looping. Only train.py changes; decide "
    "with `uv run analysis.py --decide`; never ask the human whether to continue (they are asleep; they stop "
    "the night with a STOP file).")}
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"


def add_row(repo, n):
    with open(repo / "results.tsv", "a") as f:
        f.write(f"abc{n:04d}\t1.000000\t44.0\tkeep\tbaseline\n")


def test_stop_during_setup_is_allowed(repo):
    assert hook(stop(repo)) == (0, "", "")  # no ledger yet
    (repo / "results.tsv").write_text(HEADER)
    assert hook(stop(repo)) == (0, "", "")  # header only: the human confirms the setup


def test_once_the_loop_runs_the_agent_is_sent_back_until_it_stops_making_progress(repo):
    (repo / "results.tsv").write_text(HEADER)
    add_row(repo, 1)
    status, out, err = hook(stop(repo))
    assert (status, json.loads(out), err) == (0, KEEP_GOING, "")
    assert hook(stop(repo, active=True)) == (0, "", "night hook: no new row in results.tsv since the agent was "
                                                    "last sent back (1 rows): letting it stop\n")
    add_row(repo, 2)  # it ran another experiment meanwhile
    status, out, _ = hook(stop(repo, active=True))
    assert status == 0 and json.loads(out) == KEEP_GOING
    git(repo, "checkout", "-q", "-b", "autoresearch/u")  # another night: its own count
    status, out, _ = hook(stop(repo))
    assert status == 0 and json.loads(out) == KEEP_GOING


def test_the_outer_loops_form_prints_the_instruction_while_the_night_goes_on(repo, monkeypatch):
    """`python3 night/hooks.py keep-going` (night/codex-night.sh's loop), in this process: the instruction on
    stdout and 0 while the agent must go on; nothing and 1 when it may stop, with the reason on stderr."""
    monkeypatch.chdir(repo)
    assert hook("", "keep-going") == (1, "", "")  # setup: no ledger
    (repo / "results.tsv").write_text(HEADER)
    add_row(repo, 1)
    assert hook("", "keep-going") == (0, KEEP_GOING["reason"] + "\n", "")
    assert hook("", "keep-going") == (1, "", "night hook: no new row in results.tsv since the agent was last sent "
                                             "back (1 rows): letting it stop\n")


def test_off_a_night_the_agent_stops_as_it_likes(repo):
    (repo / "results.tsv").write_text(HEADER)
    add_row(repo, 1)
    git(repo, "checkout", "-q", "main")  # a ledger, but not on a night's branch: someone working on the project
    assert hook(stop(repo)) == (0, "", "")


@pytest.mark.parametrize("saved", ["{not json", "[1, 2]", '{"autoresearch/t": 5}'])
def test_the_count_lives_in_git_s_directory_and_survives_a_damaged_file(repo, saved):
    """The rows at the last send-back are kept in .git (never in the working tree, where git would see a new
    file); an unreadable or foreign file there counts as no send-back yet, except a real count for this night."""
    (repo / "results.tsv").write_text(HEADER)
    add_row(repo, 1)
    state = repo / ".git" / hooks.STATE_FILE
    state.write_text(saved)
    status, out, err = hook(stop(repo))
    if saved.startswith("{\""):  # 5 rows when last sent back, 1 now: no progress since
        assert (status, out) == (0, "") and "no new row" in err
    else:
        assert (status, json.loads(out), err) == (0, KEEP_GOING, "")
        assert json.loads(state.read_text()) == {"autoresearch/t": 1}
    assert hooks.STATE_FILE not in os.listdir(repo)


def test_a_stop_file_ends_the_night(repo):
    (repo / "results.tsv").write_text(HEADER)
    add_row(repo, 1)
    (repo / "STOP").write_text("")
    assert hook(stop(repo)) == (0, "", "night hook: STOP found: the night ends here\n")
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "STOP" in f.read().split()  # the human's file never reaches a commit


# --- git's own hooks, through the environment ---------------------------------------------------------------

def test_gits_hooks_refuse_what_the_guard_refuses(repo, tmp_path):
    env = dict(AS_A_SCRIPT, PATH=PYTHON_FIRST, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="core.hooksPath",
               GIT_CONFIG_VALUE_0=os.path.join(NIGHT, "git-hooks"), GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@b",
               GIT_COMMITTER_NAME="a", GIT_COMMITTER_EMAIL="a@b")
    (repo / "prepare.py").write_text("TIME_BUDGET = 600\n")
    (repo / "train.py").write_text("DEPTH = 10\n")
    result = git(repo, "commit", "-qam", "budget", env=env)
    assert result.returncode == 1 and result.stderr == REFUSED_PREPARE
    git(repo, "checkout", "--", "prepare.py")
    assert git(repo, "commit", "-qam", "depth", env=env).returncode == 0
    git(tmp_path, "init", "-q", "--bare", "remote.git")
    result = git(repo, "push", "-q", str(tmp_path / "remote.git"), "autoresearch/t", env=env)
    assert result.returncode != 0 and REFUSED_PUSH in result.stderr


def test_gits_hooks_decide_on_what_is_staged(repo, monkeypatch):
    """pre-commit and pre-push as git runs them (in the worktree's top directory), in this process: what is staged
    decides, the rest of the working tree does not; off a night's branch nothing is refused."""
    monkeypatch.chdir(repo)
    (repo / "prepare.py").write_text("TIME_BUDGET = 600\n")
    (repo / "train.py").write_text("DEPTH = 10\n")
    git(repo, "add", "train.py")
    assert hook("", "pre-commit") == (0, "", "")  # prepare.py changed, but not staged: not in this commit
    git(repo, "add", "prepare.py")
    assert hook("", "pre-commit") == (1, "", REFUSED_PREPARE)
    assert hook("", "pre-push") == (1, "", REFUSED_PUSH)
    git(repo, "checkout", "-q", "main")
    assert hook("", "pre-commit") == (0, "", "") and hook("", "pre-push") == (0, "", "")


# --- the Codex loop -----------------------------------------------------------------------------------------

def test_the_codex_loop_resumes_while_the_night_makes_progress(repo, tmp_path):
    """A stand-in codex: its first two turns each add a ledger row, the third adds none; the loop then ends."""
    shutil.copytree(NIGHT, repo / "night")
    for name in ("analysis.py", "files.py"):  # the hooks read the list of what a night may change
        shutil.copy(os.path.join(ROOT, name), repo)
    (repo / "results.tsv").write_text(HEADER)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "codex").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s|' "$@" >> "{calls}"
        printf '%s\\n' "$GIT_CONFIG_VALUE_0" >> "{calls}"
        turns=$(wc -l < "{calls}")
        if [ "$turns" -le 2 ]; then printf 'abc%s\\t1.0\\t0.0\\tkeep\\tx\\n' "$turns" >> results.tsv; fi
        """))
    (bin_dir / "codex").chmod(0o755)
    result = subprocess.run([os.path.join(NIGHT, "codex-night.sh"), "nov24"], cwd=repo, capture_output=True,
                            text=True, timeout=120, env=dict(AS_A_SCRIPT, PATH=f"{bin_dir}:{PYTHON_FIRST}"))
    assert result.returncode == 0, result.stderr  # the loop ended: the Stop rule let the night stop
    turns = [line.split("|")[:-1] for line in calls.read_text().splitlines()]
    hooks_path = [line.split("|")[-1] for line in calls.read_text().splitlines()]
    flags = ["exec", "--sandbox", "danger-full-access", "-c", "allow_login_shell=false"]  # on every turn: a resumed
    assert turns[0][:5] == flags and len(turns[0]) == 6  # session keeps the conversation, not the sandbox
    assert "the run tag is nov24" in turns[0][5] and "keep polling its session with write_stdin" in turns[0][5]
    assert turns[1:] == [flags + ["resume", "--last", KEEP_GOING["reason"]]] * 2
    assert hooks_path == ["night/git-hooks"] * 3  # the guard rides along in git's own hooks
    assert "no new row in results.tsv since the agent was last sent back (2 rows)" in result.stderr


# --- Claude Code's settings against the protocol ------------------------------------------------------------

def split(command):
    """The documented split: on ;, &&, ||, |, & and newlines outside quotes (a 2>&1 is no split)."""
    parts, current, quote = [], "", None
    i = 0
    while i < len(command):
        c = command[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in ";\n|" or (c == "&" and command[i - 1:i] != ">" and command[i + 1:i + 2] != ">"):
            parts.append(current)
            current = ""
            if command[i:i + 2] in ("&&", "||"):
                i += 1
            i += 1
            continue
        current += c
        i += 1
    return [p.strip() for p in parts + [current] if p.strip()]


def rule_regex(pattern, path=False):
    """A rule's pattern as a regex: `*` is anything (in a path: within one directory, `**` across them)."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*)", pattern):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*" if path else ".*"}.get(token, re.escape(token))
    return re.compile(out)


def rules(kind, tool, settings=SETTINGS):
    found = [re.fullmatch(rf"{tool}\((.*)\)", r) for r in settings["permissions"][kind]]
    return [m.group(1).replace(":*", " *") for m in found if m]


def edit_allowed(path, settings=SETTINGS):
    """An edit of `path` (relative to the project, or absolute) under the Edit rules, as Claude Code reads them
    for `claude --settings night/claude-settings.json` started in the project (measured with the real binary):
    `//x` is absolute, `./x` and `x` relative to the project, `/x` relative to the settings file's folder."""
    project = "/project"
    target = path if path.startswith("/") else os.path.join(project, os.path.normpath(path))

    def matches(pattern):
        if pattern.startswith("//"):
            anchored = pattern[1:]
        elif pattern.startswith("/"):
            anchored = os.path.join(project, "night") + pattern
        else:
            anchored = os.path.join(project, pattern[2:] if pattern.startswith("./") else pattern)
        return rule_regex(anchored, path=True).fullmatch(target)
    return (any(matches(p) for p in rules("allow", "Edit", settings))
            and not any(matches(p) for p in rules("deny", "Edit", settings)))


def command_allowed(command, settings=SETTINGS):
    """A command line under the Bash rules: every part allowed, none denied, every redirect target editable."""
    for part in split(command):
        part = re.sub(r"^(timeout \S+|time|nice|nohup|stdbuf( -\S+)*) ", "", part)
        if any(rule_regex(p).fullmatch(part) for p in rules("deny", "Bash", settings)):
            return False
        if not any(rule_regex(p).fullmatch(part) for p in rules("allow", "Bash", settings)):
            return False
        for target in re.findall(r"(?<![0-9&])>>?\s*([^\s&>]+)", part):
            if not edit_allowed(target, settings):
                return False
    return True


def test_every_command_of_the_protocol_is_allowed():
    commands = protocol_commands("program.md")
    assert "uv run train.py > run.log 2>&1" in commands and "uv run analysis.py --decide" in commands
    assert [c for c in commands if not command_allowed(c)] == []
    assert edit_allowed("train.py") and edit_allowed("results.tsv")  # the agent's edits
    commands = protocol_commands("program.md", "parallel/program.md")
    assert any(c.startswith("sky exec ar-nov23-1 parallel/sky.yaml") for c in commands) and len(commands) > 30
    assert [c for c in commands if not command_allowed(c, PARALLEL_SETTINGS)] == []
    assert edit_allowed("/home/you/worktrees/w1-2/train.py", PARALLEL_SETTINGS)


def test_a_one_gpu_night_never_writes_the_judges_log():
    """The judge's line is the run's own: no rule of a one-GPU night lets the agent edit, append to or copy into it
    (a parallel night must copy the clusters' lines in, and its settings allow that alone)."""
    for command in JUDGE_LOG_WRITES:
        assert not command_allowed(command), command
    assert not edit_allowed("judge.log") and not edit_allowed("logs/w1-2.judge.log")
    assert command_allowed("cat logs/w1-2.judge.log >> judge.log", PARALLEL_SETTINGS)


def test_the_parallel_settings_are_a_one_gpu_night_s_and_the_parallel_rules():
    """One file per night, and the parallel one holds every rule of the one-GPU one (the judge's log aside)."""
    one, parallel = SETTINGS["permissions"], PARALLEL_SETTINGS["permissions"]
    assert set(one["allow"]) < set(parallel["allow"])
    assert set(one["deny"]) - {"Edit(./judge.log)"} < set(parallel["deny"]) and "Edit(./judge.log)" in parallel["allow"]
    assert {k: v for k, v in SETTINGS.items() if k != "permissions"} == (
        {k: v for k, v in PARALLEL_SETTINGS.items() if k != "permissions"})
    assert one["defaultMode"] == parallel["defaultMode"] and parallel["additionalDirectories"] == ["../worktrees"]


@pytest.mark.parametrize("command", FORBIDDEN_COMMANDS)
def test_forbidden_commands_are_not_allowed(command):
    assert not command_allowed(command) and not command_allowed(command, PARALLEL_SETTINGS)


@pytest.mark.parametrize("path", ["prepare.py", "machine.py", "uv.lock", "program.md", "night/hooks.py",
                                  "night/claude-settings.json", "/home/you/worktrees/w1-2/prepare.py"])
def test_edits_of_the_other_files_are_denied(path):
    assert not edit_allowed(path) and not edit_allowed(path, PARALLEL_SETTINGS)


def test_no_rule_is_anchored_at_the_settings_folder():
    """`Edit(/train.py)` in night/claude-settings.json means night/train.py: every loop edit was refused so."""
    assert [r for kind in ("allow", "deny") for r in rules(kind, "Edit") if re.match(r"/[^/]", r)] == []
    assert not edit_allowed("night/train.py") and edit_allowed("train.py")


def test_the_matching_itself_can_fail():
    """The reference matching above is not vacuous: a split part, a wildcard and a redirect each decide."""
    assert split("a && b || c; d | e & f\ng 2>&1") == ["a", "b", "c", "d", "e", "f", "g 2>&1"]
    assert split('grep "a;b" x') == ['grep "a;b" x']
    assert rule_regex("git commit *").fullmatch("git commit -am x") and not rule_regex("git commit *").fullmatch(
        "git commitx")
    assert not command_allowed("uv run train.py > prepare.py 2>&1")


# --- the files themselves ------------------------------------------------------------------------------------

DOCUMENTED = {  # Claude Code's settings keys used here, as its documentation and schema name them
    "top": {"$schema", "permissions", "env", "sandbox", "hooks"},
    "permissions": {"allow", "deny", "ask", "defaultMode", "additionalDirectories"},
    "events": {"PreToolUse", "PostToolUse", "Stop", "SubagentStop", "SessionStart", "PreCompact", "PostCompact"},
    "rule": r"^((Bash|Edit|Read|Write|WebFetch|WebSearch|Glob|Grep)(\([^)]+\))?|mcp__.*)$",
}


@pytest.mark.parametrize("SETTINGS", [SETTINGS, PARALLEL_SETTINGS], ids=["one GPU", "parallel"])
def test_the_settings_use_the_documented_keys_and_rules(SETTINGS):
    assert set(SETTINGS) <= DOCUMENTED["top"] and set(SETTINGS["permissions"]) <= DOCUMENTED["permissions"]
    assert SETTINGS["permissions"]["defaultMode"] == "dontAsk"  # no prompts, and it works as root
    for kind in ("allow", "deny"):
        rules_ = SETTINGS["permissions"][kind]
        assert len(rules_) == len(set(rules_)) and all(re.match(DOCUMENTED["rule"], r) for r in rules_), kind
    assert int(SETTINGS["env"]["BASH_DEFAULT_TIMEOUT_MS"]) >= 15 * 60 * 1000
    assert int(SETTINGS["env"]["BASH_MAX_TIMEOUT_MS"]) >= int(SETTINGS["env"]["BASH_DEFAULT_TIMEOUT_MS"])
    assert SETTINGS["sandbox"] == {"enabled": False}  # the sandbox hides the GPU
    assert set(SETTINGS["hooks"]) == {"PreToolUse", "Stop"} and set(SETTINGS["hooks"]) <= DOCUMENTED["events"]
    for event, groups in SETTINGS["hooks"].items():
        for group in groups:
            assert set(group) <= {"matcher", "hooks"}
            for handler in group["hooks"]:
                assert handler["type"] == "command" and "night/hooks.py" in handler["command"]
                assert 0 < handler["timeout"] <= 60
    assert SETTINGS["hooks"]["PreToolUse"][0]["matcher"] == "Bash"


def test_nothing_applies_just_because_an_agent_opens_the_repository():
    for name in (".claude", ".codex", "AGENTS.md", "CLAUDE.md"):
        assert not os.path.exists(os.path.join(ROOT, name)), name
    for name in ("codex-night.sh", "git-hooks/pre-commit", "git-hooks/pre-push"):  # run by path
        assert os.access(os.path.join(NIGHT, name), os.X_OK), name


def test_the_hooks_import_nothing_heavy():
    """Every shell command of a night runs the guard: its imports are the standard library's and the project's
    own light modules, never torch or numpy (each takes seconds to import)."""
    code = ("import runpy, sys\n"
            "runpy.run_path('night/hooks.py', run_name='imported')  # its imports, not its main\n"
            "print(sorted(m for m in ('torch', 'numpy', 'pyarrow', 'matplotlib', 'prepare') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
