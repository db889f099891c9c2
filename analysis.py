"""
The morning report: what the night's results.tsv says, progress.png, and an audit of the night.

    uv run analysis.py                        # ./results.tsv; writes ./progress.png beside it
    uv run analysis.py path/to/results.tsv    # another ledger
    uv run analysis.py --no-plot              # the report and the audit only

The agent writes results.tsv by hand. The audit checks it against what happened: the judge (prepare.py,
machine.py, pyproject.toml, uv.lock) is the same at HEAD as at the baseline's commit; every kept commit is in the
branch and every discarded or crashed one was reset away; each keep beats the best before it; and every
number was written by evaluate_bpb itself, which appends a line to judge.log beside results.tsv for each
evaluation (the sha256 of the train.py that ran, and its val_bpb). Exit status 1 when there is a finding.
"""

import argparse
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

HEADER = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = ("keep", "discard", "crash")
JUDGE_FILES = ["prepare.py", "machine.py", "pyproject.toml", "uv.lock"]  # what the agent may never change
JUDGE_LOG = "judge.log"        # evaluate_bpb's own record, beside results.tsv
LABEL_CHARS = 45               # kept runs are labelled with this much of their description
TOP_GAINS = 5                  # largest gains listed

# ---------------------------------------------------------------------------
# Reading the ledger
# ---------------------------------------------------------------------------

@dataclass
class Row:
    line: int          # line number in results.tsv
    commit: str
    val_bpb: float
    val_bpb_text: str  # as written, for the comparison with the judge's log
    memory_gb: float
    status: str
    description: str


