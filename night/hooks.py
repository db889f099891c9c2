"""The night's two hooks, one implementation for Claude Code and Codex (standard library only, fast).

    python3 night/hooks.py              # a hook: the agent's JSON on stdin, dispatched by hook_event_name
    python3 night/hooks.py pre-commit   # the same guard as git's pre-commit and pre-push hooks
    python3 night/hooks.py pre-push     #   (night/git-hooks/, for agents whose own hooks cannot be loaded per run)
    python3 night/hooks.py keep-going   # the Stop rule for an outer loop: prints the instruction, exit 0 to go on

Guard (PreToolUse on a shell command): on a night's branch (autoresearch/*) or one of its worktrees, a
`git commit` that would record a change to any file but train.py, and any `git push`, are refused with one
line the agent can act on (exit status 2, the line on stderr). Compound commands are split first.

Keep going (Stop): once the loop has started (an autoresearch/* branch and a ledger with a result), the agent
is sent back to program.md's loop with the rules a compaction may have lost. During setup it may stop, so the
human can confirm; a STOP file in the repository ends the night; a night that made no new ledger row since it
was last sent back is let stop, so a stuck agent cannot loop forever.

Whatever goes wrong in here (malformed input, an unknown event, no git) allows the action and says so in one
line on stderr: a broken hook must never stall a night.
"""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from files import AGENT_FILES, git, read_ledger  # noqa: E402  (the audit's own: what a night may change, the ledger)

STOP_FILE = "STOP"              # created by the human in the repository: the night ends at the agent's next stop
STATE_FILE = "autoresearch-keep-going"  # in the repository's git directory: rows per night when last sent back
KEEP_GOING = ("The night goes on: pick up at program.md's loop, step 1, and keep looping. Only train.py changes; "
              "decide with `uv run analysis.py --decide`; never ask the human whether to continue (they are "
              "asleep; they stop the night with a STOP file).")

# ---------------------------------------------------------------------------
# git, from the directory the command runs in
# ---------------------------------------------------------------------------

def on_a_night(directory):
    """Whether `directory` is on a night's branch, or in a worktree (detached) of a repository that has one."""
    branch = git(directory, "symbolic-ref", "--quiet", "--short", "HEAD")
    if branch is not None:
        return branch.startswith("autoresearch/")
    return bool(git(directory, "for-each-ref", "--format=%(refname)", "refs/heads/autoresearch/"))


def outside_the_rules(paths):
    """The paths (relative to the repository's top) a night may not change."""
    return sorted({p for p in paths if p and p not in AGENT_FILES})

# ---------------------------------------------------------------------------
# Guard
# ---------------------------------------------------------------------------

def split_commands(command):
    """The simple commands of a shell command line, as lists of words: split on ;, &&, ||, |, & and newlines,
    outside quotes (a redirect such as 2>&1 is not a split)."""
    commands, words, word, quote, i = [], [], None, None, 0
    while i < len(command):
        c = command[i]
        if quote:
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(command):
                i += 1
                word += command[i]
            else:
                word += c
        elif c in "'\"":
            quote, word = c, word or ""
        elif c == "\\" and i + 1 < len(command):
            i += 1
            word = (word or "") + command[i]
        elif c in " \t\r":
            if word is not None:
                words.append(word)
            word = None
        elif c in ";\n|" or (c == "&" and command[i - 1:i] != ">" and command[i + 1:i + 2] != ">"):
            if word is not None:
                words.append(word)
            word = None
            if words:
                commands.append(words)
            words = []
        else:
            word = (word or "") + c
        i += 1
    if word is not None:
        words.append(word)
    return commands + [words] if words else commands


VALUED = {"-m", "--message", "-F", "--file", "-C", "--reuse-message", "-c", "--reedit-message", "--author", "--date",
          "-t", "--template", "--fixup", "--squash", "--trailer", "--cleanup", "-S", "--gpg-sign"}  # take a value


def commit_changes(directory, options):
    """The paths a `git commit` with these options would record a change to: the paths named (--only, git's
    default), else every tracked change with -a, else what is staged."""
    named, everything, i = [], False, 0
    while i < len(options):
        o = options[i]
        if o == "--":
            named += options[i + 1:]
            break
        if o in VALUED or (re.fullmatch(r"-[a-zA-Z]+", o) and o[-1] in "mFCct"):
            everything |= o.startswith("-") and not o.startswith("--") and "a" in o
            i += 2
            continue
        if o == "--all" or re.fullmatch(r"-[a-zA-Z]+", o) and "a" in o:
            everything = True
        elif not o.startswith("-"):
            named.append(o)
        i += 1
    if named:
        return (git(directory, "diff", "--name-only", "HEAD", "--", *named) or "").splitlines()
    return (git(directory, "diff", "--name-only", "HEAD" if everything else "--cached") or "").splitlines()


def refusal_to_commit(paths):
    wrong = outside_the_rules(paths)
    return wrong and (f"refused: this commit would record {', '.join(wrong)}; a night changes only "
                      f"{', '.join(AGENT_FILES)} (undo the rest with `git checkout HEAD -- {' '.join(wrong)}`)")


PUSH_REFUSED = "refused: git push is not part of the night; the branch stays on this machine (program.md)"


