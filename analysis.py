"""
The morning report: what the night's results.tsv says, progress.png, and an audit of the night.

    uv run analysis.py                        # ./results.tsv; writes ./progress.png beside it
    uv run analysis.py path/to/results.tsv    # another ledger
    uv run analysis.py --no-plot              # the report and the audit only
    uv run analysis.py --branch autoresearch/nov22   # the night's branch, where the kept commits do not tell

The agent writes results.tsv by hand. The audit checks it against what happened, on the night's branch (the
one holding the kept commits, whatever is checked out): only train.py changed, at the branch's tip and in
each kept commit; no untracked .py file sits beside train.py; every kept commit is in the branch and every
discarded or crashed one was reset away; each keep beats the best before it; and every number is one that
evaluate_bpb wrote into judge.log during the night, one run per row, judged once, with the baseline's
settings, on one device, soon enough after its training began. Exit status 1 when there is a finding.
"""

import argparse
import ast
import functools
import hashlib
import json
import math
import operator
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass

from files import AGENT_FILES, JUDGE_LOG, JUDGE_LOGGED, STATUSES, git, read_judge_log, read_ledger, recorded_val_digest

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

TIME_SLACK = 0.05              # an evaluation may come the budget, this fraction of it, TIME_STEPS of the judge's
TIME_STEPS = 13                # median steps (11 uncounted, the last, the evaluation's start), its longest step and
TIME_GRACE = 1.0               # these seconds after the training began, before the run counts as trained too long
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}  # what prepare.py's constants are written with
CLEAR_QUANTILE = 0.999        # a first run is kept at once when its gain is this far out in the noise (t-quantile)
CONFIRM_QUANTILE = 0.8         # else it is run again and kept when the mean's gain is this far out
MIN_NOISE = 0.0001             # the least noise floor the margins assume: identical runs must not make every gain clear
LABEL_CHARS = 45               # kept runs are labelled with this much of their description
TOP_GAINS = 5                  # largest gains listed

# ---------------------------------------------------------------------------
# Reading the ledger
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Experiments and their noise: a commit's rows are its runs
# ---------------------------------------------------------------------------

@dataclass
class Experiment:
    commit: str
    rows: list         # its rows in the ledger: one per run (re-runs are more rows), all with one status

    @property
    def status(self):
        return self.rows[0].status

    @property
    def runs(self):
        return [r.val_bpb for r in self.rows if r.status != "crash"]

    @property
    def mean(self):
        return statistics.fmean(self.runs) if self.runs else None

    @property
    def description(self):
        return self.rows[0].description


def experiments(rows):
    """The ledger's rows grouped by commit, in the order each commit first appears."""
    by_commit = {}
    for row in rows:
        by_commit.setdefault(row.commit, []).append(row)
    return [Experiment(commit, commit_rows) for commit, commit_rows in by_commit.items()]


def noise_floor(groups):
    """(pooled standard deviation, degrees of freedom) of the groups of runs (one per commit) with two or more."""
    groups = [g for g in groups if len(g) >= 2]
    df = sum(len(g) - 1 for g in groups)
    squares = sum(sum((x - statistics.fmean(g)) ** 2 for x in g) for g in groups)
    return (math.sqrt(squares / df) if df else None), df


def t_cdf(t, df):
    """P(T <= t) for Student's t with a whole number of degrees of freedom (Abramowitz and Stegun 26.7.3, 26.7.4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, total = math.cos(theta) ** 2, 0.0
    if df % 2:
        term = math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * 2 * k / (2 * k + 1)
        both_sides = 2 / math.pi * (theta + math.sin(theta) * total)
    else:
        term = 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= cos2 * (2 * k - 1) / (2 * k)
        both_sides = math.sin(theta) * total
    return 0.5 + math.copysign(both_sides / 2, t)


@functools.lru_cache(maxsize=None)
def t_quantile(p, df):
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection of t_cdf."""
    low, high = 0.0, 1e7
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return (low + high) / 2


