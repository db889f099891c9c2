"""The memory fit: train.py shrinks the micro-batch until it fits and accumulates more, with the same maths.

train.main() runs in-process on the tiny corpus (tests/test_loop.py's fake clock). A test double makes
forward passes above a given micro-batch fail with the error each device raises (CUDA's
OutOfMemoryError, the CPU allocator's and MPS's RuntimeError): the fit must pick the largest size that
works among those that keep TOTAL_BATCH_SIZE exact, say so in one line, and the parameters after the first
optimizer step must equal those of a run that never ran out. Where running out kills instead of raising
(CPU, MPS), the fit extrapolates two small probes against the memory limit and never tries a size that
would not fit. When nothing fits: one line and exit 1. evaluate_bpb gives the same number at any batch
size and halves a batch that does not fit. Last, a real run under an address-space limit (ulimit -v).

    uv run pytest tests/test_memory_fit.py
"""

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import machine
import prepare
import train
from helpers import ROOT, TINY_PREPARE, in_memory_fit, judge_settings, make_project, parse_summary, progress_lines, run_main, set_constants, start_tiny_main

OUT_OF_MEMORY = {  # what each device raises when an allocation fails
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                           "of 23.99 GiB of which 1.02 GiB is free."),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
    "mps": lambda: RuntimeError("MPS backend out of memory (MPS allocated: 18.13 GB, other allocations: 1.25 GB, max "
                                "allowed: 20.13 GB). Tried to allocate 2.00 GB on private pool."),
}
TOTAL = 4 * 64  # tokens per optimizer step: micro-batches 4, 2 or 1 of 64 tokens keep it exact
GiB = 2**30
STATUS = dict(VmPeak=9_000_000, VmSize=8_000_000, VmHWM=3_000_000, VmRSS=2_000_000)  # kB
no_address_space_limit = pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY,
                                            reason="an address-space limit: the fit reads VmSize and VmPeak then")


def fake_proc(mp, folder, available_kb=None, status=None, cgroups=(None, None)):
    """machine.py reading /proc and cgroup files of the test's own, in `folder`: MemAvailable in kB (None: no
    /proc/meminfo, so no limit), this process's status {key: kB}, cgroups [(limit text, usage text) or None for
    v2, v1]. The fit's own functions read them: nothing of machine.py is replaced."""
    folder = Path(folder)
    meminfo, stat = folder / "meminfo", folder / "status"
    if available_kb is not None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {int(available_kb)} kB\nCached: 1 kB\n")
    stat.write_text("Name:\tpython\n" + "".join(f"{k}:\t{int(v)} kB\n" for k, v in (status or {}).items()))
    files = []
    for version, pair in zip(("v2", "v1"), cgroups):
        limit, usage = folder / f"{version}-limit", folder / f"{version}-usage"
        if pair is not None:
            limit.write_text(pair[0] + "\n")
            usage.write_text(pair[1] + "\n")
        files.append((str(limit), str(usage)))
    mp.setattr(machine, "MEMINFO", str(meminfo))
    mp.setattr(machine, "STATUS", str(stat))
    mp.setattr(machine, "CGROUP_MEMORY", files)


class FirstStepDone(Exception):
    pass


def fail_above(mp, fits_up_to, error, seen, holds=None):
    """Forward passes of more than `fits_up_to` sequences raise `error()`; every batch size is recorded, and
    holds(size) is called first: what the pass makes the process hold, in the /proc files the fit reads."""
    forward = train.GPT.forward

    def forward_or_fail(self, idx, targets=None, reduction="mean"):
        seen.append(idx.size(0))
        if holds is not None:
            holds(idx.size(0))
        if fits_up_to is not None and idx.size(0) > fits_up_to:
            raise error()
        return forward(self, idx, targets, reduction)

    mp.setattr(train.GPT, "forward", forward_or_fail)


