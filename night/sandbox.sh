#!/usr/bin/env bash
# The night in a sandbox: COMMAND runs where the operating system keeps the benchmark and the machine safe.
#
#   night/sandbox.sh claude --settings night/claude-settings.json     # from the project's root
#   night/sandbox.sh night/codex-night.sh nov24
#
# Built on bubblewrap (bwrap: `apt-get install bubblewrap`). Inside:
# - the project stays writable (editors write a temporary file beside the target and rename it), but every file
#   git tracks except train.py is bound read-only on top (the list is git's, so whatever is added later is
#   covered), and so are .venv/, night/node_modules/, .git/hooks and .git/config; results.tsv, run.log,
#   judge.log, logs/ and the rest of .git stay writable. A read-only file bound over a writable folder is a
#   mount point: rm, mv, sed -i and an editor's write-and-rename fail on it with EBUSY rather than EROFS;
# - outside the project everything is read-only, except the token cache (<cache>/tokens), a private /tmp and
#   /dev/shm, uv's cache, Triton's (~/.triton) and the Hugging Face cache (the kernel hub's);
# - HOME is private: only the agents' state (~/.claude, ~/.claude.json, ~/.codex, or what CLAUDE_CONFIG_DIR and
#   CODEX_HOME name), ~/.gitconfig (read-only) and the caches above are there; SSH keys and stored credentials are
#   not, so a push has nothing to authenticate with. The tools the night runs that live under HOME or /tmp (PATH's
#   folders, COMMAND, codex-night.sh's $CODEX, the Python environment) are bound read-only;
# - the network is as it is (the agent needs its model); the GPU's device nodes are passed in and /sys is
#   visible, so CUDA works inside.
# When COMMAND ends, every file that appeared in the project is named, before anything else runs there (a planted
# json.py would be imported by the morning report). The exit status is COMMAND's. Where bwrap is missing or
# cannot create its namespaces, one line says so and COMMAND is never run without the sandbox.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: night/sandbox.sh COMMAND [ARGS...] (from the project's root)" >&2; exit 2; }
project=$(pwd -P)
if [ ! -f "$project/night/sandbox.sh" ] || [ ! -f "$project/train.py" ]; then
    echo "night/sandbox.sh: run it from the project's root (the folder holding train.py), not $project" >&2
    exit 2
fi
if ! command -v bwrap >/dev/null 2>&1; then
    echo "night/sandbox.sh: bubblewrap is not installed (apt-get install bubblewrap); nothing was run" >&2
    exit 1
fi
base=(--ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --tmpfs /dev/shm --unshare-pid --die-with-parent)
if ! bwrap "${base[@]}" true 2>/dev/null; then
    echo "night/sandbox.sh: bubblewrap cannot create its namespaces here (a container that forbids them?); nothing" \
         "was run: run the night on a host that allows them, or without the sandbox (night/README.md)" >&2
    exit 1
fi

home=$(cd "$HOME" && pwd -P)
cache=${AUTORESEARCH_CACHE_DIR:-$home/.cache/autoresearch}
args=("${base[@]}" --setenv PYTHONDONTWRITEBYTECODE 1)  # no .pyc written in the project (see below)
for node in /dev/nvidia* /dev/dri /dev/kfd; do  # the GPU: CUDA's and ROCm's device nodes
    [ -e "$node" ] && args+=(--dev-bind "$node" "$node")
done