def decide(runs, best_runs, sigma, df):
    """(keep, discard or rerun; the gain of the runs' mean over the best's mean; the margin it was held to).

    A first run that does not beat the best is discarded, one that beats it by a clear margin is kept, one
    in between is run again; after that the mean of the runs is kept only if it beats the best by the
    confirming margin. Margins are t-quantiles of the noise floor on its degrees of freedom (wide while the
    floor rests on one pair) times the standard error of the difference of the two means."""
    gain = statistics.fmean(best_runs) - statistics.fmean(runs)
    error = max(sigma or 0.0, MIN_NOISE) * math.sqrt(1 / len(runs) + 1 / len(best_runs))
    if len(runs) == 1:
        margin = t_quantile(CLEAR_QUANTILE, max(df, 1)) * error
        return ("discard" if gain <= 0 else "keep" if gain >= margin else "rerun"), gain, margin
    margin = t_quantile(CONFIRM_QUANTILE, max(df, 1)) * error
    return ("keep" if gain > 0 and gain >= margin else "discard"), gain, margin

# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def chain_of_keeps(exps):
    """[(experiment, gain of its mean over the best mean before it, or None for the baseline)], in order."""
    baseline = next((e for e in exps if e.runs), None)
    best, chain = baseline.mean if baseline else None, []
    for exp in exps:
        if exp.status == "keep" and exp.runs:
            chain.append((exp, None if exp is baseline else best - exp.mean))
            best = min(best, exp.mean)
    return chain


def summarize(rows):
    """The night's figures (what the report prints and --json gives), experiments counted as commits."""
    exps = experiments(rows)
    kept, discarded, crashed = ([e for e in exps if e.status == s] for s in STATUSES)
    sigma, df = noise_floor([e.runs for e in exps])
    baseline = next((e for e in exps if e.runs), None)
    best = min((e for e in kept if e.runs), key=lambda e: e.mean, default=None)
    described = lambda e: e and dict(commit=e.commit, description=e.description, runs=e.runs, mean=e.mean)
    chain = [dict(described(e), gain=gain, within_noise=gain is not None and sigma is not None and gain < sigma,
                  memory_gb=max(r.memory_gb for r in e.rows)) for e, gain in chain_of_keeps(exps)]
    decided = len(kept) + len(discarded)
    return dict(
        experiments=len(exps), kept=len(kept), discarded=len(discarded), crashed=len(crashed),
        keep_rate=len(kept) / decided if decided else None, runs=sum(len(e.runs) for e in exps),
        noise_floor=dict(sigma=sigma, df=df, commits=sum(1 for e in exps if len(e.runs) >= 2)),
        baseline=described(baseline), best=described(best),
        improvement=baseline.mean - best.mean if baseline and best else None, chain=chain,
        crashes=[dict(commit=e.commit, description=e.description) for e in crashed])


