"""The CUDA branches on the CPU, through torch's own torch.cuda functions: only the driver under them is faked
(conftest.FakeCudaDriver: device count and properties, the memory fraction, the allocator's statistics and
cache, synchronisation), so every argument reaches torch's wrappers as a GPU run passes it, starting with
train.py's device, torch.device("cuda") without an index.

Covers the memory limit (the GPU's share), the peak read and reset, synchronize, the device's name and its peak
FLOPs, out-of-memory recognition and the cache handed back, the memory fit's decisions on CUDA (sizes from the
largest down, never extrapolated, the line it prints, the peak reset after its last probe, nothing of a failed
probe left when the cache is emptied), and the Flash Attention 3 probe falling back when the hub's kernel fails
in backward or under torch.compile, or when the hub cannot be reached. What needs a CUDA tensor (the kernels,
pinned copies, to_empty on the GPU) is left to the GPU check (DEVELOPERS.md).

    uv run pytest tests/test_cuda_paths.py
"""

import re
import socket
import sys
import weakref
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import machine
import prepare
import train
from helpers import fresh_judge

CUDA = torch.device("cuda")  # as machine.training_device() makes it: no index


# --- on the fake driver here, on the real one in the GPU check: nothing is allocated -------------------------

def test_train_pys_device_has_no_index_and_its_memory_limit_is_the_gpus_share(cuda_driver):
    cuda_driver.set_fraction(0.25)
    device = machine.training_device()
    assert device == CUDA and device.index is None
    assert machine.memory_limit(device) == cuda_driver.properties.total_memory * 0.25
    assert machine.memory_limit(torch.device("cuda:0")) == cuda_driver.properties.total_memory * 0.25


def test_torchs_fraction_wrapper_refuses_a_device_without_an_index(cuda_driver):
    """What train.py's device met before the fix: torch's wrapper refuses it, whatever the driver."""
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        torch.cuda.get_per_process_memory_fraction(CUDA)


def test_a_per_process_fraction_set_through_torch_is_the_limit(cuda_driver):
    """The GPU check's 24 GiB card: torch.cuda.set_per_process_memory_fraction, then the fit's limit."""
    torch.cuda.set_per_process_memory_fraction(24 * 2**30 / cuda_driver.properties.total_memory, 0)
    assert machine.memory_limit(CUDA) == pytest.approx(24 * 2**30)


def test_synchronize_and_the_cache_on_train_pys_device(cuda_driver):
    machine.synchronize(CUDA)
    machine.synchronize(torch.device("cpu"))
    prepare.release_memory(CUDA)
    assert machine.peak_memory(CUDA) >= 0 and machine.cuda_peak_mb(torch.device("cpu")) == 0.0


# --- on the fake driver: what it is asked, and allocations it makes up ----------------------------------------

def test_the_driver_is_asked_for_the_fraction_and_the_properties(fake_cuda):
    fake_cuda.fraction = 0.25
    assert machine.memory_limit(machine.training_device()) == 80 * 2**30 * 0.25
    assert "getMemoryFraction" in fake_cuda.calls and "getDeviceProperties" in fake_cuda.calls


def test_the_peak_is_read_and_reset_through_the_allocators_statistics(fake_cuda):
    batch = torch.empty(1)
    fake_cuda.allocate(3 * 2**30, batch)
    del batch  # freed: the peak stays, the allocation goes
    kept = torch.empty(1)
    fake_cuda.allocate(2**30, kept)
    assert machine.peak_memory(CUDA) == 3 * 2**30 and machine.cuda_peak_mb(CUDA) == 3 * 1024
    machine.reset_peak_memory(CUDA)
    assert fake_cuda.calls[-1] == "resetPeakMemoryStats"
    assert machine.cuda_peak_mb(CUDA) == 1024 and machine.cuda_peak_mb(torch.device("cpu")) == 0.0