# HOME: private; what the agents and the run need, and nothing else
args+=(--tmpfs "$home")
bind_ro() { [ -e "$1" ] && args+=(--ro-bind "$1" "$1"); return 0; }
bind_rw() { mkdir -p "$1" 2>/dev/null; [ -e "$1" ] && args+=(--bind "$1" "$1"); return 0; }
IFS=: read -r -a path_dirs <<< "$PATH"
for dir in "${path_dirs[@]}" "${PYENV_ROOT:-$home/.pyenv}" "$home/.local/share/uv/python" "$home/.nvm"; do
    real=$(readlink -f "$dir" 2>/dev/null) || continue
    case "$real" in "$home"/*) bind_ro "$real" ;; esac  # tools and interpreters installed under HOME
done
python=$(readlink -f "$project/.venv/bin/python" 2>/dev/null) && case "$python" in
    "$home"/*) bind_ro "$(dirname "$(dirname "$python")")" ;; esac  # the interpreter .venv was made from
# the tools COMMAND runs, where the private /tmp or HOME would hide them: COMMAND itself, codex-night.sh's $CODEX,
# the Python environment uv runs in; a tool inside node_modules brings the whole of it (its platform packages)
bind_tool() {
    local real
    real=$(readlink -f "$1" 2>/dev/null) || return 0
    case "$real" in */node_modules/*) real="${real%%/node_modules/*}/node_modules" ;; *) [ -d "$real" ] || real=$(dirname "$real") ;; esac
    case "$real" in /tmp/*|"$home"/*) bind_ro "$real" ;; esac
}
bind_tool "$(command -v "$1" 2>/dev/null || echo "$1")"
for tool in "${CODEX:-}" "${VIRTUAL_ENV:-}" "${UV_PROJECT_ENVIRONMENT:-}"; do [ -n "$tool" ] && bind_tool "$tool"; done
for dir in "${path_dirs[@]}"; do case "$dir" in /tmp/*) bind_tool "$dir" ;; esac; done
bind_rw "${CLAUDE_CONFIG_DIR:-$home/.claude}"
bind_rw "${CODEX_HOME:-$home/.codex}"
bind_ro "$home/.gitconfig"
bind_rw "${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$home/.cache}/uv}"
bind_rw "${TRITON_CACHE_DIR:-$home/.triton}"
bind_rw "${HF_HOME:-${XDG_CACHE_HOME:-$home/.cache}/huggingface}"
bind_ro "$cache"
bind_rw "$cache/tokens"

# the project: writable, then what a night may not change bound read-only on top
args+=(--bind "$project" "$project")
while IFS= read -r -d '' file; do
    [ "$file" = train.py ] || [ -L "$project/$file" ] || [ ! -e "$project/$file" ] ||
        args+=(--ro-bind "$project/$file" "$project/$file")
done < <(git -C "$project" ls-files -z)
for path in .venv night/node_modules .git/hooks .git/config; do
    real=$(readlink -f "$project/$path" 2>/dev/null) || continue
    [ -e "$real" ] && args+=(--ro-bind "$real" "$real")  # a symlinked .venv is bound at its target
done
while IFS= read -r -d '' folder; do  # compiled modules the morning report would load instead of their source
    args+=(--ro-bind "$folder" "$folder")
done < <(find "$project" \( -path "$project/.git" -o -path "$project/.venv" -o -path "$project/night/node_modules" \) \
         -prune -o -type d -name __pycache__ -print0)

listing() {  # the project's files, the night's own (the ledger, the logs, STOP) aside
    find "$project" \( -path "$project/.git" -o -path "$project/logs" \) -prune -o -print | LC_ALL=C sort |
        grep -v -x -F -e "$project/results.tsv" -e "$project/run.log" -e "$project/judge.log" -e "$project/STOP" \
            -e "$project/logs"
}
before=$(listing)
# the Claude state file is saved through a lock file and a rename beside it: a copy in the private HOME, kept after
[ -f "$home/.claude.json" ] && args+=(--bind "$home/.claude.json" "$home/.claude.json.outside")
bwrap "${args[@]}" --chdir "$project" -- sh -c '
    [ -f "$HOME/.claude.json.outside" ] && cp "$HOME/.claude.json.outside" "$HOME/.claude.json"
    "$@"; status=$?
    [ -f "$HOME/.claude.json" ] && [ -f "$HOME/.claude.json.outside" ] && cat "$HOME/.claude.json" > "$HOME/.claude.json.outside"
    exit $status' night-sandbox "$@"
status=$?
appeared=$(LC_ALL=C comm -13 <(printf '%s\n' "$before") <(listing))
if [ -n "$appeared" ]; then
    echo "night/sandbox.sh: these files appeared in the project during the night; look at them before running" \
         "anything here (a .py file beside the project's would be imported):" >&2
    while IFS= read -r file; do echo "  ${file#"$project"/}" >&2; done <<< "$appeared"
fi
exit "$status"