def report(rows):
    """The morning report, as lines of text."""
    s = summarize(rows)
    rate = f"{100 * s['keep_rate']:.0f}%" if s["keep_rate"] is not None else "n/a"
    out = [f"Experiments: {s['experiments']} ({s['kept']} kept, {s['discarded']} discarded, {s['crashed']} crashed); "
           f"keep rate {rate} of the {s['kept'] + s['discarded']} that finished"]
    floor = s["noise_floor"]
    out.append(f"Runs:        {s['runs']} finished; noise floor " + (
        f"{floor['sigma']:.6f} ({floor['df']} df, from {floor['commits']} commits run more than once)"
        if floor["sigma"] is not None else "unknown (no commit run twice: program.md runs the baseline twice)"))
    baseline, best = s["baseline"], s["best"]
    if baseline is None:
        return out + ["No experiment has finished yet: nothing to compare."]
    runs_of = lambda e: f"; mean of {len(e['runs'])} runs" if len(e["runs"]) > 1 else ""
    out.append(f"Baseline:    {baseline['mean']:.6f}  ({baseline['commit']}, {baseline['description']}{runs_of(baseline)})")
    if best is None:
        return out + ["Best:        nothing kept yet"]
    out.append(f"Best:        {best['mean']:.6f}  ({best['commit']}, {best['description']}{runs_of(best)})")
    out.append(f"Improvement: {s['improvement']:.6f} ({100 * s['improvement'] / baseline['mean']:.2f}%)")
    out += ["", "Kept, in order (means of their runs):",
            f"  {'commit':8s} {'val_bpb':>9s} {'gain':>9s}  {'runs':>4s} {'memory':>7s}  description"]
    for e in s["chain"]:
        gain = "baseline " if e["gain"] is None else f"{e['gain']:+.6f}{'~' if e['within_noise'] else ' '}"
        out.append(f"  {e['commit']:8s} {e['mean']:9.6f} {gain:>10s} {len(e['runs']):4d} {e['memory_gb']:5.1f}GB  "
                   f"{e['description']}")
    if any(e["within_noise"] for e in s["chain"]):
        out.append(f"  ~ a gain within the noise floor ({floor['sigma']:.6f})")
    gains = sorted((e for e in s["chain"] if e["gain"] is not None), key=lambda e: -e["gain"])
    if gains:
        out += ["", f"Largest gains (of {len(gains)}):"]
        out += [f"  {e['gain']:+.6f}  {e['commit']}  {e['description']}" for e in gains[:TOP_GAINS]]
    if s["crashes"]:
        out += ["", f"Crashes ({len(s['crashes'])}):"] + [f"  {c['commit']}  {c['description']}" for c in s["crashes"]]
    return out

# ---------------------------------------------------------------------------
# The audit: the ledger against git and the judge's own log
# ---------------------------------------------------------------------------

def find_branch(rows, directory, named=None):
    """(the night's branch, a note or None): the branch named, else the one holding the most kept commits,
    an autoresearch/* branch before others, the checked-out one next, the newest last. Then the report works
    from any checkout of the repository."""
    if named:
        if git(directory, "rev-parse", "--verify", "--quiet", f"refs/heads/{named}") is None:
            sys.exit(f"error: no branch {named!r} in {directory}; `git branch --list 'autoresearch/*'` lists the nights")
        return named, None
    branches = (git(directory, "for-each-ref", "--format=%(refname:short)", "refs/heads") or "").split()
    if not branches:
        return "HEAD", None
    held = {branch: 0 for branch in branches}
    for commit in {r.commit for r in rows if r.status == "keep"}:
        for branch in (git(directory, "for-each-ref", "--contains", commit, "--format=%(refname:short)",
                           "refs/heads") or "").split():
            held[branch] += 1
    current = git(directory, "symbolic-ref", "--quiet", "--short", "HEAD")
    rank = {b: (-held[b], not b.startswith("autoresearch/"), b != current) for b in branches}
    ranked = sorted(branches, key=lambda b: (rank[b], -(night_start(directory, b) or 0)))
    tied = [b for b in ranked if rank[b] == rank[ranked[0]]]
    if len(tied) > 1:
        return ranked[0], f"{', '.join(tied)} hold the kept commits alike: audited the newest, {ranked[0]} (--branch names one)"
    return ranked[0], None


def night_start(directory, branch):
    """When the night's branch was created (git's reflog), or None where git no longer knows."""
    log = git(directory, "reflog", "show", "--date=unix", "--format=%gd", f"refs/heads/{branch}", "--")
    if not log:
        return None
    return float(log.splitlines()[-1].rsplit("@{", 1)[1].rstrip("}"))


