"""analysis.py, the morning report: figures, hand-written ledgers, progress.png, and the audit of a night.

The report's figures are checked to the digit on a ledger written here. Every ledger an agent writes by hand
must go through: header only, a crash first, no keep, blank lines, CRLF, a row with the wrong number of
fields or a non-numeric value (named by line number, skipped, the rest reported), descriptions with spaces,
quotes and commas. The chart is checked from the figure's own data (points, running best, title, y range),
not only for a file. The audit runs on the scripted night of tests/conftest.py (real tiny runs in a git
repository, judge.log written by evaluate_bpb): the clean night exits 0, and each finding is planted once,
on a copy, and caught: an edited prepare.py, a discarded commit left in history, a kept commit reset away,
a hand-typed val_bpb, a row whose commit never ran.

    uv run pytest tests/test_analysis.py
"""

import os
import shutil
import subprocess
import sys

import matplotlib.image
import pytest

import analysis

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
LEDGER = [  # a night with known figures
    "a000001\t1.000000\t44.0\tkeep\tbaseline",
    "a000002\t0.990000\t44.2\tkeep\tMATRIX_LR 0.04 -> 0.05",
    "a000003\t1.004200\t44.0\tdiscard\tGELU instead of relu^2",
    "a000004\t0.000000\t0.0\tcrash\tDEPTH 16 (out of memory)",
    "a000005\t0.960000\t45.1\tkeep\twarmdown 0.5 -> 0.7, \"cosine\"",
    "a000006\t0.975000\t44.0\tdiscard\tseed 137",
    "a000007\t0.955000\t46.0\tkeep\tx0 lambdas at 0.2",
]


def write(tmp_path, lines, newline="\n", name="results.tsv"):
    path = tmp_path / name
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return str(path)


def run_report(path, *args):
    """analysis.py as the user runs it: (exit status, stdout)."""
    result = subprocess.run([sys.executable, analysis.__file__, path, *args], capture_output=True, text=True,
                            timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def test_the_report_gives_exact_figures(tmp_path):
    status, out = run_report(write(tmp_path, [HEADER] + LEDGER), "--no-plot")
    lines = out.splitlines()
    assert lines[0] == "Experiments: 7 (4 kept, 2 discarded, 1 crashed); keep rate 67% of the 6 that finished"
    assert lines[1] == "Baseline:    1.000000  (a000001, baseline)"
    assert lines[2] == "Best:        0.955000  (a000007, x0 lambdas at 0.2)"
    assert lines[3] == "Improvement: 0.045000 (4.50%)"
    chain = lines[lines.index("Kept, in order:") + 2:][:4]
    assert [line.split()[:3] for line in chain] == [["a000001", "1.000000", "baseline"],
                                                    ["a000002", "0.990000", "+0.010000"],
                                                    ["a000005", "0.960000", "+0.030000"],
                                                    ["a000007", "0.955000", "+0.005000"]]
    assert chain[2].endswith("45.1GB  warmdown 0.5 -> 0.7, \"cosine\"")  # commas and quotes kept as written
    gains = lines[lines.index("Largest gains (of 3):") + 1:][:3]
    assert [g.split()[:2] for g in gains] == [["+0.030000", "a000005"], ["+0.010000", "a000002"],
                                              ["+0.005000", "a000007"]]
    assert "Crashes (1):" in lines and "  a000004  DEPTH 16 (out of memory)" in lines
    assert status == 0 or "not a git repository" in out  # tmp_path has no git: the audit says so


@pytest.mark.parametrize("case", ["header only", "crash first", "no keep", "blank lines", "crlf", "cr"])
def test_ledgers_written_by_hand_are_read(tmp_path, case):
    lines = {
        "header only": [HEADER],
        "crash first": [HEADER, "c000001\t0.000000\t0.0\tcrash\tbroken baseline"] + LEDGER,
        "no keep": [HEADER, "d000001\t1.010000\t44.0\tdiscard\tfirst try", "d000002\t1.020000\t44.0\tdiscard\tsecond"],
        "blank lines": [HEADER, ""] + LEDGER[:3] + ["", "   "] + LEDGER[3:] + [""],
        "crlf": [HEADER] + LEDGER,
        "cr": [HEADER] + LEDGER,
    }[case]
    newline = {"crlf": "\r\n", "cr": "\r"}.get(case, "\n")
    path = write(tmp_path, lines, newline)
    status, out = run_report(path)
    first = out.splitlines()[0]
    if case == "header only":
        assert first.startswith("Experiments: 0 (0 kept, 0 discarded, 0 crashed); keep rate n/a")
        assert not os.path.exists(tmp_path / "progress.png")
    elif case == "no keep":
        assert first.startswith("Experiments: 2 (0 kept, 2 discarded, 0 crashed); keep rate 0%")
        assert "Baseline:    1.010000  (d000001, first try)" in out and "Best:        nothing kept yet" in out
    else:
        crashes = 2 if case == "crash first" else 1
        assert first.startswith(f"Experiments: {6 + crashes} (4 kept, 2 discarded, {crashes} crashed)")
        assert "Baseline:    1.000000  (a000001, baseline)" in out  # the first row that finished, for both
        assert "Improvement: 0.045000 (4.50%)" in out
    if case != "header only":
        assert matplotlib.image.imread(tmp_path / "progress.png").shape[:2] == (1200, 2400)  # 16 x 8 in at 150 dpi
    assert "Audit: 0 findings" in out


def test_bad_rows_are_named_by_line_skipped_and_the_rest_reported(tmp_path):
    lines = [HEADER] + LEDGER[:2] + ["b000009\t0.98\t44.0\tkeep"] + LEDGER[2:4] + \
        ["b000010\tabout 0.97\t44.0\tkeep\thand-typed", "b000011\t0.970000\t44.0\tkept\ttypo in status"] + LEDGER[4:]
    status, out = run_report(write(tmp_path, lines), "--no-plot")
    assert status == 1
    assert "Experiments: 7 (4 kept, 2 discarded, 1 crashed)" in out  # the seven good rows
    assert "  line 4: 4 tab-separated fields instead of 5; skipped" in out
    assert "  line 7: val_bpb 'about 0.97' or memory_gb '44.0' is not a number; skipped" in out
    assert "  line 8: status 'kept' is not one of keep, discard, crash; skipped" in out


def test_a_missing_ledger_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, analysis.__file__, str(tmp_path / "results.tsv")], capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().startswith("error: no ledger at ") and "\n" not in result.stderr.strip()