def first_step(mp, cache, capsys, folder, device_batch, fits_up_to=None, error=OUT_OF_MEMORY["cpu"]):
    """Run train.main to its first optimizer step on a machine whose /proc tells no limit (allocation errors
    only): (parameters after it, stdout, forward batch sizes)."""
    start_tiny_main(mp, cache)
    mp.setattr(train, "DEVICE_BATCH_SIZE", device_batch)
    mp.setattr(train, "TOTAL_BATCH_SIZE", TOTAL)
    fake_proc(mp, folder, None, STATUS)
    seen, after = [], []
    fail_above(mp, fits_up_to, error, seen)
    step = train.MuonAdamW.step

    def step_then_stop(self):
        step(self)
        if in_memory_fit():
            return
        after.extend(p.detach().clone() for group in self.param_groups for p in group["params"])
        raise FirstStepDone

    mp.setattr(train.MuonAdamW, "step", step_then_stop)
    with pytest.raises(FirstStepDone):
        run_main(capsys)
    return after, capsys.readouterr().out, seen


@pytest.mark.parametrize("device", ["cuda", "cpu", "mps"])
def test_a_micro_batch_that_does_not_fit_is_halved_with_the_same_first_step(tiny_cache, capsys, tmp_path, device):
    with pytest.MonkeyPatch.context() as mp:
        unconstrained, out, seen = first_step(mp, tiny_cache, capsys, tmp_path, device_batch=4)
    assert "does not fit" not in out and set(seen) == {4}
    with pytest.MonkeyPatch.context() as mp:
        constrained, out, seen = first_step(mp, tiny_cache, capsys, tmp_path, device_batch=4, fits_up_to=1,
                                            error=OUT_OF_MEMORY[device])
    assert "DEVICE_BATCH_SIZE 4 does not fit in memory: using 1, 4 accumulation steps\n" in out
    assert "Gradient accumulation steps: 4\n" in out
    assert seen[:2] == [4, 2]  # tried from the largest down, only sizes that keep TOTAL_BATCH_SIZE exact
    assert set(seen[2:]) == {1}  # then the probe and the four micro-steps of the first optimizer step
    assert len(constrained) == len(unconstrained)
    for c, u in zip(constrained, unconstrained):
        torch.testing.assert_close(c, u, rtol=1e-4, atol=1e-6)