def settings_of(source):
    """The benchmark's constants as a prepare.py's text assigns them (numbers and arithmetic only), as strings."""
    def number(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -number(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
            return ARITHMETIC[type(node.op)](number(node.left), number(node.right))
        raise ValueError(ast.dump(node))

    settings = {}
    for node in ast.parse(source).body:
        names = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if isinstance(node, ast.Assign) and len(names) == 1 and names[0] in JUDGE_LOGGED:
            try:
                settings[names[0]] = str(number(node.value))
            except (ValueError, ArithmeticError):
                pass  # not a plain number: left unchecked
    return settings


def match_runs(rows, runs, sha_of):
    """{row line: the judge's run behind it}: each finished row takes one run of its commit's train.py with its
    val_bpb, never one another row took; and the finding for each row that has none."""
    matched, findings, taken = {}, [], set()
    for row in rows:
        if row.status == "crash" or sha_of.get(row.commit) is None:
            continue
        own = [run for run in runs if run.sha256 == sha_of[row.commit]]
        free = [run for run in own if run.val_bpb == f"{row.val_bpb:.6f}" and run.line not in taken]
        if free:
            matched[row.line] = free[0]
            taken.add(free[0].line)
        elif not own:
            findings.append(f"line {row.line}: {row.commit} has no evaluation in {JUDGE_LOG} (was it run?)")
        elif any(run.val_bpb == f"{row.val_bpb:.6f}" for run in own):
            findings.append(f"line {row.line}: {row.commit} at {row.val_bpb_text} has no run of its own in {JUDGE_LOG}: "
                            f"another row took the only evaluation with that number (a copied row?)")
        else:
            findings.append(f"line {row.line}: val_bpb {row.val_bpb_text} of {row.commit} is not a number the judge "
                            f"wrote for it ({', '.join(sorted({run.val_bpb for run in own}))})")
    return matched, findings


def kept_diff_signs(diff):
    """(findings, notes) for the lines a kept commit adds to train.py: writing into prepare or judge.log, and
    the weaker signs of training on the validation split or reading the token cache."""
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    findings, notes = [], []
    for line in added:
        code = line.split("#", 1)[0]
        if re.search(r"\bprepare\s*\.\s*\w+(\s*\.\s*\w+|\[[^\]]*\])*\s*([-+*/]?=)(?!=)|setattr\(\s*prepare\b|"
                     r"vars\(\s*prepare\s*\)|\bprepare\.__dict__|sys\.modules\[\s*['\"]prepare", code):
            findings.append(f"assigns into prepare: {line.strip()}")
        if re.search(r"judge\.log|JUDGE_LOG", code):
            findings.append(f"names the judge's log: {line.strip()}")
        if re.search(r"['\"]val['\"]", code):
            notes.append(f"names the validation split: {line.strip()}")
        if re.search(r"TOKENS_DIR|\.npz\b|['\"]tokens['\"]", code):
            notes.append(f"names the token cache: {line.strip()}")
    return findings, notes


def audit(rows, directory, branch=None):
    """One finding (text) per thing the ledger claims that did not happen, or that the rules forbid; notes for
    weaker signs and for checks not made. Three parts: the files a night changed, the ratchet of keeps, and
    the numbers against the judge's log."""
    if git(directory, "rev-parse", "--git-dir") is None:
        return [], [f"{directory} is not a git repository: the audit needs one"]
    branch, note = (branch, None) if branch else find_branch(rows, directory)  # main passes the one it found
    night = Night(rows, directory, branch)
    findings = [f"line {row.line}: commit {row.commit} is not in the repository" for row in rows
                if night.full[row.commit] is None]
    notes = [note] if note else []
    for part in (audit_files, audit_keeps, audit_numbers):
        more, more_notes = part(night)
        findings += more
        notes += more_notes
    return findings, notes


@dataclass
class Night:
    """What the audit's parts share: the ledger's rows, the repository, the night's branch and its tip, each
    row's full commit hash (None when git does not know it) and the baseline (the first finished row)."""
    rows: list
    directory: str
    branch: str

    def __post_init__(self):
        self.tip = git(self.directory, "rev-parse", "--verify", "--quiet", f"{self.branch}^{{commit}}")
        self.full = {r.commit: git(self.directory, "rev-parse", "--verify", "--quiet", f"{r.commit}^{{commit}}")
                     for r in self.rows}
        self.baseline = next((r for r in self.rows if r.status != "crash" and self.full[r.commit]), None)


def audit_files(night):
    """Only train.py changed: the branch against the baseline, each keep against its parent (and what its diff
    adds), the working tree, and no untracked .py file beside train.py."""
    findings, notes = [], []
    directory, branch, full, baseline = night.directory, night.branch, night.full, night.baseline
    if baseline:
        changed = git(directory, "diff", "--name-only", full[baseline.commit], night.tip) or ""
        for name in sorted(set(changed.split()) - set(AGENT_FILES)):
            findings.append(f"{name}: changed since the baseline ({baseline.commit}) in {branch}")
        if branch == git(directory, "symbolic-ref", "--quiet", "--short", "HEAD"):
            for name in sorted(set((git(directory, "diff", "--name-only", "HEAD") or "").split()) - set(AGENT_FILES)):
                findings.append(f"{name}: changed in the working tree (not committed)")
        kept = {r.commit: r for r in night.rows if r.status == "keep" and full[r.commit] and
                full[r.commit] != full[baseline.commit]}
        for commit, row in kept.items():
            parent = f"{full[commit]}^"
            for name in sorted(set((git(directory, "diff", "--name-only", parent, full[commit]) or "").split())
                               - set(AGENT_FILES)):
                findings.append(f"line {row.line}: kept {commit} changes {name} (only {', '.join(AGENT_FILES)} may change)")
            signs, weak = kept_diff_signs(git(directory, "diff", parent, full[commit], "--", *AGENT_FILES) or "")
            findings += [f"line {row.line}: kept {commit} {sign}" for sign in signs]
            notes += [f"line {row.line}: kept {commit} {sign}" for sign in weak]
    tracked = set((git(directory, "ls-files") or "").splitlines())
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".py") and n not in tracked):
        findings.append(f"{name}: a .py file beside train.py that git does not track (train.py can import it; "
                        f"no commit records it)")
    return findings, notes