def test_synchronize_waits_on_train_pys_device(fake_cuda):
    machine.synchronize(CUDA)
    assert fake_cuda.calls == ["exchangeDevice", "synchronize", "maybeExchangeDevice"]
    fake_cuda.calls.clear()
    machine.synchronize(torch.device("cpu"))
    assert fake_cuda.calls == []


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989.5e12),
                                       ("NVIDIA H800 PCIe", 756e12), ("NVIDIA L40", 181.05e12)])
def test_the_device_name_and_its_peak_flops(fake_cuda, name, peak):
    fake_cuda.properties.name = name
    device_name = torch.cuda.get_device_name(machine.training_device())  # train.main's own call
    assert device_name == name and machine.peak_flops(device_name) == peak


@pytest.mark.parametrize("name,peak", [  # as torch names them; the datasheets' dense figures for the dtype that trains
    ("Tesla T4", 65e12), ("Tesla V100-SXM2-16GB", 125e12), ("Tesla V100-PCIE-32GB", 112e12),
    ("Tesla V100S-PCIE-32GB", 130e12), ("NVIDIA GeForce RTX 3090", 71e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 5090", 209.5e12), ("NVIDIA A10", 125e12), ("NVIDIA A10G", None), ("NVIDIA L4", 121e12),
    ("NVIDIA L40", 181.05e12), ("NVIDIA L40S", 362.05e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA B200", 2250e12), ("NVIDIA GB200", 2500e12), ("NVIDIA GB10", None),
    ("AMD Instinct MI300X", 1307.4e12), ("AMD Instinct MI250X/MI250", 191.5e12), ("NVIDIA GeForce GTX 1080", None),
])
def test_the_peak_is_the_longest_name_in_the_table_that_the_device_has(name, peak):
    """An L40 is not an L4, an A100 not an A10, a GB200 not a B200; an A10G or a GB10, with no published figure,
    has no MFU rather than a neighbour's."""
    assert machine.peak_flops(name) == peak


@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                              ((9, 0), torch.bfloat16), ((12, 0), torch.bfloat16)])
def test_the_precision_is_the_gpus_compute_capability(fake_cuda, monkeypatch, capability, dtype):
    """A T4 (7.5) or a V100 (7.0) trains in float16 with loss scaling, whatever torch.cuda.is_bf16_supported() says
    (it counts emulation); 8.0 and up in bf16. AUTORESEARCH_FLOAT16=1 forces the float16 path anywhere."""
    fake_cuda.properties.major, fake_cuda.properties.minor = capability
    monkeypatch.delenv(machine.FORCE_FLOAT16, raising=False)
    got, why = machine.autocast_dtype(machine.training_device())
    assert got == dtype and f"compute capability {capability[0]}.{capability[1]}" in why
    assert ("loss scaling" in why) == (dtype == torch.float16)
    monkeypatch.setenv(machine.FORCE_FLOAT16, "1")
    assert machine.autocast_dtype(machine.training_device())[0] == torch.float16


def test_cudas_out_of_memory_is_recognised_and_the_cache_handed_back(fake_cuda):
    with pytest.raises(torch.OutOfMemoryError) as caught:
        fake_cuda.allocate(81 * 2**30, torch.empty(1))
    assert prepare.is_out_of_memory(caught.value) and isinstance(caught.value, torch.cuda.OutOfMemoryError)
    prepare.release_memory(CUDA)
    assert fake_cuda.calls[-1] == "emptyCache"


# --- the memory fit on CUDA -----------------------------------------------------------------------------

