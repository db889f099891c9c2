"""
The machine under the benchmark: the attention kernel this GPU runs, how much memory a run may take and how
much it took, glibc's allocator and bf16 speed on a CPU, and the memory fit that picks the largest micro-batch
that fits. Fixed like prepare.py: the agent never edits it. It imports from prepare.py, never the reverse:
what evaluate_bpb itself needs (recognising and recovering from out of memory) stays there.
"""

import copy
import ctypes
import functools
import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from files import hf_endpoint
from prepare import is_out_of_memory, make_dataloader, release_memory

COMPILE = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None  # CUDA's compiler is Triton
HUB_TIMEOUT = 3                 # seconds to reach the kernel hub before its kernel is taken from the local cache
MEMINFO = "/proc/meminfo"       # the CPU's memory: MemAvailable
STATUS = "/proc/self/status"    # this process's: VmRSS, VmSize, VmHWM, VmPeak
CGROUP_MEMORY = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # (limit, usage): cgroup v2, v1
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]

# ---------------------------------------------------------------------------
# Attention kernel: Flash Attention 3 from the kernel hub, else PyTorch attention with the same windows
# ---------------------------------------------------------------------------

_block_masks = {}  # (T, left, device type) -> BlockMask


def _build_sliding_window_block_mask(T, left, device):
    window = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= left)
    return create_block_mask(window, None, None, T, T, device=device)


if COMPILE:  # never traced into a graph (torch.compiler.disable loads the compiler: seconds, so only when compiling)
    _build_sliding_window_block_mask = torch.compiler.disable(_build_sliding_window_block_mask)


def sliding_window_block_mask(T, left, device):
    """FlexAttention block mask in which query i sees keys i-left..i, built once per (T, left, device type).

    Built ahead of compilation (prepare_attention) it is a constant to the compiled model, with no graph break."""
    key = (T, left, device.type)  # one GPU per run: the type names it (q.device is cuda:0, main's is cuda)
    if key not in _block_masks:
        _block_masks[key] = _build_sliding_window_block_mask(T, left, device)
    return _block_masks[key]


def pytorch_attention(q, k, v, causal=False, window_size=(-1, -1)):
    """flash_attn_func's signature and defaults in PyTorch: (B, T, H, D) in and out; query i sees keys i-left..i."""
    assert causal and window_size[1] == 0, "only causal attention with a left window is implemented"
    T, left = q.size(1), window_size[0]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = q.size(1) != k.size(1)
    if left < 0 or left >= T - 1:  # the window holds the whole causal context: plain causal, no mask
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif torch.compiler.is_compiling():  # FlexAttention, fused by the compiler: blocks outside the window skipped
        y = flex_attention(q, k, v, block_mask=sliding_window_block_mask(T, left, q.device), enable_gqa=gqa)
    else:  # eager (no compile, MPS, CPU): a dense mask; FlexAttention unfused would hold B x H x T x T scores
        i = torch.arange(T, device=q.device)
        distance = i[:, None] - i[None, :]  # (T, T) query index minus key index
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(distance >= 0) & (distance <= left), enable_gqa=gqa)
    return y.transpose(1, 2)


def prepare_attention(seq_len, window_sizes, device):
    """Build the fallback's block masks before torch.compile traces the model."""
    for left, _ in set(window_sizes):
        sliding_window_block_mask(seq_len, left, device)


