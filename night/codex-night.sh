#!/usr/bin/env bash
# A night with Codex, unattended: `codex exec` on program.md, resumed after every turn while the night goes on.
#
#   night/codex-night.sh nov24        # the run tag: the branch autoresearch/nov24 must not exist yet
#
# Codex loads hooks only from its own config layers (~/.codex, or a trusted project's .codex/, which would apply
# to everyone who opens Codex here) and runs them only once reviewed and trusted, so the night's hooks cannot
# be switched on for one run. Instead the same rules come from night/hooks.py in two other ways:
# - keep going: this loop asks the Stop rule after each turn and resumes the session with its instruction,
#   until a STOP file, or a turn that added no row to results.tsv;
# - the guard: git's own pre-commit and pre-push hooks (night/git-hooks), switched on through the environment
#   for the commands of this run only.
# The run needs the GPU and a writable .git, which Codex's sandbox would hide and protect: it runs without the
# sandbox (danger-full-access) and without approvals (never). Start it where that is acceptable.
set -uo pipefail
tag="${1:?usage: night/codex-night.sh TAG (the run tag, e.g. nov24)}"
cd "$(git rev-parse --show-toplevel)" || exit 1
export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=core.hooksPath GIT_CONFIG_VALUE_0=night/git-hooks
codex="${CODEX:-codex}"
prompt="Read program.md and follow it. The human has agreed the setup: the run tag is $tag and the data is \
prepared, so do the setup and start the loop without asking. Run train.py with a shell timeout of at least \
15 minutes (timeout_ms 900000)."
"$codex" exec --sandbox danger-full-access --ask-for-approval never "$prompt"
while instruction=$(python3 night/hooks.py keep-going); do
    "$codex" exec resume --last "$instruction"
done
