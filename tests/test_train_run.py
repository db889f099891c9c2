"""train.py end to end, the way the agent runs it: `uv run train.py > run.log 2>&1` in a copy of the project
whose UPPER_CASE constants are edited down (depth 2, width 64, sequence 64, a 1-second budget), on tiny shards.
The runs are the scripted night's (tests/conftest.py), each run.log kept: its first baseline run and its
NaN-producing edit.

Checks the summary block to the character (keys, order, column 19, number formats), val_bpb below what a
uniform predictor scores on the same validation tokens, training_seconds against the budget, the fast
fail on a NaN-producing edit, and the one-line start-up errors.

    uv run pytest tests/test_train_run.py
"""

import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import prepare
from helpers import ROOT, TINY_PREPARE, TINY_TRAIN, finish_train, judge_settings, make_project, parameters_M, parse_summary, \
    progress_lines, require, set_constants, start_train, UniformModel


def night_run(night, description):
    """(exit status, run.log) of the scripted night's first run of an experiment (conftest.py): the agent's
    own command on the tiny project."""
    agent, _, _ = night
    return next((status, log) for name, status, log in agent.logs if name == description)


@pytest.fixture(scope="module")
def baseline(night):
    return night_run(night, "baseline")


def test_summary_block_keys_order_spacing_and_formats(baseline):
    status, log = baseline
    assert status == 0, log[-3000:]
    summary = parse_summary(log)
    steps = int(summary["num_steps"])
    assert steps > 11
    assert summary["total_tokens_M"] == f"{steps * 2 * 2 * 64 / 1e6:.1f}"
    assert summary["depth"] == TINY_TRAIN["DEPTH"] and summary["num_params_M"] == parameters_M(
        int(TINY_TRAIN["DEPTH"]), TINY_TRAIN["ASPECT_RATIO"], TINY_TRAIN["HEAD_DIM"])
    if not torch.cuda.is_available():
        assert summary["peak_vram_mb"] == "0.0" and summary["mfu_percent"] == "n/a"
    assert float(summary["total_seconds"]) > float(summary["training_seconds"])


def test_counted_steps_and_training_seconds_match_the_progress_lines(baseline):
    """Steps 0-10 absorb compilation: uncounted. From step 11 each dt counts, until the budget is reached."""
    summary = parse_summary(baseline[1])
    lines = progress_lines(baseline[1])
    n = int(summary["num_steps"])
    assert [step for step, *_ in lines] == list(range(n))  # one progress line per step, num_steps of them
    budget = float(TINY_PREPARE["TIME_BUDGET"])
    dts = [dt for _, _, dt, _ in lines]
    rounding = 0.0005 * n  # each dt is printed to the millisecond
    counted = sum(dts[11:])
    assert abs(float(summary["training_seconds"]) - counted) <= 0.05 + rounding
    assert sum(dts[11:-1]) < budget + rounding and counted >= budget - rounding  # stopped at the first step past it
    for step, pct, _, _ in lines:
        assert abs(pct - 100 * sum(dts[11:step]) / budget) <= 0.05 + 100 * rounding / budget, step
    assert all(pct == 0.0 for step, pct, _, _ in lines[:12])


