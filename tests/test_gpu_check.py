"""tools/gpu_check.py, the one command for whoever holds a GPU, on the CPU: what needs no GPU.

The plan (--dry-run, steps done and to run), a train.py log read into figures to the digit, the defaults step
run for real on the tiny project (in a temporary copy: the project gets no judge.log or run.log), the 24 GB
step's CPU branch (skipped, and said so), the attention step at tiny shapes (each backend this CPU has against
the naive reference, timed), the tests step's counts, and the markdown report from known figures.

    uv run pytest tests/test_gpu_check.py
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from tools import gpu_check
from helpers import ROOT, TINY_PREPARE, make_project

LOG = "".join([
    "Attention: PyTorch attention (SDPA; FlexAttention windows when compiled), because no CUDA device\n",
    "DEVICE_BATCH_SIZE 128 does not fit in 25.8 GB: using 32, 8 accumulation steps\n",
    "Memory fit: micro-batch 32, 3 sizes probed in 95.5s, 3 compiled graphs (recompile limit 10)\n",
    "V1201 12:00:01.000000 4242 torch/_dynamo/guards.py:3002] [0/1] [__recompiles] Recompiling function forward in "
    "/tmp/gpu-check-small-x1/train.py:288\n" * 3,
    "V1201 12:00:02.000000 4242 torch/_dynamo/guards.py:3002] [1/1] [__recompiles] Recompiling function adamw_step in "
    "/tmp/gpu-check-small-x1/train.py:250\n" * 5,  # the optimizer's steps, per parameter shape: not the model's
    *[f"\rstep {i:05d} (0.0%) | loss: 9.000000 | lrm: 1.00 | dt: {dt}ms | tok/sec: {tps:,} | mfu: 30.0% | epoch: 1 | "
      f"remaining: 300s    " for i, dt, tps in [(0, 20000, 26214), (1, 400, 1310720)] + [(i, 400, 1310720) for i in
                                                                                       range(2, 11)]
      + [(11, 300, 1747626), (12, 350, 1497965), (13, 340, 1542023)]],
    "\n---\nval_bpb:          1.135440\ntraining_seconds: 300.2\ntotal_seconds:    323.0\npeak_vram_mb:     "
    "45059.2\nmfu_percent:      37.26\ntotal_tokens_M:   468.7\nnum_steps:        894\nnum_params_M:     50.3\n"
    "depth:            8\n",
])


def test_a_log_is_read_into_figures():
    figures = gpu_check.parse_run(LOG)
    assert figures["summary"]["val_bpb"] == "1.135440" and figures["summary"]["num_steps"] == "894"
    assert list(figures["summary"]) == ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb",
                                        "mfu_percent", "total_tokens_M", "num_steps", "num_params_M", "depth"]
    assert figures["attention"].startswith("PyTorch attention") and figures["shrunk"].startswith("DEVICE_BATCH_SIZE")
    assert figures["fit"] == dict(micro_batch=32, sizes_probed=3, seconds=95.5, graphs=3, recompile_limit=10)
    assert figures["recompiles"] == 3 and figures["steps"] == 14
    assert figures["step_seconds_median"] == 0.34  # steps 11, 12, 13 are counted: 0.30, 0.35, 0.34
    assert figures["tokens_per_second_median"] == 1542023
    assert figures["tokens_per_second_mean"] == round((1747626 + 1497965 + 1542023) / 3)
    # the fit, plus the first 11 steps beyond 11 counted steps: 95.5 + (20 + 10 * 0.4) - 11 * 0.34
    assert figures["compile_seconds"] == round(95.5 + 24.0 - 11 * 0.34, 1)


def test_a_log_without_compilation_or_summary():
    figures = gpu_check.parse_run("Memory fit: micro-batch 1, 1 size probed in 0.2s\nTraceback (most recent...\n")
    assert figures["fit"] == dict(micro_batch=1, sizes_probed=1, seconds=0.2, graphs=None, recompile_limit=None)
    assert figures["summary"] == {} and figures["steps"] == 0 and "compile_seconds" not in figures


def test_the_plan_names_every_step_and_what_is_done(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in plan[1:len(gpu_check.STEPS) + 1]] == [[name, "to"] for name in gpu_check.STEPS]
    (tmp_path / "defaults.json").write_text("{}")
    gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    plan = capsys.readouterr().out.splitlines()
    assert plan[2].split()[:2] == ["defaults", "done"] and plan[3].split()[:2] == ["small", "to"]
    assert plan[-1] == "about 15 minutes of GPU time; one step per call: --step NAME"  # 2 + 7 + 3 + 3 + 0
    assert not (tmp_path / "report.md").exists()


def test_the_defaults_step_runs_train_py_in_a_temporary_copy(tiny_cache, tmp_path, monkeypatch):
    project, out = make_project(tmp_path / "project", dict(TINY_PREPARE, TIME_BUDGET="0.01")), tmp_path / "out"
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tiny_cache.dir))
    assert gpu_check.main(["--step", "defaults", "--project", str(project), "--out", str(out)]) == 0
    figures = json.loads((out / "defaults.json").read_text())
    assert figures["status"] == 0 and figures["cuda"] == torch.cuda.is_available()
    assert figures["steps"] == int(figures["summary"]["num_steps"]) > 11
    assert figures["fit"]["micro_batch"] == 2 and figures["tokens_per_second_median"] > 0
    assert figures["environment"]["torch"] == torch.__version__
    assert (out / "defaults.log").read_text().startswith("Attention: ")
    assert not {"judge.log", "run.log"} & set(os.listdir(project))  # the run had a directory of its own
    report = (out / "report.md").read_text()
    assert "## The defaults, full budget" in report and f"val_bpb:          {figures['summary']['val_bpb']}" in report
    assert "Not run yet: tests, small, attention, float16." in report
    assert f"Precision: {figures['precision']}" in report and figures["precision"] in ("bf16", "float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU branch")
def test_the_small_card_step_without_cuda_says_it_was_skipped(tmp_path):
    assert gpu_check.main(["--step", "small", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "small.json").read_text())["skipped"].startswith("no CUDA device")
    report = (tmp_path / "report.md").read_text()
    assert "## Under a 24 GB limit\n\nSkipped: no CUDA device: a per-process memory fraction needs one.\n" in report


WITHOUT_PYTEST = """
import sys
sys.modules["pytest"] = None  # import pytest fails, as on a GPU machine with torch and nothing else
sys.path.insert(0, sys.argv[1])
from tools import gpu_check
sys.exit(gpu_check.main(["--step", "attention", "--out", sys.argv[2]]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU branch")
def test_the_attention_step_checks_and_times_each_backend_this_cpu_has_without_pytest(tmp_path):
    result = subprocess.run([sys.executable, "-c", WITHOUT_PYTEST, ROOT, str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads((tmp_path / "attention.json").read_text())
    rows = {(r["backend"], r["layers"]): r for r in figures["backends"]}
    assert figures["device"] == "cpu" and figures["attention"].endswith("because no CUDA device")
    for key in [("SDPA math", "full"), ("SDPA flash", "full"), ("fallback, eager (dense mask)", "window")]:
        row = rows[key]
        assert row["matches_reference"] and row["max_error"] < 1e-4 and row["ms"] > 0 and row["tflops"] > 0, row
        assert row["shape"] == [2, 256, 2, 64] and row["window"] == (256 if key[1] == "full" else 128)
    assert "unavailable" in rows[("SDPA cuDNN", "full")]  # no cuDNN on a CPU: named, not fatal


def test_the_reference_check_is_relative_as_well():
    """Near 8 (a value gradient at T=2048) one bf16 step is 0.03: an error of 0.1 there passes, near 0 it does not."""
    ref = torch.tensor([8.0, 0.01])
    assert gpu_check.close_enough(torch.tensor([8.1, 0.01]), ref, gpu_check.CHECK_ATOL, gpu_check.CHECK_RTOL)
    assert not gpu_check.close_enough(torch.tensor([8.0, 0.11]), ref, gpu_check.CHECK_ATOL, gpu_check.CHECK_RTOL)
    assert not gpu_check.close_enough(torch.tensor([8.1, 0.01]), ref, gpu_check.CHECK_ATOL, 0)  # absolute only


def test_the_tests_step_counts_what_pytest_says(tmp_path, monkeypatch):
    test_file = tmp_path / "test_three.py"
    test_file.write_text(textwrap.dedent("""\
        import pytest
        def test_passes(): pass
        def test_fails(): assert 1 == 2
        @pytest.mark.skip(reason="needs a GPU")
        def test_skipped(): pass
        """))
    monkeypatch.setattr(gpu_check, "TEST_FILES", [str(test_file)])
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)  # the project's pytest options, xdist's included
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:xdist")  # as on a GPU machine without pytest-xdist
    figures = gpu_check.step_tests(SimpleNamespace())
    assert (figures["passed"], figures["failed"], figures["skipped"], figures["errors"]) == (1, 1, 1, 0)
    assert figures["status"] == 1 and any("assert 1 == 2" in line for line in figures["tail"])
    assert figures["not_run"] == [["test_three.py::test_skipped", "needs a GPU"]]  # by name, with its reason


def test_tests_that_outlast_the_step_are_reported_not_fatal(tmp_path, monkeypatch):
    test_file = tmp_path / "test_slow.py"
    test_file.write_text("import time\ndef test_sleeps():\n    print('started', flush=True)\n    time.sleep(60)\n")
    monkeypatch.setattr(gpu_check, "TEST_FILES", [str(test_file), "-s", "-p", "no:xdist"])
    monkeypatch.setattr(gpu_check, "STEP_TIMEOUT", 3)
    assert gpu_check.main(["--step", "tests", "--out", str(tmp_path / "out")]) == 0
    figures = json.loads((tmp_path / "out" / "tests.json").read_text())
    assert figures["status"] == "timed out" and figures["passed"] == 0 and "started" in "\n".join(figures["tail"])
    assert "(exit status timed out)" in (tmp_path / "out" / "report.md").read_text()


def test_the_report_from_known_figures(tmp_path):
    env = dict(device="NVIDIA H100 80GB HBM3", memory_gb=85.0, driver="580.159.04", torch="2.11.0+cu130",
               cuda="13.0", triton="3.6.0", python="3.12.3")
    figures = {
        "tests": dict(command="-m pytest tests/test_attention.py", passed=80, failed=0, skipped=1, errors=0,
                      seconds=41.0, status=0, environment=env,
                      not_run=[["tests/test_attention.py::test_hub_kernel_matches_fallback[1024-4-4]",
                                "not run: hub unreachable (PyTorch attention ...)"]]),
        "small": dict(status=0, seconds=540.2, memory_limit_gb=24.0, budget=60, log="small.log",
                      **gpu_check.parse_run(LOG)),
        "attention": dict(device="cuda", dtype="bfloat16", attention="Flash Attention 3 from varunneal/flash-attention-3",
                          backends=[dict(backend="SDPA flash", layers="full", window=2048, shape=[128, 2048, 4, 128],
                                         ms=12.5, tflops=301.2, matches_reference=True, max_error=0.0078),
                                    dict(backend="SDPA cuDNN", layers="full", window=2048, shape=[128, 2048, 4, 128],
                                         unavailable="RuntimeError: no kernel | here")]),
    }
    lines = gpu_check.report(figures).splitlines()
    assert lines[2] == ("Device NVIDIA H100 80GB HBM3 (85.0 GB), driver 580.159.04, torch 2.11.0+cu130 (CUDA 13.0), "
                        "Triton 3.6.0, Python 3.12.3.")
    assert "Not run yet: defaults, float16." in lines
    assert ("`-m pytest tests/test_attention.py`: 80 passed, 0 failed, 0 errors, 1 not run, in 41.0 s "
            "(exit status 0).") in lines
    assert ("- `tests/test_attention.py::test_hub_kernel_matches_fallback[1024-4-4]`: not run: hub unreachable "
            "(PyTorch attention ...)") in lines
    assert "Exit status 0 after 540.2 s, limited to 24.0 GiB, a 60 s budget; log: `small.log`." in lines
    assert ("Memory fit: micro-batch 32, 3 sizes probed in 95.5 s, 3 compiled graphs (recompile limit 10); "
            "torch logged 3 recompiles.") in lines
    assert ("Counted steps: median 340 ms, 1,542,023 tokens/s (mean 1,595,871); compile about 115.8 s (the fit and "
            "the first 11 steps' excess).") in lines
    assert "peak_vram_mb:     45059.2" in lines
    assert "| SDPA flash | full | 2048 | 128 x 2048 x 4 x 128 | 12.5 | 301.2 | yes | 7.80e-03 |" in lines
    assert "| SDPA cuDNN | full | 2048 | 128 x 2048 x 4 x 128 | unavailable: RuntimeError: no kernel / here | | | |" in lines