def test_the_probes_leave_the_weights_and_the_optimizer_as_they_were(tokenizer, monkeypatch, proc):
    """A probe's second forward and backward run with the optimizer's state held, as training's do; then the
    weights and the optimizer are put back."""
    monkeypatch.setattr(train, "flash_attn_func", machine.pytorch_attention)
    proc(None, STATUS)  # no limit read: no extrapolation, one probe, of 4
    model = train.GPT(train.GPTConfig(sequence_len=64, vocab_size=8192, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    model.float()
    optimizer = model.setup_optimizer()
    forwards = []  # (sequences, whether the optimizer holds state) of each forward pass
    forward = train.GPT.forward

    def recorded_forward(self, idx, targets=None, reduction="mean"):
        forwards.append((idx.size(0), bool(optimizer.state)))
        return forward(self, idx, targets, reduction)
    monkeypatch.setattr(train.GPT, "forward", recorded_forward)
    before = [p.detach().clone() for p in model.parameters()]
    autocast = torch.autocast("cpu", enabled=False)
    b, seconds = machine.fit_micro_batch(model, optimizer, tokenizer, torch.device("cpu"), autocast, 4, 64, 4 * 64)
    assert b == 4 and seconds > 0
    assert forwards == [(4, False), (4, True)]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
    assert [g["lr"] for g in optimizer.param_groups] == [g["initial_lr"] for g in optimizer.param_groups]


def test_what_the_agent_sets_runs_whenever_it_fits(tiny_cache, capsys, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        _, out, seen = first_step(mp, tiny_cache, capsys, tmp_path, device_batch=2, fits_up_to=2)
    assert "does not fit" not in out and "Gradient accumulation steps: 2\n" in out
    assert set(seen) == {2}


def test_an_error_that_is_not_out_of_memory_is_not_swallowed(tiny_cache, capsys, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        start_tiny_main(mp, tiny_cache)
        fake_proc(mp, tmp_path, None, STATUS)
        fail_above(mp, 0, lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied (128x64 and 32x64)"), [])
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            run_main(capsys)


def test_when_not_even_one_sequence_fits_one_line_and_exit_1(tiny_cache, capsys, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        start_tiny_main(mp, tiny_cache)
        fake_proc(mp, tmp_path, 24e9 // 1024, dict(VmSize=1e9 // 1024, VmRSS=0, VmHWM=1e9 // 1024))  # 24 GB free
        fail_above(mp, 0, OUT_OF_MEMORY["mps"], [])
        status, out = run_main(capsys)
    assert status == ("error: not even a micro-batch of 1 sequence of 64 tokens fits in 24.0 GB; "
                      "make the model smaller (DEPTH, ASPECT_RATIO) and run again")
    assert "Traceback" not in out and "step 00000" not in out


@no_address_space_limit
@pytest.mark.parametrize("limit_sequences,expected", [(100, 8), (6.5, 4), (3, 2), (1.5, 2)])
def test_where_running_out_kills_sizes_are_extrapolated_and_never_tried_too_big(tiny_cache, capsys, tmp_path,
                                                                              limit_sequences, expected):
    """A machine in /proc: a forward pass of b sequences brings the process's peak resident set to 1 GiB plus
    0.25 GiB a sequence; the limit (what it holds plus MemAvailable) holds `limit_sequences` of them once the fit
    keeps 15 % of the headroom free. Sizes 1 and 2 are probed to measure that; nothing above the choice runs."""
    with pytest.MonkeyPatch.context() as mp:
        seen = []
        start_tiny_main(mp, tiny_cache)
        mp.setattr(train, "DEVICE_BATCH_SIZE", 8)
        mp.setattr(train, "TOTAL_BATCH_SIZE", 8 * 64)
        limit_kb = round((1.25 + 0.25 * (limit_sequences - 1) / 0.85) * GiB / 1024)
        holds = lambda b: fake_proc(mp, tmp_path, limit_kb, dict(VmSize=GiB // 1024, VmRSS=0,
                                                                  VmHWM=(GiB + b * GiB // 4) // 1024))
        holds(0)
        fail_above(mp, None, None, seen, holds)
        mp.setattr(train, "TIME_BUDGET", 0.01)
        status, out = run_main(capsys)
    assert status == 0
    assert seen[:2] == [1, 2] and max(seen) == expected
    assert f"Gradient accumulation steps: {8 // expected}\n" in out
    assert ("does not fit" in out) == (expected < 8)


def test_a_slow_machine_is_told_how_long_the_run_will_take(tiny_cache, capsys):
    with pytest.MonkeyPatch.context() as mp:
        clock = start_tiny_main(mp, tiny_cache)
        forward = train.GPT.forward

        def slow_forward(self, *args, **kwargs):
            clock.now += 10 - 0.125  # 10 s a forward pass (the fake clock already adds 0.125)
            return forward(self, *args, **kwargs)

        mp.setattr(train.GPT, "forward", slow_forward)
        mp.setattr(train, "TIME_BUDGET", 0.01)  # stop after the uncounted steps
        status, out = run_main(capsys)
    # 2 micro-steps of 10 s a step; 11 uncounted steps, one budget step, evaluation 1/3 of a step: 12.33 steps
    assert status == 0
    assert ("warning: this machine is slow for these settings: about 20.0s per optimizer step, so this run will "
            "take about 4.1 minutes for a 0.0-minute budget (see docs/small-machines.md)\n") in out


def test_a_fast_machine_gets_no_warning(tiny_cache, capsys, monkeypatch):
    start_tiny_main(monkeypatch, tiny_cache)  # 0.25 s a step against a 3 s budget: about 6 s in all
    status, out = run_main(capsys)
    assert status == 0 and "warning" not in out


# --- what the fit leaves behind: the peak, the compiled graphs, the evaluation's mode ---------------------------

def test_every_size_the_fit_compiles_stays_compiled_and_is_counted(tiny_cache, capsys, tmp_path):
    """torch.compile with a counting backend: each size probed is a graph, the evaluation one more. With
    torch's limit lowered to 2, the fit must raise it, or the later graphs would silently run eagerly."""
    counter = CompileCounter()
    real_compile = torch.compile
    failed, evaluated_after = [], []
    torch._dynamo.reset()
    forward = train.GPT.forward
    with pytest.MonkeyPatch.context() as mp, torch._dynamo.config.patch(recompile_limit=2):
        start_tiny_main(mp, tiny_cache)
        mp.setattr(train.GPT, "forward", forward)  # the fake clock's forward would be a new graph per tick
        mp.setattr(train, "time", time)
        mp.setattr(machine, "time", time)
        mp.setattr(train, "COMPILE", True)
        mp.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, **{**kwargs, "backend": counter}))
        mp.setattr(train, "DEVICE_BATCH_SIZE", 4)
        mp.setattr(train, "TOTAL_BATCH_SIZE", TOTAL)
        mp.setattr(train, "TIME_BUDGET", 0.01)
        fake_proc(mp, tmp_path, None, STATUS)
        step, evaluate_bpb = train.MuonAdamW.step, train.evaluate_bpb

        def out_of_memory_after_the_compiled_step(self):  # the probes of 4 and 2 compile their graph, then run out
            if in_memory_fit() and len(failed) < 2:
                failed.append(counter.frame_count)
                raise OUT_OF_MEMORY["cuda"]()
            return step(self)

        mp.setattr(train.MuonAdamW, "step", out_of_memory_after_the_compiled_step)
        mp.setattr(train, "evaluate_bpb", lambda model, *a, **k: evaluated_after.append(counter.frame_count) or
                   evaluate_bpb(model, *a, **k))
        status, out = run_main(capsys)
        limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    assert status == 0, out
    assert failed == [1, 2]  # each probe that ran out had compiled its own graph
    assert re.search(r"^Memory fit: micro-batch 1, 3 sizes probed in [\d.]+s, 3 compiled graphs \(recompile limit 5\)$",
                     out, flags=re.M), out
    assert limit == 3 + machine.EVALUATION_GRAPHS
    assert evaluated_after == [3] and counter.frame_count == 4  # the training's graph was the probe's; evaluation


def test_the_model_is_in_eval_mode_for_the_evaluation(tiny_cache, capsys):
    modes = []
    with pytest.MonkeyPatch.context() as mp:
        start_tiny_main(mp, tiny_cache)
        mp.setattr(train, "TIME_BUDGET", 0.01)
        evaluate_bpb = train.evaluate_bpb
        mp.setattr(train, "evaluate_bpb", lambda model, *a, **k: modes.append(model.training) or
                   evaluate_bpb(model, *a, **k))
        training = train.GPT.forward
        seen = []
        mp.setattr(train.GPT, "forward", lambda self, *a, **k: seen.append(self.training) or training(self, *a, **k))
        status, out = run_main(capsys)
    assert status == 0 and modes == [False]
    assert seen[0] is True and seen[-1] is False  # trained in training mode, judged in eval mode


# --- evaluate_bpb at any batch size ---------------------------------------------------------------------

@pytest.fixture
def random_gpt(use_cache, monkeypatch):
    judge_settings(monkeypatch, MAX_SEQ_LEN=32, EVAL_TOKENS=12 * 32 + 5)  # 12 rows
    monkeypatch.setattr(train, "flash_attn_func", machine.pytorch_attention)
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=32, vocab_size=8192, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    model.float()
    with torch.no_grad():
        for p in model.parameters():  # non-zero everywhere, so that every row's loss is different
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_evaluate_bpb_is_the_same_at_every_batch_size(tokenizer, random_gpt, monkeypatch):
    values = {b: prepare.evaluate_bpb(random_gpt, tokenizer, b) for b in (1, 2, 3, 4, 5, 7, 12, 16)}
    for b, value in values.items():
        assert value == pytest.approx(values[12], rel=1e-6), b  # 5, 7 and 16 end with a partial batch
    judge_settings(monkeypatch, EVAL_TOKENS=prepare.EVAL_TOKENS - 32)  # one row less
    assert prepare.evaluate_bpb(random_gpt, tokenizer, 4) != pytest.approx(values[12], rel=1e-6)


def test_evaluate_bpb_halves_a_batch_that_does_not_fit(tokenizer, random_gpt, monkeypatch, capsys):
    expected = prepare.evaluate_bpb(random_gpt, tokenizer, 3)
    seen = []
    fail_above(monkeypatch, 3, OUT_OF_MEMORY["cuda"], seen)
    assert prepare.evaluate_bpb(random_gpt, tokenizer, 12) == pytest.approx(expected, rel=1e-6)
    assert capsys.readouterr().out == ("Evaluation batch 12 does not fit in memory: using 6\n"
                                       "Evaluation batch 6 does not fit in memory: using 3\n")
    assert seen[:2] == [12, 6] and set(seen[2:]) == {3}


@pytest.mark.parametrize("error,tried", [(OUT_OF_MEMORY["cpu"], [4, 2, 1]), (lambda: ValueError("a bug"), [4])])
def test_evaluate_bpb_raises_what_halving_cannot_help(tokenizer, random_gpt, monkeypatch, error, tried):
    """Out of memory even at one row, or any error that is not out-of-memory: raised, not retried."""
    seen = []
    fail_above(monkeypatch, 0, error, seen)
    with pytest.raises(type(error())):
        prepare.evaluate_bpb(random_gpt, tokenizer, 4)
    assert seen == tried


# --- what the CPU may take: /proc and the cgroup's files, written here -----------------------------------------


@pytest.fixture
def proc(tmp_path, monkeypatch):
    """fake_proc in the test's folder: write(meminfo kB, status {key: kB}, cgroups)."""
    return lambda *args, **kwargs: fake_proc(monkeypatch, tmp_path, *args, **kwargs)


CPU = torch.device("cpu")


@pytest.mark.parametrize("cgroups,limit", [
    ((None, None), (2_000_000 + 10_000_000) * 1024),                        # no cgroup: RSS + MemAvailable
    (((str(8 * GiB), str(7 * GiB)), None), 2_000_000 * 1024 + GiB),        # v2: 1 GiB left under its limit
    ((("max", str(7 * GiB)), (str(4 * GiB), str(GiB))), 2_000_000 * 1024 + 3 * GiB),  # v2 unlimited: v1's room
    ((None, (str(4 * GiB), str(GiB))), 2_000_000 * 1024 + 3 * GiB),        # v1 only
    (((str(64 * GiB), str(GiB)), None), (2_000_000 + 10_000_000) * 1024),  # more room than MemAvailable
    (((str(GiB), str(2 * GiB)), None), 2_000_000 * 1024),                  # over its limit already: nothing more
])
@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY, reason="an address-space limit")
def test_the_cpus_limit_is_what_the_process_holds_and_what_the_machine_can_still_give(proc, cgroups, limit):
    proc(10_000_000, STATUS, cgroups)
    assert machine.memory_limit(CPU) == limit
    assert machine.peak_memory(CPU) == 3_000_000 * 1024  # the peak resident set


def test_where_proc_says_nothing_there_is_no_limit(proc):
    proc(None, STATUS)  # no MemAvailable (no /proc/meminfo: not Linux)
    assert machine.memory_limit(CPU) is None
    proc(10_000_000, dict(VmRSS=1, VmHWM=1))  # no VmSize
    assert machine.memory_limit(CPU) is None


UNDER_A_LIMIT = """
import resource, sys, torch
import machine
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
machine.MEMINFO, machine.STATUS, machine.CGROUP_MEMORY = sys.argv[2], sys.argv[3], []
print(machine.memory_limit(torch.device("cpu")), machine.peak_memory(torch.device("cpu")))
"""


@pytest.mark.parametrize("address_space,limit", [(20 * GiB, (8_000_000 + 10_000_000) * 1024), (12 * GiB, 12 * GiB)])
def test_under_an_address_space_limit_the_limit_is_counted_in_address_space(proc, tmp_path, address_space, limit):
    """VmSize plus what the machine can give, or the address-space limit itself where that is lower; the peak is
    VmPeak then, as glibc maps what it frees (keep_freed_memory)."""
    proc(10_000_000, STATUS)
    result = subprocess.run([sys.executable, "-c", UNDER_A_LIMIT, str(address_space), str(tmp_path / "meminfo"),
                             str(tmp_path / "status")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(limit), str(9_000_000 * 1024)]


# --- a real run under an address-space limit -------------------------------------------------------------

def peak_address_space(project, cache):
    """VmPeak (bytes) of a whole tiny run, read by the run itself as it exits. It runs under a limit of 1 TiB, so
    that glibc serves every thread from one arena as it does under any limit: without one, each thread's arena
    reserves 64 MB or more of address space as it starts, and the peak varies by hundreds of MB run to run."""
    code = ("import atexit, runpy\n"
            "atexit.register(lambda: print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0]))\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache)),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (2**40, 2**40)))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return int(result.stdout.rsplit("VmPeak:", 1)[1].split()[0]) * 1024


MMAPPED_AFTER_A_BIGGER_FREE = """
import ctypes, resource, sys
import machine
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "limit":
    resource.setrlimit(resource.RLIMIT_AS, (2**40, 2**40))
machine.keep_freed_memory()
filler = [libc.malloc(1 << 20) for _ in range(libc.mallinfo2().fordblks >> 20)]  # the heap's free space, used up
libc.free(libc.malloc(16 << 20))  # glibc's own rule raises its mmap threshold to 16 MB here
before = libc.mallinfo2().hblks  # blocks served by mmap
block = libc.malloc(8 << 20)  # the heap has no room left for it: it grows the heap or is mapped
print(libc.mallinfo2().hblks - before)  # 1 when the 8 MB block is one of them
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_under_an_address_space_limit_freed_blocks_go_back_to_the_kernel():
    """Under a limit an 8 MB block is mapped on its own (and unmapped when freed), even after a bigger block was
    freed; with no limit it comes from the heap, which keeps what is freed."""
    runs = [subprocess.Popen([sys.executable, "-c", MMAPPED_AFTER_A_BIGGER_FREE, mode], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for mode in ("limit", "none")]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert [int(out) for out, _ in outputs] == [1, 0]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmPeak from /proc (Linux)")
def test_a_real_run_under_an_address_space_limit_completes_with_a_smaller_micro_batch(filled_cache, tmp_path):
    """On a filled token cache: a shard tokenized mid-run takes address space that no probe sees."""
    budget = dict(TINY_PREPARE, TIME_BUDGET="0.01")  # the eleven uncounted steps and one more
    small = make_project(tmp_path / "small", budget)
    set_constants(os.path.join(small, "train.py"), DEVICE_BATCH_SIZE="2", TOTAL_BATCH_SIZE="2 * 64")
    limit = peak_address_space(small, filled_cache) + 200 * 2**20  # 16 sequences need 0.14 GB more, 32 0.27 GB
    big = make_project(tmp_path / "big", budget)
    set_constants(os.path.join(big, "train.py"), DEVICE_BATCH_SIZE="32", TOTAL_BATCH_SIZE="32 * 64")
    result = subprocess.run(f"{sys.executable} train.py > run.log 2>&1", shell=True, cwd=big, timeout=600,
                            env=dict(os.environ, AUTORESEARCH_CACHE_DIR=str(filled_cache)),
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    with open(os.path.join(big, "run.log"), newline="") as f:  # keep the \r of the progress lines
        log = f.read()
    assert result.returncode == 0, log[-3000:]
    line = next(line for line in log.splitlines() if line.startswith("DEVICE_BATCH_SIZE 32 does not fit"))
    micro_batch = int(line.split("using ")[1].split(",")[0])
    assert 2 <= micro_batch < 32 and f"{32 // micro_batch} accumulation steps" in line, line
    summary = parse_summary(log)
    assert int(summary["num_steps"]) == len(progress_lines(log)) > 11
    assert float(summary["val_bpb"]) > 0 and float(summary["training_seconds"]) >= float(budget["TIME_BUDGET"])