def test_val_bpb_is_finite_and_beats_uniform_prediction(baseline, use_cache, tokenizer, monkeypatch):
    judge_settings(monkeypatch, MAX_SEQ_LEN=64, EVAL_TOKENS=4 * 8 * 64)
    uniform = prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=2)  # the run evaluates these tokens
    val_bpb = float(parse_summary(baseline[1])["val_bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < 0.9 * uniform


def test_progress_and_startup_lines(baseline):
    log = baseline[1]
    assert log.startswith("Attention: PyTorch attention") or log.startswith("Attention: Flash Attention 3")
    assert "because no CUDA device" in log or torch.cuda.is_available()
    progress = [p for p in log.split("\r") if p.startswith("step ")]
    budget = TINY_PREPARE["TIME_BUDGET"]
    assert re.match(r"step 00000 \(0\.0%\) \| loss: \d+\.\d{6} \| lrm: 1\.00 \| dt: \d+ms \| tok/sec: [\d,]+ \| "
                    rf"mfu: (n/a|\d+\.\d%) \| epoch: 1 \| remaining: {budget}s", progress[0]), progress[0]


def test_nan_producing_edit_prints_fail_and_exits_1(night):
    status, log = night_run(night, "MATRIX_LR 1e30")
    assert status == 1
    assert log.rstrip().endswith("FAIL") and "\n---\n" not in log
    assert len(re.findall(r"step \d{5}", log)) <= 3  # within a few steps


STARTUP_CASES = ["no cache", "no data", "batch size"]


@pytest.fixture(scope="module")
def startup_runs(tiny_cache, tmp_path_factory):
    """Each start-up error's run, all started at once (they spend their time importing): {case: (status, log)}."""
    started = {}
    for case in STARTUP_CASES:
        tmp_path = tmp_path_factory.mktemp("startup")
        project = make_project(tmp_path / "project")
        cache = tmp_path / "empty"
        if case == "no data":
            os.makedirs(cache)
            os.symlink(tiny_cache.tokenizer_dir, cache / "tokenizer")
        elif case == "batch size":
            cache = tiny_cache.dir
            set_constants(os.path.join(project, "train.py"), DEVICE_BATCH_SIZE="3")
        started[case] = (start_train(project, cache), project)
    return {case: finish_train(run, project) for case, (run, project) in started.items()}


@pytest.mark.parametrize("case", STARTUP_CASES)
def test_startup_errors_are_one_line(case, startup_runs):
    status, log = startup_runs[case]
    assert status == 1
    last = log.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in log, log
    expected = {
        "no cache": "error: no tokenizer at",
        "no data": "error: no train shards in",
        "batch size": "error: TOTAL_BATCH_SIZE = 256 is not a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN = 3 * 64; "
                      "set DEVICE_BATCH_SIZE to one of [1, 2, 4] or TOTAL_BATCH_SIZE to a multiple of 192",
    }[case]
    assert last.startswith(expected), last
    if case != "batch size":
        assert last.endswith("run `uv run prepare.py` first")


def test_a_run_past_its_limit_is_ended_by_the_judges_watchdog(tiny_cache, tmp_path):
    """program.md's 10 minutes, held without the agent: prepare.py's watchdog ends a run of train.py at RUN_LIMIT
    (1 s here, a 60 s budget) with one line in run.log, and `uv run` passes the run's end on (SIGTERM: 143)."""
    project = make_project(tmp_path / "project", dict(TINY_PREPARE, TIME_BUDGET="60", RUN_LIMIT="1"))
    env = dict(os.environ, AUTORESEARCH_CACHE_DIR=str(tiny_cache.dir), UV_NO_SYNC="1", UV_FROZEN="1",
               UV_PROJECT_ENVIRONMENT=sys.prefix)
    t0 = time.monotonic()
    result = subprocess.run(f"{require('uv')} run train.py > run.log 2>&1", shell=True, cwd=project, env=env,
                            timeout=120)
    seconds = time.monotonic() - t0
    with open(os.path.join(project, "run.log")) as f:
        log = f.read()
    assert result.returncode == 143 and seconds < 30, log[-2000:]
    assert log.endswith("\nerror: this run passed 1 s, the limit of a run (program.md): the judge's watchdog ended "
                        "it; log it as a crash\n"), log[-2000:]
    assert "val_bpb:" not in log  # no number: a crash


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the children from /proc (Linux)")
def test_only_a_run_of_train_py_has_a_watchdog():
    """Imported by anything else (these tests, analysis, tools), prepare.py starts none."""
    code = ("import os, prepare\n"
            "stat = lambda pid: open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()\n"
            "children = [p for p in os.listdir('/proc') if p.isdigit() and os.path.exists(f'/proc/{p}/stat')\n"
            "            and stat(p)[1] == str(os.getpid())]\n"
            "print(len(children), prepare.RUN_LIMIT)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["0", "600"], result.stderr


def test_the_judge_records_the_precision_the_run_trained_in(night, baseline):
    """The evaluation runs under train.py's autocast: judge.log's precision is the one the run's first lines name."""
    agent, runs, _ = night
    precision = re.search(r"^Precision: (bf16|float16|float32)\b", baseline[1], flags=re.M).group(1)
    with open(os.path.join(agent.project, "judge.log")) as f:
        first = dict(field.split("=", 1) for field in f.readline().rstrip("\n").split("\t")[4:])
    assert first["precision"] == {"bf16": "bfloat16"}.get(precision, precision)