# --- progress.png, from the figure's data ---------------------------------------------------------------

def test_the_chart_plots_every_finished_run_and_the_running_best(tmp_path):
    rows, _ = analysis.read_ledger(write(tmp_path, [HEADER, "c000000\t0.000000\t0.0\tcrash\tfirst crash"] + LEDGER))
    fig = analysis.plot_progress(rows, str(tmp_path / "progress.png"))
    ax = fig.axes[0]
    discarded, kept = (c.get_offsets().tolist() for c in ax.collections)
    # crashes left out: x counts the finished runs only, from 0
    assert discarded == [[2, 1.0042], [4, 0.975]]
    assert kept == [[0, 1.0], [1, 0.99], [3, 0.96], [5, 0.955]]
    (step,) = [line for line in ax.get_lines() if line.get_label() == "running best"]
    assert step.get_drawstyle() == "steps-post"
    assert list(step.get_xdata()) == [0, 1, 2, 3, 4, 5]
    assert list(step.get_ydata()) == [1.0, 0.99, 0.99, 0.96, 0.96, 0.955]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["baseline", "MATRIX_LR 0.04 -> 0.05", 'warmdown 0.5 -> 0.7, "cosine"', "x0 lambdas at 0.2"]
    assert ax.get_title() == "Autoresearch Progress: 8 Experiments, 3 Kept Improvements"
    low, high = ax.get_ylim()
    assert low == pytest.approx(0.955 - 0.15 * 0.045) and high == pytest.approx(1.0 + 0.15 * 0.045)
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_long_descriptions_are_shortened_on_the_chart(tmp_path):
    long = "a very long description of an idea that goes on and on for quite a while"
    rows, _ = analysis.read_ledger(write(tmp_path, [HEADER, f"e000001\t1.000000\t1.0\tkeep\t{long}"]))
    fig = analysis.plot_progress(rows, str(tmp_path / "progress.png"))
    (label,) = [t.get_text() for t in fig.axes[0].texts]
    assert len(label) == analysis.LABEL_CHARS and label == long[:analysis.LABEL_CHARS - 3] + "..."