def hub_reachable(timeout=HUB_TIMEOUT):
    """Whether the kernel hub ($HF_ENDPOINT, default huggingface.co) answers within `timeout` seconds."""
    url = urlsplit(hf_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def check_attention_kernel(fn, device, compiled):
    """Raise unless fn runs forward and backward at the model's head size in bf16, and compiled too when training
    compiles: a build without a backward for this GPU, or that this torch cannot compile, fails here, not in training."""
    q, k, v = (torch.randn(1, 256, 2, 128, dtype=torch.bfloat16, device=device, requires_grad=True) for _ in range(3))
    attend = lambda q, k, v: fn(q, k, v, causal=True, window_size=(64, 0))
    for run in [attend] + ([torch.compile(attend, dynamic=False, fullgraph=True)] if compiled else []):
        grads = torch.autograd.grad(run(q, k, v).float().square().sum(), (q, k, v))
        if not all(torch.isfinite(g).all() for g in grads):
            raise RuntimeError("non-finite gradients")


def load_flash_attention_3(device="cuda", compiled=COMPILE):
    """FA3's flash_attn_func and the repository it came from, or None and the reason it did not load or run."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    repo = "varunneal/flash-attention-3" if (major, minor) == (9, 0) else "kernels-community/flash-attn3"
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # a kernel downloaded earlier still loads; nothing waits on the network
    try:
        from kernels import get_kernel
        fa3 = get_kernel(repo).flash_attn_interface.flash_attn_func
        check_attention_kernel(fa3, device, compiled)
        return fa3, repo
    except Exception as e:  # no network, no build for this GPU or torch, no kernels package: fall back
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        return None, f"{repo} did not load ({type(e).__name__}: {reason})"


def load_attention(device, compiled=COMPILE):
    """(flash_attn_func, a line naming it): the hub's Flash Attention 3 where it loads and passes its check on this GPU
    (the hub asked for 3 s at most, else its local cache), else pytorch_attention, and why. train.py calls it once,
    in main: importing this file reaches no network and sets no environment variable."""
    fa3, source = load_flash_attention_3(device, compiled)
    if fa3 is None:
        return pytorch_attention, f"PyTorch attention (SDPA; FlexAttention windows when compiled), because {source}"
    return fa3, f"Flash Attention 3 from {source}"

# ---------------------------------------------------------------------------
# Memory: how much a run may take, how much it took
# ---------------------------------------------------------------------------

def _proc_bytes(path, key):
    """A `key: N kB` line of a /proc file, in bytes; None where there is none (not Linux)."""
    try:
        with open(path) as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


def address_space_limit():
    """The soft limit on this process's address space (`ulimit -v`), or None: beyond it allocations fail."""
    try:
        import resource  # Unix only
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def memory_limit(device):
    """Bytes a run may hold on its device, in peak_memory()'s terms: the GPU's memory (this process's share),
    the working set MPS recommends, or the CPU's RAM: what the process holds plus the system's MemAvailable
    (less under a cgroup limit), counted in address space when an address-space limit is lower. None where
    it cannot be read (a CPU off Linux)."""
    if device.type == "cuda":  # the fraction's wrapper refuses a device without an index: train.py's "cuda"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory * torch.cuda.get_per_process_memory_fraction(index)
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    available = _proc_bytes(MEMINFO, "MemAvailable")
    rss, size = _proc_bytes(STATUS, "VmRSS"), _proc_bytes(STATUS, "VmSize")
    if None in (available, rss, size):
        return None
    for limit_path, usage_path in CGROUP_MEMORY:
        try:
            with open(limit_path) as f, open(usage_path) as g:
                available = min(available, int(f.read()) - int(g.read()))  # "max" (no limit) is a ValueError
            break
        except (OSError, ValueError):
            continue
    available = max(available, 0)
    if (address_space := address_space_limit()) is not None:
        return min(address_space, size + available)
    return rss + available


def peak_memory(device):
    """Most memory the process has held on the device: CUDA's peak, MPS's driver allocation (its cache keeps
    the peak), the CPU's peak resident set (or peak address space, under an address-space limit)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    return _proc_bytes(STATUS, "VmHWM" if address_space_limit() is None else "VmPeak")


def reset_peak_memory(device):
    """Start CUDA's peak over (the memory fit calls it last, so that its probes are not the run's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mb(device):
    """The summary's peak_vram_mb: the most CUDA memory allocated since the memory fit (training and
    evaluation), in MiB; 0.0 on the CPU and MPS, which have no such statistic."""
    return torch.cuda.max_memory_allocated(device) / 1024 / 1024 if device.type == "cuda" else 0.0

# ---------------------------------------------------------------------------
# The device: which one trains, glibc's allocator on the CPU, bf16's speed there
# ---------------------------------------------------------------------------

def training_device():
    """The device a run trains on: CUDA, else Apple's MPS, else the CPU, where glibc is then told to keep what is
    freed (keep_freed_memory)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    keep_freed_memory()
    return torch.device("cpu")


def keep_freed_memory():
    """Make glibc serve large tensors from its heap and keep what is freed for the next step, instead of handing
    every large block back to the kernel and faulting it in again: a CPU run otherwise spends about half its
    time in the kernel. The peak resident memory rises (the memory fit measures it). False off glibc, and
    under an address-space limit, where memory kept is address space lost: there glibc is told instead to
    serve every thread from one arena (a thread's own arena reserves 64 MB of address space as it starts,
    after the memory fit has measured) and to map and unmap every block of 256 kB or more (glibc otherwise
    raises that threshold as blocks are freed, and the heap's fragments grow the address space step by step
    past what the fit's probes measured)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8  # mallopt's parameters (malloc.h)
    if address_space_limit() is not None:
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)  # a fixed threshold: glibc no longer moves it
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def bf16_slowdown():
    """How many times slower a bf16 matmul is than a float32 one on this CPU: about 1 or less with bf16
    instructions (AVX512-BF16, AMX, Arm's BF16), 20 to 50 where bf16 is emulated. Measured once a process."""
    def seconds(x):
        times = []
        for _ in range(15):  # the first calls of a process are slow (thread pool, kernel selection): take the best
            t0 = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t0)
        return min(times)
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread each: a busy machine slows a thread pool far more than one thread
    try:
        return seconds(a.bfloat16()) / seconds(a)
    finally:
        torch.set_num_threads(threads)