def audit_keeps(night):
    """The ratchet held, on means: keeps in the branch, the rest reset away, each keep better than the best
    before it, and one decision per commit."""
    findings, best = [], None
    for exp in experiments(night.rows):
        row = exp.rows[0]
        if night.full[exp.commit] is None:
            continue
        statuses = sorted({r.status for r in exp.rows})
        if len(statuses) > 1:
            findings.append(f"lines {', '.join(str(r.line) for r in exp.rows)}: {exp.commit}'s rows say "
                            f"{' and '.join(statuses)}; a commit's rows carry its one decision")
        in_branch = git(night.directory, "merge-base", "--is-ancestor", night.full[exp.commit], night.tip) is not None
        if exp.status == "keep" and not in_branch:
            findings.append(f"line {row.line}: kept commit {exp.commit} is not in {night.branch} (reset away?)")
        if exp.status != "keep" and in_branch:
            findings.append(f"line {row.line}: {exp.status} commit {exp.commit} is still in {night.branch} (not reset)")
        if exp.status == "keep" and exp.runs:
            if best is not None and exp.mean >= best:
                findings.append(f"line {row.line}: kept {exp.commit} at {exp.mean:.6f} (mean of {len(exp.runs)}) "
                                f"does not beat the best kept before it, {best:.6f}")
            best = exp.mean if best is None else min(best, exp.mean)
    return findings, []


