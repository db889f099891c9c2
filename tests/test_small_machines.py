"""The settings for small machines, read out of docs/small-machines.md so that they cannot rot.

Each "## On a ..." section there holds one python block of constants, marked `# prepare.py`
and `# train.py`; they must all be assignments the files have. The CPU's settings are then run end to end,
the agent's way, on the tiny corpus with the budget cut to the first counted step and the batch to 2 sequences
(the model, sequence and window as written): the run completes, in float32 or bf16 as the CPU allows, and
prints the summary block with the model those settings describe.

    uv run pytest tests/test_small_machines.py
"""


import pytest

import prepare
from helpers import make_project, parameters_M, parse_summary, progress_lines, run_train, settings


@pytest.mark.parametrize("machine", ["Mac with Apple silicon", "CPU"])
def test_the_settings_name_constants_the_files_have(machine, tmp_path):
    values = settings(machine)
    assert values["train.py"] and set(values) == {"prepare.py", "train.py"}
    make_project(tmp_path / "project", values["prepare.py"], values["train.py"])  # asserts each name exists once
    seq = eval(values["prepare.py"].get("MAX_SEQ_LEN", str(prepare.MAX_SEQ_LEN)))
    total, device = (eval(values["train.py"][name]) for name in ("TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"))
    assert total % (device * seq) == 0  # whole micro-steps: what train.py checks at start-up


def test_the_cpu_settings_run_end_to_end(tiny_cache, tmp_path):
    values = settings("CPU")
    prepare_cut = dict(TIME_BUDGET="0.01", EVAL_TOKENS="2 * 256")  # the eleven uncounted steps, one more; one batch
    train_cut = dict(DEVICE_BATCH_SIZE="2", TOTAL_BATCH_SIZE="2 * 256")  # 2 sequences a step: 0.3 s, not 2.5 s
    project = make_project(tmp_path / "project", dict(values["prepare.py"], **prepare_cut),
                           dict(values["train.py"], **train_cut))
    status, log = run_train(project, tiny_cache.dir, timeout=900)
    assert status == 0, log[-3000:]
    summary = parse_summary(log)
    assert summary["depth"] == values["train.py"]["DEPTH"] and summary["num_params_M"] == parameters_M(
        int(values["train.py"]["DEPTH"]), values["train.py"]["ASPECT_RATIO"], values["train.py"]["HEAD_DIM"])
    assert int(summary["num_steps"]) == len(progress_lines(log)) > 11
    assert "'sequence_len': 256" in log and "does not fit" not in log