# ---------------------------------------------------------------------------
# The GPU: the precision that trains, and its peak for the MFU
# ---------------------------------------------------------------------------

FORCE_FLOAT16 = "AUTORESEARCH_FLOAT16"  # =1: the float16 path on any device, to test it where bf16 runs (not a setting)
PEAK_FLOPS = {  # dense tensor-core peak of the dtype that trains, by a part of the device's name; the longest match wins
    # bf16 (as fp16 with fp32 accumulate), NVIDIA's datasheets and architecture papers
    "H100": 989.5e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,        # H100: 1,979 / 1,513 / 1,671 with sparsity
    "H200": 989.5e12, "H200 NVL": 835e12,                             # H200: as the H100 SXM and NVL
    "H800": 989.5e12, "H800 PCIe": 756e12,
    "B200": 2250e12,                                                  # HGX B200: 4.5 PFLOPS with sparsity
    "GB200": 2500e12,                                                 # GB200 NVL72: 360 PFLOPS sparse for 72 GPUs
    "A100": 312e12, "A800": 312e12,                                   # A100: 312 TFLOPS, 624 with sparsity
    "A10": 125e12,                                                    # A10: 125 TFLOPS, 250 with sparsity
    "A10G": None,                                                     # AWS's A10G: NVIDIA publishes no figure
    "L40S": 362.05e12, "L40": 181.05e12, "L4": 121e12,                # L40S 733, L40 362.1, L4 242 with sparsity
    "RTX 3090": 71e12,                                                # GA102 whitepaper: 71, 142 with sparsity
    "RTX 4090": 165.2e12,                                             # Ada whitepaper: 165.2, 330.4 with sparsity
    "RTX 5090": 209.5e12,                                             # Blackwell GeForce whitepaper: 209.5, 419
    "GB10": None,                                                     # DGX Spark: only an FP4 figure is published
    # fp16 with fp32 accumulate, on GPUs without bf16 (compute capability below 8.0)
    "T4": 65e12,                                                      # T4 datasheet: 65 TFLOPS mixed precision
    "V100-SXM2": 125e12, "V100-PCIE": 112e12, "V100S": 130e12,        # V100 datasheet: deep-learning (tensor) figures
    # AMD, through ROCm's torch.cuda: bf16 dense, the datasheets
    "MI300X": 1307.4e12,                                              # MI300X: 1,307.4 TFLOPS, 2,614.9 with sparsity
    "MI250X": 191.5e12,                                               # MI250X: 383 TFLOPS for two dies, one device each
}