class AllocatingGPT(torch.nn.Module):
    """The tiny GPT on the CPU, allocating in the fake driver as it would on a GPU: 1 MiB a sequence for as long as
    its batch lives, and `per_sequence` bytes a sequence of activations for as long as its loss lives; past the
    GPU's share it runs out of memory as CUDA does. A probe's second forward pass runs beside the first loss."""

    def __init__(self, driver, per_sequence):
        super().__init__()
        self.gpt = train.GPT(train.GPTConfig(sequence_len=64, vocab_size=8192, n_layer=2, n_head=2, n_kv_head=2,
                                             n_embd=64))
        self.gpt.init_weights()
        self.gpt.float()
        self.driver, self.per_sequence, self.batches, self.batch = driver, per_sequence, [], lambda: None

    def forward(self, x, y):
        self.batches.append(x.size(0))
        if self.batch() is not x:
            self.driver.allocate(x.size(0) * 2**20, x)
            self.batch = weakref.ref(x)
        loss = self.gpt(x, y)
        self.driver.allocate(x.size(0) * self.per_sequence, loss)
        return loss


def fit_on_cuda(driver, tokenizer, monkeypatch, fits_up_to):
    """machine.fit_micro_batch on train.py's CUDA device, the micro-batch 4 of 64 tokens asked for, a GPU on which
    `fits_up_to` sequences fit: (micro-batch, the model, the live allocations whenever the cache was emptied)."""
    monkeypatch.setattr(train, "flash_attn_func", machine.pytorch_attention)
    fresh_judge(monkeypatch)
    model = AllocatingGPT(driver, per_sequence=driver.properties.total_memory // (2 * fits_up_to + 1))
    optimizer = model.gpt.setup_optimizer()
    left_at_empty_cache = []
    monkeypatch.setattr(torch._C, "_cuda_emptyCache", lambda: left_at_empty_cache.append(driver.allocated))
    b, seconds = machine.fit_micro_batch(model, optimizer, tokenizer, CUDA, torch.autocast("cpu", enabled=False),
                                         4, 64, 4 * 64)
    assert seconds > 0 and prepare._judge["training_started"] is None  # a probe takes one batch: no training
    return b, model, left_at_empty_cache


def test_the_fit_on_cuda_tries_from_the_largest_down_and_says_so(fake_cuda, tokenizer, monkeypatch, capsys):
    b, model, left_at_empty_cache = fit_on_cuda(fake_cuda, tokenizer, monkeypatch, fits_up_to=1)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("DEVICE_BATCH_SIZE", "Memory fit"))]
    assert b == 1
    assert model.batches == [4, 2, 2, 1, 1]  # 4 runs out at once, 2 beside its first loss; never extrapolated
    assert out[0] == "DEVICE_BATCH_SIZE 4 does not fit in 85.9 GB: using 1, 4 accumulation steps"
    assert out[1].startswith("Memory fit: micro-batch 1, 3 sizes probed in ")
    assert left_at_empty_cache == [0, 0]  # each failed probe's batch and activations were gone before the cache went


def test_the_fit_resets_cudas_peak_after_its_last_probe(fake_cuda, tokenizer, monkeypatch):
    """The summary's peak_vram_mb is the training's: the probe of 4, which ran out, is not in it."""
    b, model, _ = fit_on_cuda(fake_cuda, tokenizer, monkeypatch, fits_up_to=2)
    assert b == 2 and model.batches == [4, 4, 2, 2]
    assert fake_cuda.calls[-1] == "resetPeakMemoryStats"  # nothing reached the driver after it
    assert fake_cuda.peak == 0 and machine.cuda_peak_mb(CUDA) == 0.0  # the probes' peak is not the run's
    x = torch.zeros(b, 64, dtype=torch.long)
    model(x, x).backward()  # a training micro-step at the size chosen: its batch and its activations
    assert machine.cuda_peak_mb(CUDA) == (b * 2**20 + b * model.per_sequence) / 2**20


def test_when_nothing_fits_on_cuda_one_line_names_the_gpus_share(fake_cuda, tokenizer, monkeypatch):
    fake_cuda.fraction = 0.5
    with pytest.raises(SystemExit) as exiting:
        fit_on_cuda(fake_cuda, tokenizer, monkeypatch, fits_up_to=0)
    assert str(exiting.value) == ("error: not even a micro-batch of 1 sequence of 64 tokens fits in 42.9 GB; "
                                  "make the model smaller (DEPTH, ASPECT_RATIO) and run again")