def audit_numbers(night):
    """The numbers are the judge's: each finished row has a run of its own in judge.log, this night, judged once,
    with the baseline's settings, on one device, and evaluated soon enough after its training began."""
    findings, notes = [], []
    directory, rows, full, baseline = night.directory, night.rows, night.full, night.baseline
    judge_log = os.path.join(directory, JUDGE_LOG)
    finished = [r for r in rows if r.status != "crash" and full[r.commit]]
    if finished and not os.path.exists(judge_log):
        findings.append(f"{JUDGE_LOG}: missing beside the ledger, so no number can be checked "
                        f"(evaluate_bpb writes it in the directory train.py runs in)")
        return findings, notes
    start = night_start(directory, night.branch)
    runs = read_judge_log(judge_log) if finished else []
    if start is None and runs:
        notes.append(f"git does not know when {night.branch} was made: runs of earlier nights in {JUDGE_LOG} may count")
    runs = [run for run in runs if start is None or run.time >= start - 1]  # a night is its branch
    sha_of = {r.commit: train_sha256(directory, full[r.commit]) for r in finished}
    matched, unmatched = match_runs(finished, runs, sha_of)
    findings += unmatched
    expected = settings_of(git(directory, "show", f"{full[baseline.commit]}:prepare.py") or "") if baseline else {}
    rows_by_line = {r.line: r for r in rows}
    devices = {}
    digest = recorded_val_digest()
    if digest is None and matched:
        notes.append("prepare.py recorded no digest of the validation tokens beside the tokenizer (a cache prepared "
                     "before it did): `uv run prepare.py` records it; what each run scored was not checked against it")
    for line, run in matched.items():
        row, fields = rows_by_line[line], run.fields
        devices.setdefault(fields.get("device"), []).append(row.line)
        findings += run_findings(row, fields, runs, expected, digest)
    if len(devices) > 1:
        findings.append(f"{JUDGE_LOG}: the night ran on {len(devices)} devices, whose results do not compare: " +
                        "; ".join(f"{d} (lines {', '.join(map(str, ls))})" for d, ls in devices.items()))
    return findings, notes


def run_findings(row, fields, runs, expected, digest=None):
    """What the judge's line of one row's run shows: evaluated more than once, other settings than the
    baseline's, the judge's code or settings replaced in prepare, validation tokens other than those prepared
    (`digest`), the validation split read outside the evaluation, trained past the budget or untimed."""
    findings = []
    again = [other for other in runs if other.fields.get("run") == fields.get("run")]
    if len(again) > 1:
        findings.append(f"line {row.line}: {row.commit}'s run evaluated {len(again)} times ({JUDGE_LOG} lines "
                        f"{', '.join(str(r.line) for r in again)}): a run is judged once")
    other = {k: (fields.get(k), v) for k, v in expected.items() if fields.get(k) != v}
    if other:
        findings.append(f"line {row.line}: {row.commit} was judged with other settings than the baseline's "
                        f"prepare.py: " + ", ".join(f"{k} {got} (not {want})" for k, (got, want) in other.items()))
    if fields.get("replaced", "-") != "-":
        findings.append(f"line {row.line}: {row.commit}'s run replaced the judge's {fields['replaced']} in prepare "
                        f"(the judge put it back for the evaluation)")
    if digest is not None and fields.get("val_digest", "-") not in ("-", digest):
        findings.append(f"line {row.line}: {row.commit}'s run was scored on validation tokens with digest "
                        f"{fields['val_digest']}, not the {digest} prepare.py recorded (the validation shard or its "
                        f"token cache was changed?)")
    if fields.get("val_opened", "0") not in ("0", "-"):
        findings.append(f"line {row.line}: {row.commit}'s run read the validation split {fields['val_opened']} time(s) "
                        f"outside the evaluation (trained on the validation data?)")
    findings += timing_findings(row, fields, float(fields.get("TIME_BUDGET", expected.get("TIME_BUDGET", 300))))
    return findings


