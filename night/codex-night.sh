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
# Every turn runs with the same flags (a resumed session keeps only the conversation, not the sandbox):
# - --sandbox danger-full-access: the run needs the GPU and a writable .git, which Codex's sandbox would hide
#   and protect (`codex exec` never asks for approval); run the whole loop in night/sandbox.sh instead
#   (`night/sandbox.sh night/codex-night.sh nov24`), or start it where that is acceptable;
# - -c allow_login_shell=false: commands run in `bash -c`, with this shell's PATH, not in a login shell whose
#   profile may reset PATH and hide uv.
# The first turn that fails ends the night with its status.
set -uo pipefail
tag="${1:?usage: night/codex-night.sh TAG (the run tag, e.g. nov24)}"
cd "$(git rev-parse --show-toplevel)" || exit 1
export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=core.hooksPath GIT_CONFIG_VALUE_0=night/git-hooks
codex="${CODEX:-codex}"
flags=(--sandbox danger-full-access -c allow_login_shell=false)
prompt="Read program.md and follow it. The human has agreed the setup: the run tag is $tag and the data is \
prepared, so do the setup and start the loop without asking. A run takes about 6 minutes: start it with \
exec_command, and when the command returns while the run goes on, keep polling its session with write_stdin \
(empty chars, yield_time_ms 30000) until it exits. Never end your turn while a run is going: what still runs \
when a turn ends is killed."
"$codex" exec "${flags[@]}" "$prompt" </dev/null || exit
while instruction=$(python3 night/hooks.py keep-going); do
    "$codex" exec "${flags[@]}" resume --last "$instruction" </dev/null || exit
done