# --- the audit of a real night ------------------------------------------------------------------------------

@pytest.fixture
def copy_night(night, tmp_path):
    """The scripted night's project (git repository, results.tsv, judge.log), copied: free to damage."""
    agent, runs, _ = night
    project = tmp_path / "autoresearch"
    shutil.copytree(agent.project, project)
    return project, runs


def git(project, *args):
    return subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True).stdout.strip()


def ledger_lines(project):
    return (project / "results.tsv").read_text().splitlines()


def test_a_clean_night_reports_its_real_figures_and_exits_0(copy_night):
    project, runs = copy_night
    judge = (project / "judge.log").read_text().splitlines()
    assert len(judge) == 2  # the baseline and the worse idea were evaluated; the crashes never were
    status, out = run_report(str(project / "results.tsv"))
    assert status == 0, out
    baseline, worse = runs["baseline"][1], runs["worse"][1]
    assert out.splitlines()[0] == "Experiments: 4 (1 kept, 1 discarded, 2 crashed); keep rate 50% of the 2 that finished"
    assert f"Baseline:    {baseline:.6f}" in out and f"Best:        {baseline:.6f}" in out
    assert "Improvement: 0.000000 (0.00%)" in out
    assert "Audit: 0 findings (a clean night)" in out
    assert os.path.exists(project / "progress.png")


def plant(project, what):
    """Damage the copied night in one way."""
    lines = ledger_lines(project)
    if what == "edited prepare.py":
        (project / "prepare.py").write_text((project / "prepare.py").read_text().replace("TIME_BUDGET = 5", "TIME_BUDGET = 6"))
        git(project, "commit", "-qam", "a longer budget")
    elif what == "discarded commit left in history":
        lines[1] = lines[1].replace("\tkeep\t", "\tdiscard\t")  # the baseline's commit is in the branch
    elif what == "kept commit reset away":
        lines[2] = lines[2].replace("\tdiscard\t", "\tkeep\t")  # the worse idea was reset
    elif what == "hand-typed val_bpb":
        fields = lines[1].split("\t")
        lines[1] = "\t".join([fields[0], f"{float(fields[1]) - 0.01:.6f}"] + fields[2:])
    elif what == "commit never run":
        (project / "train.py").write_text((project / "train.py").read_text() + "\n# an idea never run\n")
        git(project, "commit", "-qam", "never run")
        commit = git(project, "rev-parse", "--short=7", "HEAD")
        git(project, "reset", "-q", "--hard", "HEAD~1")
        lines.append(f"{commit}\t0.500000\t0.0\tdiscard\tan idea never run")
    (project / "results.tsv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("what,expected", [
    ("edited prepare.py", "prepare.py: changed since the baseline ({baseline}) at HEAD"),
    ("discarded commit left in history", "line 2: discard commit {baseline} is still in the branch (not reset)"),
    ("kept commit reset away", "line 3: kept commit {worse} is not in the branch (reset away?)"),
    ("hand-typed val_bpb", "line 2: val_bpb {typed} of {baseline} is not a number the judge wrote for it ({real})"),
    ("commit never run", "line 6: {new} has no evaluation in judge.log (was it run?)"),
])
def test_each_planted_finding_is_caught(copy_night, what, expected):
    project, runs = copy_night
    before = [line.split("\t") for line in ledger_lines(project)[1:]]
    plant(project, what)
    after = [line.split("\t") for line in ledger_lines(project)[1:]]
    status, out = run_report(str(project / "results.tsv"), "--no-plot")
    expected = expected.format(baseline=before[0][0], worse=before[1][0], typed=after[0][1], real=before[0][1],
                               new=after[-1][0])
    assert status == 1
    assert f"  {expected}\n" in out, out


def test_a_night_without_the_judges_log_cannot_be_trusted(copy_night):
    project, _ = copy_night
    os.remove(project / "judge.log")
    status, out = run_report(str(project / "results.tsv"), "--no-plot")
    assert status == 1 and "  judge.log: missing beside the ledger" in out