def guard_git(words, cwd, added):
    """The refusal for one `git ...` command, or None; `added` collects what a `git add` earlier in the same
    command line will have staged by the time a commit runs."""
    directory, options, i = cwd, [], 1
    while i < len(words) and words[i].startswith("-"):  # git's own options: -C DIR, and any other
        if words[i] in ("-C", "-c") and i + 1 < len(words):
            directory = os.path.join(directory, words[i + 1]) if words[i] == "-C" else directory
            options += [] if words[i] == "-C" else words[i:i + 2]
            i += 2
        else:
            options += [] if words[i] in ("--no-pager", "-P") else [words[i]]
            i += 1
    if i >= len(words) or not (on_a_night(directory) or on_a_night(cwd)):
        return None
    if options:  # -c core.hooksPath=..., --git-dir=...: what a rule's wildcard lets through, only the guard sees
        return (f"refused: git's own options ({' '.join(options)}) are not part of the night; run git as "
                f"program.md writes it")
    if words[i] == "push":
        return PUSH_REFUSED
    if words[i] == "add":
        paths = [w for w in words[i + 1:] if not w.startswith("-")]  # none with -A or -u: the whole tree
        flags = "".join(w[1:] for w in words[i + 1:] if re.fullmatch(r"-[a-zA-Z]+", w))  # -Av is -A and -v
        everything = "A" in flags or "--all" in words[i + 1:]
        tracked_only = ("u" in flags or "--update" in words[i + 1:]) and not everything  # -u: no untracked file
        if paths or tracked_only or everything:  # a bare `git add` stages nothing
            added += (git(directory, "diff", "--name-only", "HEAD", "--", *paths) or "").splitlines()
            if not tracked_only:
                added += (git(directory, "ls-files", "--others", "--exclude-standard", "--full-name", "--", *paths)
                          or "").splitlines()
    if words[i] == "commit":
        return refusal_to_commit(commit_changes(directory, words[i + 1:]) + added) or None
    return None


def guard(event):
    """PreToolUse: (exit status, message) for a shell command; anything else is allowed."""
    tool_input = event.get("tool_input") or {}
    command = tool_input.get("command") if isinstance(tool_input, dict) else None
    if isinstance(command, list):  # Codex's shell tool: ["bash", "-lc", "the command line"]
        command = command[-1] if command else ""
    if not isinstance(command, str):
        return 0, None
    cwd, added = event.get("cwd") or os.getcwd(), []
    for words in split_commands(command):
        while len(words) > 1 and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefixes
            words = words[1:]
        if os.path.basename(words[0]) == "git":
            refusal = guard_git(words, cwd, added)
            if refusal:
                return 2, refusal
    return 0, None

# ---------------------------------------------------------------------------
# Keep going
# ---------------------------------------------------------------------------

def ledger_rows(top):
    """Rows of results.tsv, as the morning report reads them (None when there is no ledger)."""
    try:
        return len(read_ledger(os.path.join(top, "results.tsv"))[0])
    except OSError:
        return None


def keep_going(event):
    """Stop: (exit status, the JSON to print or None, a note for stderr or None)."""
    cwd = event.get("cwd") or os.getcwd()
    top = git(cwd, "rev-parse", "--show-toplevel")
    if top is None or not on_a_night(top):
        return 0, None, None
    if os.path.exists(os.path.join(top, STOP_FILE)):
        return 0, None, f"{STOP_FILE} found: the night ends here"
    rows = ledger_rows(top)
    if not rows:
        return 0, None, None  # setup: the human confirms before the loop starts
    state = os.path.join(git(top, "rev-parse", "--absolute-git-dir") or top, STATE_FILE)
    night = git(top, "symbolic-ref", "--quiet", "--short", "HEAD") or "detached"
    try:
        with open(state) as f:
            sent_back = json.load(f)  # {branch: the ledger's rows when the agent was last sent back}
    except (OSError, ValueError):
        sent_back = {}
    sent_back = sent_back if isinstance(sent_back, dict) else {}
    if rows <= sent_back.get(night, -1):
        return 0, None, (f"no new row in results.tsv since the agent was last sent back ({rows} rows): "
                         f"letting it stop")
    try:
        with open(state, "w") as f:
            json.dump({**sent_back, night: rows}, f)
    except OSError:
        pass
    return 0, json.dumps({"decision": "block", "reason": KEEP_GOING}), None

# ---------------------------------------------------------------------------
# git's own hooks (night/git-hooks): pre-commit and pre-push
# ---------------------------------------------------------------------------

def git_hook(name):
    """pre-commit or pre-push, as git runs them (in the worktree's top directory): 1 refuses."""
    top = os.getcwd()
    if not on_a_night(top):
        return 0
    refusal = PUSH_REFUSED if name == "pre-push" else refusal_to_commit(
        (git(top, "diff", "--cached", "--name-only") or "").splitlines())
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    return 0


def main(argv):
    if argv[1:2] in (["pre-commit"], ["pre-push"]):
        return git_hook(argv[1])
    if argv[1:2] == ["keep-going"]:  # night/codex-night.sh's loop: the instruction and 0 while the night goes on
        _, output, note = keep_going({"hook_event_name": "Stop", "cwd": os.getcwd()})
        if note:
            print(f"night hook: {note}", file=sys.stderr)
        if output:
            print(json.loads(output)["reason"])
        return 0 if output else 1
    try:
        event = json.loads(sys.stdin.read())
        name = event["hook_event_name"]
    except (ValueError, KeyError, TypeError) as e:
        print(f"night hook: unreadable input ({type(e).__name__}): allowed", file=sys.stderr)
        return 0
    if name == "PreToolUse":
        status, message = guard(event)
        if message:
            print(message, file=sys.stderr)
        return status
    if name == "Stop":
        status, output, note = keep_going(event)
        if output:
            print(output)
        if note:
            print(f"night hook: {note}", file=sys.stderr)
        return status
    print(f"night hook: no rule for the event {name!r}: allowed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