class TinyLM(torch.nn.Module):
    """A model of its own (train.py's GPT is mutmut's to rewrite, and torch.compile cannot trace that): an
    embedding and a linear head."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(8192, 16), torch.nn.Linear(16, 8192)

    def forward(self, x, y):
        return torch.nn.functional.cross_entropy(self.head(self.embed(x)).flatten(0, 1), y.flatten())


class RunsOutAfterCompiling(torch.optim.SGD):
    """An optimizer whose first `fails` steps run out of memory as CUDA does: after the probe's graph compiled."""

    def __init__(self, params, fails):
        super().__init__(params, lr=0.1)
        self.fails = fails

    def step(self, closure=None):
        if self.fails:
            self.fails -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return super().step(closure)


def test_a_compiled_model_keeps_every_size_compiled_and_the_fit_says_so(fake_cuda, tokenizer, monkeypatch, capsys):
    """Each size probed is a graph (dynamic=False); with torch's limit at 2 the fit raises it to its 3 sizes plus
    the evaluation's graphs, so that neither training nor the evaluation would fall back to running eagerly."""
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            model = torch.compile(TinyLM(), backend=counter, dynamic=False)
            b, _ = machine.fit_micro_batch(model, RunsOutAfterCompiling(model.parameters(), fails=2), tokenizer,
                                           CUDA, torch.autocast("cpu", enabled=False), 4, 64, 4 * 64)
            limit = torch._dynamo.config.recompile_limit
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out.splitlines()
    assert b == 1 and counter.frame_count == 3 and limit == 3 + machine.EVALUATION_GRAPHS == 5
    assert out[0] == "DEVICE_BATCH_SIZE 4 does not fit in 85.9 GB: using 1, 4 accumulation steps"
    assert re.fullmatch(r"Memory fit: micro-batch 1, 3 sizes probed in [\d.]+s, 3 compiled graphs \(recompile limit 5\)",
                        out[1]), out[1]


def test_an_uncompiled_model_leaves_the_limit_and_says_nothing_of_graphs(fake_cuda, tokenizer, monkeypatch, capsys):
    model = TinyLM()
    with torch._dynamo.config.patch(recompile_limit=2):
        b, _ = machine.fit_micro_batch(model, RunsOutAfterCompiling(model.parameters(), fails=0), tokenizer,
                                       CUDA, torch.autocast("cpu", enabled=False), 4, 64, 4 * 64)
        assert torch._dynamo.config.recompile_limit == 2
    out = capsys.readouterr().out.splitlines()
    assert b == 4 and re.fullmatch(r"Memory fit: micro-batch 4, 1 size probed in [\d.]+s", out[0]), out


# --- the hub's Flash Attention 3: loaded only when it runs forward and backward, compiled too ---------------

def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int) -> torch.Tensor:
    """The stand-in kernels' maths: the fallback's."""
    CALLS.append("forward")
    return machine.pytorch_attention(q, k, v, causal=True, window_size=(left, 0))


def attend_backward(ctx, grad):
    CALLS.append("backward")
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        out = machine.pytorch_attention(q, k, v, causal=True, window_size=(ctx.left, 0))
        return (*torch.autograd.grad(out, (q, k, v), grad), None)


def save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.left = inputs[3]


def nan_backward(ctx, grad):
    CALLS.append("backward")
    return (*(torch.full_like(t, float("nan")) for t in ctx.saved_tensors), None)


def hub_kernel(name, backward=attend_backward, compiles=True):
    """A custom operator as the hub's builds are, with or without its backward and its fake implementation
    (which torch.compile traces through): torch itself then refuses the backward, or the compilation."""
    op = torch.library.custom_op(f"autoresearch_test::{name}", attend, mutates_args=())
    if backward:
        op.register_autograd(backward, setup_context=save_inputs)
    if compiles:
        op.register_fake(lambda q, k, v, left: torch.empty_like(q))
    return lambda q, k, v, causal=False, window_size=(-1, -1): op(q, k, v, window_size[0])


