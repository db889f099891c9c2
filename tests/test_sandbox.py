"""night/sandbox.sh: a night where the operating system keeps the benchmark and the machine safe.

A shell run inside the sandbox tries what a careless or clever agent might (a fixed file edited, renamed, deleted;
.venv, git's hooks and config, the data, the real home, the rest of the machine written; a key read) and each is
refused, while train.py, the ledger and the token cache stay writable; a new file in the project is named when the
command ends; the exit status is the command's. Without bubblewrap, or where it cannot create its namespaces, one
line and nothing run. The real agents inside it: tests/test_agents.py.

    uv run pytest tests/test_sandbox.py
"""

import hashlib
import os
import shutil
import subprocess

import pytest

from helpers import ROOT, git, make_project, require

SANDBOX = os.path.join(ROOT, "night", "sandbox.sh")
ATTEMPTS = r"""
echo 'TIME_BUDGET = 600' >> prepare.py         ; echo "append prepare.py: $?"
sed -i 's/300/600/' prepare.py                 ; echo "sed prepare.py: $?"
mv machine.py machine.bak                      ; echo "mv machine.py: $?"
rm -f .gitignore                               ; echo "rm .gitignore: $?"
echo x > night/hooks.py                        ; echo "write night/hooks.py: $?"
echo x > .venv/planted.py                      ; echo "write .venv: $?"
echo '#!/bin/sh' > .git/hooks/post-checkout    ; echo "write a git hook: $?"
git config core.hooksPath /tmp/hooks           ; echo "git config: $?"
echo x > "$AUTORESEARCH_CACHE_DIR/data/planted" ; echo "write the data: $?"
echo x > ~/.bashrc && test ! -e ~/.ssh/id_ed25519 ; echo "the home is its own: $?"
echo x > /etc/planted                          ; echo "write /etc: $?"
echo x > "$AUTORESEARCH_CACHE_DIR/tokens/cached" ; echo "write the token cache: $?"
echo '# an idea' >> train.py                   ; echo "edit train.py: $?"
printf 'commit\tval_bpb\n' > results.tsv       ; echo "write the ledger: $?"
echo 'import os' > json.py                     ; echo "a new file: $?"
exit 7
"""
ALLOWED = {"append prepare.py": False, "sed prepare.py": False, "mv machine.py": False, "rm .gitignore": False,
           "write night/hooks.py": False, "write .venv": False, "write a git hook": False, "git config": False,
           "write the data": False, "the home is its own": True, "write /etc": False, "write the token cache": True,
           "edit train.py": True, "write the ledger": True, "a new file": True}


def digests(*folders):
    """sha256 of every file under the folders (git's objects aside), by path."""
    out = {}
    for folder in folders:
        for parent, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "objects"]
            for name in names:
                path = os.path.join(parent, name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def machine(tmp_path):
    """A project (committed, with a .venv and the night's scripts), a home with a key and an agent's state, a cache."""
    project = make_project(tmp_path / "autoresearch")
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "-c", "user.name=h", "-c", "user.email=h@example.com", "commit", "-qm", "the project")
    os.makedirs(os.path.join(project, "night"))
    shutil.copy(SANDBOX, os.path.join(project, "night", "sandbox.sh"))
    with open(os.path.join(project, "night", "hooks.py"), "w") as f:
        f.write("# the guard\n")
    git(project, "add", "night")
    git(project, "-c", "user.name=h", "-c", "user.email=h@example.com", "commit", "-qm", "the night's files")
    os.makedirs(os.path.join(project, ".venv", "lib"))
    home, cache = tmp_path / "home", tmp_path / "cache"
    for path, text in ((home / ".ssh" / "id_ed25519", "a key\n"), (home / ".claude" / "state", "{}\n"),
                       (cache / "data" / "shard_06542.parquet", "data\n"), (cache / "tokenizer" / "tokenizer.pkl", "t\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = dict(os.environ, HOME=str(home), AUTORESEARCH_CACHE_DIR=str(cache))
    return project, home, cache, env


def test_inside_the_project_only_train_py_and_the_nights_files_change(machine):
    project, home, cache, env = machine
    require("bwrap")
    watched = [project, os.path.join(cache, "data"), os.path.join(cache, "tokenizer")]
    before = digests(*watched)
    home_before = digests(home)
    result = subprocess.run([SANDBOX, "sh", "-c", ATTEMPTS], cwd=project, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 7, result.stderr  # the command's own status
    succeeded = {line.rsplit(": ", 1)[0]: line.endswith(": 0") for line in result.stdout.splitlines()}
    assert succeeded == ALLOWED, result.stdout + result.stderr
    assert "Device or resource busy" in result.stderr and "Read-only file system" in result.stderr
    after = digests(*watched)
    changed = {os.path.relpath(p, project) for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed == {"train.py", "results.tsv", "json.py"}
    assert digests(home) == home_before and not os.path.exists("/etc/planted")
    assert os.path.exists(os.path.join(cache, "tokens", "cached"))
    assert result.stderr.endswith("appeared in the project during the night; look at them before running anything "
                                  "here (a .py file beside the project's would be imported):\n  json.py\n"), result.stderr


def test_the_agents_state_stays_theirs(machine):
    """~/.claude and the state file Claude Code saves through a lock file and a rename beside it, in HOME."""
    project, home, cache, env = machine
    require("bwrap")
    (home / ".claude.json").write_text('{"before": 1}\n')
    script = ('echo new >> ~/.claude/state && printf "{\\"after\\": 2}\\n" > ~/.claude.json.lock '
              '&& mv ~/.claude.json.lock ~/.claude.json')
    result = subprocess.run([SANDBOX, "sh", "-c", script], cwd=project, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert (home / ".claude" / "state").read_text() == "{}\nnew\n"
    assert (home / ".claude.json").read_text() == '{"after": 2}\n'


def test_without_bubblewrap_nothing_runs(machine, tmp_path):
    project, _, _, env = machine
    result = subprocess.run(["/bin/bash", SANDBOX, "touch", "ran"], cwd=project, env=dict(env, PATH=str(tmp_path / "none")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and not os.path.exists(os.path.join(project, "ran"))
    assert result.stderr == ("night/sandbox.sh: bubblewrap is not installed (apt-get install bubblewrap); nothing was "
                             "run\n")


def test_where_namespaces_are_forbidden_nothing_runs(machine, tmp_path):
    """A container that forbids them: bwrap itself fails, as it does there."""
    project, _, _, env = machine
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "bwrap").write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not permitted' >&2\n"
                                 "exit 1\n")
    (stubs / "bwrap").chmod(0o755)
    result = subprocess.run([SANDBOX, "touch", "ran"], cwd=project, env=dict(env, PATH=f"{stubs}:{env['PATH']}"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and not os.path.exists(os.path.join(project, "ran"))
    assert len(result.stderr.splitlines()) == 1 and "cannot create its namespaces" in result.stderr


def test_it_runs_only_from_the_projects_root(machine):
    project, _, _, env = machine
    result = subprocess.run([SANDBOX, "touch", "ran"], cwd=os.path.join(project, "night"), env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "run it from the project's root" in result.stderr