def timing_findings(row, fields, budget):
    """Trained past the budget, on the judge's own clock: the seconds from the training's start to the evaluation
    against the budget and the run's steps as the judge timed them; or a training the judge could not time."""
    if fields.get("training", "-") == "-":
        return [f"line {row.line}: {row.commit}'s training was not timed by the judge: no train loader of prepare's "
                f"handed out a second batch (trained on data of its own?)"]
    step, longest = (float(fields[key]) if fields.get(key, "-") != "-" else 0.0 for key in ("step_seconds", "longest_step"))
    allowed = budget * (1 + TIME_SLACK) + TIME_STEPS * step + longest + TIME_GRACE
    if float(fields["training"]) <= allowed:
        return []
    return [f"line {row.line}: {row.commit} was evaluated {float(fields['training']):.1f}s after its training began; a "
            f"{budget:g}s budget and its {fields.get('steps', 0)} steps (median {step:.3f}s, longest {longest:.3f}s, "
            f"on the judge's clock) allow {allowed:.1f}s (trained past the budget?)"]


def train_sha256(directory, commit):
    """sha256 of train.py as committed, what the judge logs for a run of that commit."""
    source = subprocess.run(["git", "show", f"{commit}:train.py"], cwd=directory, capture_output=True)
    return hashlib.sha256(source.stdout).hexdigest() if source.returncode == 0 else None

# ---------------------------------------------------------------------------
# progress.png
# ---------------------------------------------------------------------------