def read_ledger(path):
    """(rows, problems): every well-formed row, and one message per line that was skipped."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()  # \n, \r\n and \r alike
    rows, problems = [], []
    header_seen = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if not header_seen:
            header_seen = True
            if [f.strip() for f in fields] == HEADER:
                continue
            problems.append(f"line {number}: expected the header {chr(9).join(HEADER)!r}; read as a row")
        if len(fields) != len(HEADER):
            problems.append(f"line {number}: {len(fields)} tab-separated fields instead of {len(HEADER)}; skipped")
            continue
        commit, val_bpb, memory_gb, status, description = (f.strip() for f in fields)
        try:
            value, memory = float(val_bpb), float(memory_gb)
        except ValueError:
            problems.append(f"line {number}: val_bpb {val_bpb!r} or memory_gb {memory_gb!r} is not a number; skipped")
            continue
        if status.lower() not in STATUSES:
            problems.append(f"line {number}: status {status!r} is not one of {', '.join(STATUSES)}; skipped")
            continue
        rows.append(Row(number, commit, value, val_bpb, memory, status.lower(), description))
    return rows, problems

# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def chain_of_keeps(rows):
    """[(row, gain over the best before it, or None for the baseline)] for the kept rows, in order."""
    baseline = next((r for r in rows if r.status != "crash"), None)
    best, chain = baseline.val_bpb if baseline else None, []
    for row in rows:
        if row.status == "keep":
            chain.append((row, None if row is baseline else best - row.val_bpb))
            best = min(best, row.val_bpb)
    return chain


def report(rows):
    """The morning report, as lines of text."""
    kept, discarded, crashed = ([r for r in rows if r.status == s] for s in STATUSES)
    decided = len(kept) + len(discarded)
    keep_rate = f"{100 * len(kept) / decided:.0f}%" if decided else "n/a"
    out = [f"Experiments: {len(rows)} ({len(kept)} kept, {len(discarded)} discarded, {len(crashed)} crashed); "
           f"keep rate {keep_rate} of the {decided} that finished"]
    baseline = next((r for r in rows if r.status != "crash"), None)
    if baseline is None:
        return out + ["No experiment has finished yet: nothing to compare."]
    out.append(f"Baseline:    {baseline.val_bpb:.6f}  ({baseline.commit}, {baseline.description})")
    if not kept:
        return out + ["Best:        nothing kept yet"]
    best = min(kept, key=lambda r: r.val_bpb)
    gain = baseline.val_bpb - best.val_bpb
    out.append(f"Best:        {best.val_bpb:.6f}  ({best.commit}, {best.description})")
    out.append(f"Improvement: {gain:.6f} ({100 * gain / baseline.val_bpb:.2f}%)")
    out += ["", "Kept, in order:", f"  {'commit':8s} {'val_bpb':>9s} {'gain':>9s} {'memory':>7s}  description"]
    chain = chain_of_keeps(rows)
    for row, step_gain in chain:
        gain_text = "baseline" if step_gain is None else f"{step_gain:+.6f}"
        out.append(f"  {row.commit:8s} {row.val_bpb:9.6f} {gain_text:>9s} {row.memory_gb:5.1f}GB  {row.description}")
    gains = sorted(((g, r) for r, g in chain if g is not None), key=lambda x: -x[0])
    if gains:
        out += ["", f"Largest gains (of {len(gains)}):"]
        out += [f"  {g:+.6f}  {r.commit}  {r.description}" for g, r in gains[:TOP_GAINS]]
    if crashed:
        out += ["", f"Crashes ({len(crashed)}):"] + [f"  {r.commit}  {r.description}" for r in crashed]
    return out

# ---------------------------------------------------------------------------
# The audit: the ledger against git and the judge's own log
# ---------------------------------------------------------------------------

def git(directory, *args):
    """stdout of a git command in `directory`, or None when it fails."""
    try:
        result = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def read_judge_log(path):
    """{sha256 of the train.py that ran: set of val_bpb strings (6 decimals)} from judge.log."""
    evaluations = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) >= 3:
                evaluations.setdefault(fields[1], set()).add(fields[2])
    return evaluations


def audit(rows, directory):
    """One finding (text) per thing the ledger claims that did not happen; notes for checks not made."""
    findings, notes = [], []
    if git(directory, "rev-parse", "--git-dir") is None:
        return findings, [f"{directory} is not a git repository: the audit needs one"]
    full = {r.commit: git(directory, "rev-parse", "--verify", "--quiet", f"{r.commit}^{{commit}}") for r in rows}
    for row in rows:
        if full[row.commit] is None:
            findings.append(f"line {row.line}: commit {row.commit} is not in the repository")

    # the judge was not touched
    baseline = next((r for r in rows if r.status != "crash" and full[r.commit]), None)
    if baseline:
        for name in JUDGE_FILES:
            before = git(directory, "rev-parse", f"{full[baseline.commit]}:{name}")
            if before != git(directory, "rev-parse", f"HEAD:{name}"):
                findings.append(f"{name}: changed since the baseline ({baseline.commit}) at HEAD")
        changed = git(directory, "diff", "--name-only", "HEAD", "--", *JUDGE_FILES)
        for name in (changed or "").split():
            findings.append(f"{name}: changed in the working tree (not committed)")

    # the ratchet held: keeps in the branch, the rest reset away, each keep better than the best before it
    best = None
    for row in rows:
        if full[row.commit] is None:
            continue
        in_branch = git(directory, "merge-base", "--is-ancestor", full[row.commit], "HEAD") is not None
        if row.status == "keep" and not in_branch:
            findings.append(f"line {row.line}: kept commit {row.commit} is not in the branch (reset away?)")
        if row.status != "keep" and in_branch:
            findings.append(f"line {row.line}: {row.status} commit {row.commit} is still in the branch (not reset)")
        if row.status == "keep":
            if best is not None and row.val_bpb >= best:
                findings.append(f"line {row.line}: kept {row.commit} at {row.val_bpb:.6f} does not beat the best "
                                f"kept before it, {best:.6f}")
            best = row.val_bpb if best is None else min(best, row.val_bpb)

    # the numbers are the judge's: each finished row matches an evaluation of that commit's train.py
    judge_log = os.path.join(directory, JUDGE_LOG)
    finished = [r for r in rows if r.status != "crash" and full[r.commit]]
    if finished and not os.path.exists(judge_log):
        findings.append(f"{JUDGE_LOG}: missing beside the ledger, so no number can be checked "
                        f"(evaluate_bpb writes it in the directory train.py runs in)")
        return findings, notes
    evaluations = read_judge_log(judge_log) if finished else {}
    for row in finished:
        source = subprocess.run(["git", "show", f"{full[row.commit]}:train.py"], cwd=directory, capture_output=True)
        values = evaluations.get(hashlib.sha256(source.stdout).hexdigest(), set())
        if not values:
            findings.append(f"line {row.line}: {row.commit} has no evaluation in {JUDGE_LOG} (was it run?)")
        elif f"{row.val_bpb:.6f}" not in values:
            findings.append(f"line {row.line}: val_bpb {row.val_bpb_text} of {row.commit} is not a number the judge "
                            f"wrote for it ({', '.join(sorted(values))})")
    return findings, notes

# ---------------------------------------------------------------------------
# progress.png
# ---------------------------------------------------------------------------

def plot_progress(rows, path):
    """The chart: finished experiments in order, discarded grey, kept green and labelled, the running best."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in rows if r.status != "crash"]
    x = list(range(len(finished)))
    kept_x = [i for i, r in zip(x, finished) if r.status == "keep"]
    improvements = len([r for r, gain in chain_of_keeps(rows) if gain is not None])
    fig, ax = plt.subplots(figsize=(16, 8))
    ax.scatter([i for i, r in zip(x, finished) if r.status == "discard"],
               [r.val_bpb for r in finished if r.status == "discard"],
               s=12, color="#bbbbbb", alpha=0.5, label="discarded", zorder=2)
    ax.scatter(kept_x, [finished[i].val_bpb for i in kept_x], s=50, color="#2ca02c", edgecolors="black",
               linewidths=0.5, label="kept", zorder=3)
    if kept_x:
        best, running = [], float("inf")
        for i in range(kept_x[0], len(finished)):
            if finished[i].status == "keep":
                running = min(running, finished[i].val_bpb)
            best.append(running)
        ax.step(range(kept_x[0], len(finished)), best, where="post", color="#2ca02c", linewidth=1.5,
                label="running best", zorder=1)
        for i in kept_x:
            text = finished[i].description
            text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 3] + "..."
            ax.annotate(text, (i, finished[i].val_bpb), xytext=(4, 6), textcoords="offset points", fontsize=7,
                        rotation=30, color="#1a6b1a")
        low, high = min(finished[i].val_bpb for i in kept_x), finished[0].val_bpb
        span = (high - low) or 0.01 * high or 0.01
        ax.set_ylim(low - 0.15 * span, max(high, low) + 0.15 * span)
    ax.set_xlabel("Experiment #")
    ax.set_ylabel("Validation BPB (lower is better)")
    ax.set_title(f"Autoresearch Progress: {len(rows)} Experiments, {improvements} Kept Improvements")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return fig

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="The morning report on a night of experiments, with an audit.")
    parser.add_argument("ledger", nargs="?", default="results.tsv", help="the ledger (default ./results.tsv)")
    parser.add_argument("--no-plot", action="store_true", help="do not write progress.png")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ledger):
        sys.exit(f"error: no ledger at {args.ledger}; the agent creates results.tsv at setup (see program.md), "
                 f"or pass its path")
    directory = os.path.dirname(os.path.abspath(args.ledger))
    rows, problems = read_ledger(args.ledger)
    print("\n".join(report(rows)))
    if not args.no_plot and rows:
        path = os.path.join(directory, "progress.png")
        plot_progress(rows, path)
        print(f"\nChart: {path}")
    findings, notes = audit(rows, directory)
    findings = problems + findings
    clean = " (a clean night)" if not findings and not notes else ""
    print(f"\nAudit: {len(findings)} finding{'s' * (len(findings) != 1)}{clean}")
    for line in findings + [f"note: {n}" for n in notes]:
        print(f"  {line}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