def peak_flops(device_name):
    """The dense peak of the dtype that trains on a GPU, by its name ("NVIDIA L40" is an L40, not an L4; "NVIDIA A10G"
    no A10); None where unknown."""
    matches = [key for key in PEAK_FLOPS if key in device_name]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def autocast_dtype(device):
    """(dtype, why): what training and evaluation run in on `device`, and a line saying why. bf16 on GPUs of compute
    capability 8.0 and up; below, float16 with loss scaling (torch.cuda.is_bf16_supported() counts emulation and says
    yes on a T4: the capability decides); bf16 on MPS and on CPUs with bf16 instructions, float32 where a CPU
    emulates it (20 to 50 times slower)."""
    if os.environ.get(FORCE_FLOAT16) == "1":
        return torch.float16, f"float16 with loss scaling, because {FORCE_FLOAT16}=1 (the path for GPUs without bf16)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"bf16 (compute capability {major}.{minor})"
        return torch.float16, (f"float16 with loss scaling, because this GPU (compute capability {major}.{minor}) has no "
                               f"bf16: Muon orthogonalises in float16, the embeddings are float32")
    if device.type == "cpu" and (slowdown := bf16_slowdown()) >= 3:
        return torch.float32, f"float32, because this CPU has no bf16 instructions (bf16 matmuls {slowdown:.0f}x slower)"
    return torch.bfloat16, "bf16"

# ---------------------------------------------------------------------------
# Memory fit: the largest micro-batch that fits, the same tokens per optimizer step
# ---------------------------------------------------------------------------