CALLS = []
KERNELS = {"whole": hub_kernel("whole"), "no backward": hub_kernel("no_backward", backward=None),
           "NaN gradients": hub_kernel("nan_gradients", backward=nan_backward),
           "does not compile": hub_kernel("does_not_compile", compiles=False)}


def hub(monkeypatch, kernel="whole"):
    """The `kernels` package, answering get_kernel(repo) with a stand-in kernel, and a hub that does not answer;
    returns the repos asked for."""
    asked = []
    CALLS.clear()
    kernels = ModuleType("kernels")
    kernels.get_kernel = lambda repo: asked.append(repo) or SimpleNamespace(
        flash_attn_interface=SimpleNamespace(flash_attn_func=KERNELS[kernel]))
    monkeypatch.setitem(sys.modules, "kernels", kernels)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return asked


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.mark.parametrize("capability,repo", [((9, 0), "varunneal/flash-attention-3"),
                                             ((8, 0), "kernels-community/flash-attn3")])
def test_a_kernel_that_runs_forward_and_backward_is_loaded(fake_cuda, monkeypatch, capability, repo):
    fake_cuda.properties.major, fake_cuda.properties.minor = capability
    asked = hub(monkeypatch)
    fa3, source = machine.load_flash_attention_3(device="cpu", compiled=False)
    assert source == repo and asked == [repo] and fa3 is KERNELS["whole"]
    assert CALLS == ["forward", "backward"]


def test_a_kernel_without_a_backward_falls_back(fake_cuda, monkeypatch):
    hub(monkeypatch, "no backward")
    fa3, reason = machine.load_flash_attention_3(device="cpu", compiled=False)
    assert fa3 is None and CALLS == ["forward"]
    assert reason == ("varunneal/flash-attention-3 did not load (RuntimeError: Trying to backward through "
                      "autoresearch_test.no_backward.default but no autograd formula was registered. Please use "
                      "register_autograd to add one.)")


def test_a_kernel_with_nan_gradients_falls_back(fake_cuda, monkeypatch):
    hub(monkeypatch, "NaN gradients")
    fa3, reason = machine.load_flash_attention_3(device="cpu", compiled=False)
    assert fa3 is None and CALLS == ["forward", "backward"]
    assert reason == "varunneal/flash-attention-3 did not load (RuntimeError: non-finite gradients)"


def test_a_kernel_that_does_not_compile_falls_back(fake_cuda, monkeypatch):
    hub(monkeypatch, "does not compile")
    torch._dynamo.reset()
    try:
        fa3, reason = machine.load_flash_attention_3(device="cpu", compiled=True)
    finally:
        torch._dynamo.reset()
    assert fa3 is None and CALLS == ["forward", "backward"]  # eager worked; the compiled probe did not
    assert reason.startswith("varunneal/flash-attention-3 did not load (TorchRuntimeError: Dynamo failed to run FX "
                             "node with fake tensors: call_function autoresearch_test.does_not_compile.default")


def test_an_unreachable_hub_is_not_waited_for(fake_cuda, monkeypatch):
    """Nothing answers at HF_ENDPOINT: the kernel is taken from the local cache (HF_HUB_OFFLINE) at once."""
    hub(monkeypatch)
    assert not machine.hub_reachable()
    machine.load_flash_attention_3(device="cpu", compiled=False)
    assert machine.os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_reachable_hub_is_used(fake_cuda, monkeypatch):
    hub(monkeypatch)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert machine.hub_reachable()
        assert machine.load_flash_attention_3(device="cpu", compiled=False)[1] == "varunneal/flash-attention-3"
    assert "HF_HUB_OFFLINE" not in machine.os.environ


def test_without_cuda_the_kernel_is_not_looked_for(monkeypatch):
    asked = hub(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine.load_flash_attention_3() == (None, "no CUDA device") and asked == []