def plot_progress(rows, path):
    """The chart: finished experiments in order, every run a point (discarded grey, kept green), kept ones
    labelled, and the running best of the kept means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    exps = experiments(rows)
    finished = [e for e in exps if e.runs]
    points = {status: [(i, v) for i, e in enumerate(finished) if e.status == status for v in e.runs]
              for status in ("discard", "keep")}
    kept_x = [i for i, e in enumerate(finished) if e.status == "keep"]
    improvements = len([e for e, gain in chain_of_keeps(exps) if gain is not None])
    fig, ax = plt.subplots(figsize=(16, 8))
    ax.scatter([i for i, _ in points["discard"]], [v for _, v in points["discard"]],
               s=12, color="#bbbbbb", alpha=0.5, label="discarded", zorder=2)
    ax.scatter([i for i, _ in points["keep"]], [v for _, v in points["keep"]], s=50, color="#2ca02c",
               edgecolors="black", linewidths=0.5, label="kept", zorder=3)
    if kept_x:
        best, running = [], float("inf")
        for i in range(kept_x[0], len(finished)):
            if finished[i].status == "keep":
                running = min(running, finished[i].mean)
            best.append(running)
        ax.step(range(kept_x[0], len(finished)), best, where="post", color="#2ca02c", linewidth=1.5,
                label="running best (mean)", zorder=1)
        for i in kept_x:
            text = finished[i].description
            text = text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 3] + "..."
            ax.annotate(text, (i, finished[i].mean), xytext=(4, 6), textcoords="offset points", fontsize=7,
                        rotation=30, color="#1a6b1a")
        low, high = min(v for _, v in points["keep"]), max(finished[0].runs)  # every kept run, the baseline's
        span = (high - low) or 0.01 * high or 0.01
        ax.set_ylim(low - 0.15 * span, max(high, low) + 0.15 * span)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Experiment #")
    ax.set_ylabel("Validation BPB (lower is better)")
    ax.set_title(f"Autoresearch Progress: {len(exps)} Experiments, {improvements} Kept Improvements")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return fig

# ---------------------------------------------------------------------------
# The decision on one commit (--decide): keep, discard or run again
# ---------------------------------------------------------------------------

def decide_commit(ledger, commit="HEAD", branch=None):
    """(exit status, one line): the decision on `commit` from its runs in judge.log this night (what the judge
    wrote) against the best kept commit's runs and the noise floor in results.tsv."""
    directory = os.path.dirname(os.path.abspath(ledger))
    rows, _ = read_ledger(ledger)
    full = git(directory, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if full is None:
        return 2, f"error: {commit} is not a commit of {directory}"
    short, sha = full[:7], train_sha256(directory, full)
    branch, _ = find_branch(rows, directory, branch)
    start = night_start(directory, branch)
    judge_log = os.path.join(directory, JUDGE_LOG)
    runs = [run for run in (read_judge_log(judge_log) if os.path.exists(judge_log) else [])
            if run.sha256 == sha and (start is None or run.time >= start - 1)]
    if not runs:
        return 2, (f"error: no finished run of {short}'s train.py in {JUDGE_LOG} tonight: run it first "
                   f"(`uv run train.py > run.log 2>&1`); a run that crashed is logged as a crash, not decided")
    values = [float(run.val_bpb) for run in runs]
    runs_text = f"{short} runs {' '.join(f'{v:.6f}' for v in values)} (mean {statistics.fmean(values):.6f})"
    others = [e for e in experiments(rows) if not full.startswith(e.commit)]
    sigma, df = noise_floor([e.runs for e in others] + [values])
    floor = (f"noise floor {sigma:.6f} ({df} df)" if sigma is not None else "noise floor unknown") + (
        f", taken as {MIN_NOISE:.6f}" if (sigma or 0) < MIN_NOISE else "")
    chain = chain_of_keeps(others)
    if not chain:  # nothing finished before it: the baseline, run twice to measure the night's noise
        if len(values) < 2:
            return 0, f"rerun: {runs_text}: the baseline; run it again, the pair measures the night's noise"
        return 0, f"keep: {runs_text}: the baseline; {floor}"
    best = min((e for e, _ in chain), key=lambda e: e.mean)
    decision, gain, margin = decide(values, best.runs, sigma, df)
    best_text = f"best {best.commit} runs {' '.join(f'{v:.6f}' for v in best.runs)} (mean {best.mean:.6f})"
    if gain <= 0:
        why = f"gain {gain:+.6f}: not lower than the best"
    else:
        why = (f"gain {gain:+.6f} {'>=' if gain >= margin else '<'} margin {margin:.6f} "
               f"{'to keep at once' if len(values) == 1 else 'to confirm'}")
    then = "; run it again, then decide again" if decision == "rerun" else ""
    return 0, f"{decision}: {runs_text}, {best_text}: {why}; {floor}{then}"

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="The morning report on a night of experiments, with an audit.")
    parser.add_argument("ledger", nargs="?", default="results.tsv", help="the ledger (default ./results.tsv)")
    parser.add_argument("--no-plot", action="store_true", help="do not write progress.png")
    parser.add_argument("--branch", help="the night's branch (default: the one holding the kept commits)")
    parser.add_argument("--decide", nargs="?", const="HEAD", metavar="COMMIT",
                        help="keep, discard or rerun for HEAD (or COMMIT), from its runs in judge.log, and why")
    parser.add_argument("--json", action="store_true", help="the whole report as one JSON object")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ledger):
        sys.exit(f"error: no ledger at {args.ledger}; the agent creates results.tsv at setup (see program.md), "
                 f"or pass its path")
    directory = os.path.dirname(os.path.abspath(args.ledger))
    if args.decide:
        status, line = decide_commit(args.ledger, args.decide, args.branch)
        print(line, file=sys.stderr if status else sys.stdout)
        return status
    rows, problems = read_ledger(args.ledger)
    chart = None
    if not args.no_plot and rows:
        chart = os.path.join(directory, "progress.png")
        plot_progress(rows, chart)
    branch, note = find_branch(rows, directory, args.branch) if git(directory, "rev-parse", "--git-dir") else (None, None)
    findings, notes = audit(rows, directory, branch)
    findings, notes = problems + findings, ([note] if note else []) + notes
    if args.json:
        print(json.dumps(dict(summarize(rows), branch=branch, chart=chart, findings=findings, notes=notes), indent=1))
        return 1 if findings else 0
    print("\n".join(report(rows)))
    if chart:
        print(f"\nChart: {chart}")
    clean = " (a clean night)" if not findings and not notes else ""
    print(f"\nAudit{f' of {branch}' if branch else ''}: {len(findings)} finding{'s' * (len(findings) != 1)}{clean}")
    for line in findings + [f"note: {n}" for n in notes]:
        print(f"  {line}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