def synchronize(device):
    """Wait for the device's queued work (CUDA, MPS); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


EVALUATION_GRAPHS = 2  # compiled graphs the evaluation adds (eval mode, no gradients, per-token losses; one spare)
HEADROOM = 0.85        # of what the CPU or MPS can still give, what an extrapolated size may take


def fit_micro_batch(model, optimizer, tokenizer, device, autocast_ctx, largest, seq_len, tokens_per_step):
    """The largest micro-batch up to `largest` (train.py's DEVICE_BATCH_SIZE) that keeps tokens_per_step exact
    and fits in memory: (size, seconds per micro-step). Says so in one line when it is smaller than `largest`,
    and in one line what the fit cost; exits with one line when not even 1 sequence fits. Leaves CUDA's peak
    memory reset, so the run reports its own.

    Sizes are probed from the largest down (Trial.probe); one whose allocation fails is skipped. On the CPU and
    MPS the kernel kills a process that takes too much instead of failing the allocation, so there a size that
    would not fit is never tried (sizes_that_fit)."""
    t_start = time.time()
    sizes = [b for b in range(largest, 0, -1) if tokens_per_step % (b * seq_len) == 0]
    recompile_limit = allow_a_graph_per_size(model, len(sizes))
    trial = Trial(model, optimizer, tokenizer, device, autocast_ctx, seq_len)
    limit = memory_limit(device)
    if device.type != "cuda" and limit is not None:
        sizes = sizes_that_fit(trial, sizes, limit)
    memory = f"{limit / 1e9:.1f} GB" if limit else "memory"
    for b in sizes:  # from the largest down: a failed allocation raises (CUDA, an address-space limit, MPS)
        if (seconds := trial.probe(b, 2)) is not None:
            if b < largest:
                print(f"DEVICE_BATCH_SIZE {largest} does not fit in {memory}: using {b}, "
                      f"{tokens_per_step // (b * seq_len)} accumulation steps", flush=True)
            probed, plural = len(trial.probed), "s" * (len(trial.probed) != 1)
            graphs = f", {probed} compiled graph{plural} (recompile limit {recompile_limit})" if recompile_limit else ""
            print(f"Memory fit: micro-batch {b}, {probed} size{plural} probed in {time.time() - t_start:.1f}s{graphs}",
                  flush=True)
            reset_peak_memory(device)
            return b, seconds
    sys.exit(f"error: not even a micro-batch of 1 sequence of {seq_len} tokens fits in {memory}; "
             f"make the model smaller (DEPTH, ASPECT_RATIO) and run again")


@dataclass
class Trial:
    """What the memory fit's probes run: the model and its optimizer on a train loader's batches of seq_len tokens,
    under autocast, on the device; and the sizes probed so far."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: object
    device: torch.device
    autocast_ctx: object
    seq_len: int
    probed: set = field(default_factory=set)

    def probe(self, b, count):
        """Seconds of a micro-step of b sequences, or None when b ran out of memory (what it allocated then handed
        back); the weights and the optimizer put back as they were, whatever happened."""
        self.probed.add(b)
        weights = [p.detach().clone() for p in self.model.parameters()]
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        try:
            return self.micro_steps(b, count)
        except Exception as e:  # the failed step's batch, loss and activations go with its frame
            if not is_out_of_memory(e):
                raise
        finally:
            with torch.no_grad():
                for p, w in zip(self.model.parameters(), weights):
                    p.copy_(w)
            self.optimizer.load_state_dict(optimizer_state)
            self.model.zero_grad(set_to_none=True)
        release_memory(self.device)  # once nothing of the failed probe is referenced
        return None

    def micro_steps(self, b, count):
        """Seconds of the last of `count` forward and backward passes on the first batch of a train loader of b
        sequences, kept open as in training (on the CPU its thread and buffers count too); the optimizer steps after
        the first (its state then stays, beside the gradients, as in every later training step). The first may
        compile."""
        loader = make_dataloader(self.tokenizer, b, self.seq_len, "train", device=next(self.model.parameters()).device)
        try:
            x, y, _ = next(loader)
            for micro_step in range(count):
                synchronize(self.device)
                t0 = time.time()
                with self.autocast_ctx:
                    loss = self.model(x, y)
                loss.backward()
                synchronize(self.device)
                if micro_step == 0:
                    self.optimizer.step()
            return time.time() - t0
        finally:
            loader.close()


def sizes_that_fit(trial, sizes, limit):
    """The sizes a machine that kills instead of failing an allocation (the CPU, MPS) can take: the peak memory of the
    two smallest, probed, extrapolated against `limit`, keeping HEADROOM for fragmentation and what a probe does not
    do. Sizes from the largest down, the probed ones included."""
    if len(sizes) < 2:
        return sizes
    b2, b1 = sizes[-2:]
    peaks = []
    for b in (b1, b2):
        if trial.probe(b, 1) is None:
            return sizes[-len(peaks):] if peaks else []
        peaks.append(peak_memory(trial.device))
    per_sequence = max(peaks[1] - peaks[0], 0) / (b2 - b1)
    return [b for b in sizes if b <= b2 or per_sequence * (b - b1) <= HEADROOM * (limit - peaks[0])]


def allow_a_graph_per_size(model, sizes):
    """A compiled model (dynamic=False) compiles a graph per micro-batch size the fit probes: torch.compile's recompile
    limit (8 by default) raised to every size plus the evaluation's graphs, so that past it torch never falls back to
    running the training or the evaluation eagerly. The limit; None for a model that is not compiled."""
    dynamo = sys.modules.get("torch._dynamo")  # loaded by torch.compile; importing it costs seconds otherwise
    if dynamo is None or not isinstance(model, dynamo.eval_frame.OptimizedModule):
        return None
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, sizes + EVALUATION_GRAPHS)
    return dynamo.config.recompile_limit
