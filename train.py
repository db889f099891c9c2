"""
The agent's sandbox: a GPT, the MuonAdamW optimizer and a training loop with a fixed time budget.
Everything in this file is fair game; prepare.py (data, tokenizer, evaluate_bpb) is not.

    uv run train.py > run.log 2>&1

Trains for TIME_BUDGET seconds of wall clock (compilation excluded), then evaluates val_bpb and prints a
summary block. Runs on CUDA, else MPS, else CPU; attention is Flash Attention 3 from the kernel hub when it
loads and runs here, else PyTorch attention with the same windows (machine.py picks it as main starts).
"""

import os
os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, Tokenizer, evaluate_bpb, make_dataloader
from machine import (COMPILE, autocast_dtype, cuda_peak_mb, fit_micro_batch, load_attention, peak_flops,
                     prepare_attention, pytorch_attention, synchronize, training_device)

flash_attn_func = pytorch_attention  # what the model's attention calls; main() loads the hub's Flash Attention 3 here

# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def norm(x):
    """RMS norm over the last dimension, no learned weight."""
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last layer always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    """Rotate the two halves of each head: x (B, T, H, D), cos and sin (1, T, 1, D/2)."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window_size):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding mixed in through a per-head gate in (0, 2)
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        y = flash_attn_func(q, k, v, causal=True, window_size=window_size)  # (B, T, n_head, head_dim)
        y = y.contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size):
        x = x + self.attn(norm(x), ve, cos_sin, window_size)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.window_sizes = self._compute_window_sizes(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)})
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self):
        """Embeddings normal(0, 1), lm_head normal(0, 0.001), block inputs uniform, output projections zero."""
        n_embd = self.config.n_embd
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * n_embd**-0.5  # uniform(-s, s) has the std of normal(0, 1/sqrt(n_embd))
        for block in self.transformer.h:
            for w in (block.attn.c_q.weight, block.attn.c_k.weight, block.attn.c_v.weight, block.mlp.c_fc.weight):
                torch.nn.init.uniform_(w, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate.weight)
        torch.nn.init.constant_(self.resid_lambdas, 1.0)
        torch.nn.init.constant_(self.x0_lambdas, 0.1)
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -s, s)
        self.transformer.wte.to(dtype=torch.bfloat16)
        for ve in self.value_embeds.values():
            ve.to(dtype=torch.bfloat16)
        head_dim = n_embd // self.config.n_head
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim, device=self.cos.device)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (seq_len, head_dim/2)
        cos, sin = freqs.cos().bfloat16(), freqs.sin().bfloat16()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, seq_len, 1, head_dim/2)

    @staticmethod
    def _compute_window_sizes(config):
        """(left, 0) per layer: L sees the whole sequence, S half of it; the last layer is always L."""
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= {"S", "L"}, f"WINDOW_PATTERN may only hold S and L, got {pattern!r}"
        long_window, short_window = config.sequence_len, config.sequence_len // 2
        sizes = [(long_window if pattern[i % len(pattern)] == "L" else short_window, 0) for i in range(config.n_layer)]
        sizes[-1] = (long_window, 0)
        return sizes

    def estimate_flops(self):
        """Training FLOPs per token: 6 per matmul weight, plus 12 * heads * head_dim * window per layer."""
        nparams = sum(p.numel() for p in self.parameters())
        excluded = (self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
                    + self.resid_lambdas.numel() + self.x0_lambdas.numel())
        h, d, t = self.config.n_head, self.config.n_embd // self.config.n_head, self.config.sequence_len
        attn_flops = sum(12 * h * d * (t if window[0] < 0 else min(window[0], t)) for window in self.window_sizes)
        return 6 * (nparams - excluded) + attn_flops

    def num_scaling_params(self):
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(ve.weight.numel() for ve in self.value_embeds.values()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
        }
        counts["total"] = sum(counts.values())
        return counts

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=(0.8, 0.95), scalar_lr=0.5):
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
        print(f"Scaling AdamW LRs by 1/sqrt({self.config.n_embd}/768) = {dmodel_lr_scale:.6f}")
        adamw = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        param_groups = [
            dict(adamw, params=[self.lm_head.weight], lr=unembedding_lr * dmodel_lr_scale),
            dict(adamw, params=[self.transformer.wte.weight], lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=[ve.weight for ve in self.value_embeds.values()], lr=embedding_lr * dmodel_lr_scale),
            dict(adamw, params=[self.resid_lambdas], lr=scalar_lr * 0.01),
            dict(adamw, params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95)),
        ]
        matrix_params = list(self.transformer.h.parameters())
        for shape in sorted({p.shape for p in matrix_params}):  # Muon updates each shape as one stack
            param_groups.append(dict(kind="muon", params=[p for p in matrix_params if p.shape == shape],
                                     lr=matrix_lr, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        assert sum(len(g["params"]) for g in param_groups) == len(list(self.parameters())), "a parameter has no group"
        optimizer = MuonAdamW([g for g in param_groups if g["params"]])
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        assert T <= self.cos.size(1), f"sequence of {T} tokens is longer than the rotary tables"
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))  # (B, T, n_embd)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i])
        x = norm(x)
        softcap = 15
        logits = self.lm_head(x).float()  # (B, T, vocab_size)
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)


def compile_model(model, device, backend="inductor", fullgraph=False):
    """torch.compile as the original compiles the model (static shapes), the fallback's masks built before tracing."""
    if flash_attn_func is pytorch_attention:
        prepare_attention(model.config.sequence_len, model.window_sizes, device)
    return torch.compile(model, dynamic=False, backend=backend, fullgraph=fullgraph)

# ---------------------------------------------------------------------------
# Optimizer: MuonAdamW (AdamW for embeddings, head and scalars; Muon for the block matrices)
# ---------------------------------------------------------------------------

def compile_step(fn, backend="inductor"):
    """torch.compile as the original compiles both optimizer steps: one graph (fullgraph), static shapes."""
    return torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)


POLAR_EXPRESS_COEFFS = [  # (a, b, c) per orthogonalisation step
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """One AdamW step in place; the hyperparameters are 0-d CPU tensors so new values never recompile."""
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)  # float32 weights, even for the bf16 embeddings' moments
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias_correction1 = 1 - beta1_t ** step_t
    bias_correction2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq / bias_correction2).sqrt() + eps_t
    p.add_(exp_avg / denom, alpha=-(lr_t / bias_correction1))


adamw_step_fused = compile_step(adamw_step) if COMPILE else adamw_step  # eager off CUDA: see COMPILE


def muon_step(stacked_grads, stacked_params, momentum_buffer, second_momentum_buffer,
                    momentum_t, lr_t, wd_t, beta2_t, ns_steps: int, red_dim: int, ortho_dtype=torch.bfloat16):
    """One Muon step on k same-shape matrices (k, rows, cols): Nesterov, Polar Express, NorMuon, cautious wd."""
    # Nesterov momentum
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)
    # Polar Express orthogonalisation, in bf16 (float16 on GPUs without bf16)
    X = g.to(ortho_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    if g.size(-2) > g.size(-1):  # tall: work with the small X^T X
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
    else:
        for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    # NorMuon: per-row (or per-column) second moment, then rescale to keep the update's norm
    n = X.size(red_dim)
    v_mean = X.float().square().mean(dim=red_dim, keepdim=True)  # (k, rows, 1) or (k, 1, cols)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    beta2 = beta2_t.to(X.dtype)  # bf16: the rate 1 - beta2 is 0.05078125 for beta2 = 0.95
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    norm_after = (v_mean * n * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    X = X * (step_size * (norm_before / norm_after.clamp_min(1e-10))).to(X.dtype)
    # cautious weight decay (only where update and parameter agree in sign) and the update
    lr = lr_t.to(X.dtype)
    wd = wd_t.to(X.dtype)
    mask = (X * stacked_params) >= 0
    stacked_params.sub_(lr * X + lr * wd * stacked_params * mask)


muon_step_fused = compile_step(muon_step) if COMPILE else muon_step


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over groups of kind 'adamw' (per parameter) and 'muon' (same-shape matrices, stacked)."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # hyperparameters reach the compiled steps as 0-d CPU tensors: changing them does not recompile
        names = ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum", "muon_lr", "muon_wd", "muon_beta2")
        self._t = {name: torch.tensor(0.0, dtype=torch.float32, device="cpu") for name in names}

    def _step_adamw(self, group):
        t = self._t
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t["step"].fill_(state["step"])
            t["lr"].fill_(group["lr"])
            t["beta1"].fill_(group["betas"][0])
            t["beta2"].fill_(group["betas"][1])
            t["eps"].fill_(group["eps"])
            t["wd"].fill_(group["weight_decay"])
            adamw_step_fused(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _step_muon(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        t = self._t
        rows, cols = params[0].shape
        state = self.state[params[0]]
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(moment_shape, dtype=params[0].dtype, device=params[0].device)
        red_dim = -1 if rows >= cols else -2
        stacked_grads = torch.stack([p.grad for p in params])
        stacked_params = torch.stack(params)
        t["momentum"].fill_(group["momentum"])
        t["muon_lr"].fill_(group["lr"] * max(1.0, rows / cols) ** 0.5)
        t["muon_wd"].fill_(group["weight_decay"])
        t["muon_beta2"].fill_(group["beta2"])
        muon_step_fused(stacked_grads, stacked_params, state["momentum_buffer"], state["second_momentum_buffer"],
                        t["momentum"], t["muon_lr"], t["muon_wd"], t["muon_beta2"], group["ns_steps"], red_dim,
                        group.get("ortho_dtype", torch.bfloat16))
        torch._foreach_copy_(params, list(stacked_params.unbind(0)))

    def step(self):
        with torch.no_grad():
            for group in self.param_groups:
                if group["kind"] == "adamw":
                    self._step_adamw(group)
                else:
                    self._step_muon(group)

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags)
# ---------------------------------------------------------------------------

# Model shape
ASPECT_RATIO = 64           # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128              # width of one attention head; heads = model_dim / HEAD_DIM
WINDOW_PATTERN = "SSSL"     # attention window per layer, repeated: L = whole context, S = half; last layer L

# Optimization
TOTAL_BATCH_SIZE = 2**19    # tokens per optimizer step (about 524K), reached by gradient accumulation
EMBEDDING_LR = 0.6          # AdamW lr of the token and value embeddings
UNEMBEDDING_LR = 0.004      # AdamW lr of lm_head
MATRIX_LR = 0.04            # Muon lr of the matrices inside the blocks
SCALAR_LR = 0.5             # AdamW lr of the per-layer residual scalars
WEIGHT_DECAY = 0.2          # Muon's cautious weight decay, decayed linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)    # AdamW (beta1, beta2)
WARMUP_RATIO = 0.0          # fraction of the time budget spent warming the lr up
WARMDOWN_RATIO = 0.5        # fraction of the time budget at the end spent decaying the lr
FINAL_LR_FRAC = 0.0         # lr at the end of the warmdown, as a fraction of the initial lr

# Model size and memory
DEPTH = 8                   # transformer layers
DEVICE_BATCH_SIZE = 128     # sequences per forward/backward; lower it if memory runs out

# ---------------------------------------------------------------------------
# Schedules (driven by the fraction of the time budget used)
# ---------------------------------------------------------------------------

def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


# ---------------------------------------------------------------------------
# Setup: device, tokenizer, model, optimizer, dataloader
# ---------------------------------------------------------------------------

def main():
    global flash_attn_func
    t_start = time.time()
    torch.manual_seed(42)
    torch.cuda.manual_seed(42)
    torch.set_float32_matmul_precision("high")
    device = training_device()
    flash_attn_func, attention = load_attention(device)
    print(f"Attention: {attention}", flush=True)  # the hub's Flash Attention 3, or PyTorch's with the same windows
    if device.type == "cuda" and not COMPILE:
        print("Compile: off, because Triton is not installed (Windows, some CUDA installs): running eagerly, slower")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = peak_flops(device_name)
    print(f"Device: {device_name} (peak: {f'{peak / 1e12:.1f} TFLOP/s' if peak else 'unknown, MFU n/a'})")
    dtype, why = autocast_dtype(device)
    print(f"Precision: {why}")
    autocast_ctx = torch.amp.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # float16's narrow range

    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    if TOTAL_BATCH_SIZE % tokens_per_fwdbwd != 0:
        working = [b for b in range(1, TOTAL_BATCH_SIZE // MAX_SEQ_LEN + 1) if TOTAL_BATCH_SIZE % (b * MAX_SEQ_LEN) == 0]
        sys.exit(f"error: TOTAL_BATCH_SIZE = {TOTAL_BATCH_SIZE} is not a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN = "
                 f"{DEVICE_BATCH_SIZE} * {MAX_SEQ_LEN}; set DEVICE_BATCH_SIZE to one of {working or 'none'}"
                 f" or TOTAL_BATCH_SIZE to a multiple of {tokens_per_fwdbwd}")

    tokenizer = Tokenizer.from_directory()
    vocab_size = tokenizer.get_vocab_size()
    print(f"Vocab size: {vocab_size:,}")

    model_dim = ((DEPTH * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    num_heads = model_dim // HEAD_DIM
    config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=num_heads,
                       n_kv_head=num_heads, n_embd=model_dim, window_pattern=WINDOW_PATTERN)
    print(f"Model config: {asdict(config)}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if dtype != torch.bfloat16:
        model.float()  # the embeddings are stored in bf16: float32 here (the loss scaler refuses float16 gradients)

    param_counts = model.num_scaling_params()
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    num_params = param_counts["total"]
    num_flops_per_token = model.estimate_flops()
    print(f"Estimated FLOPs per token: {num_flops_per_token:e}")

    optimizer = model.setup_optimizer(unembedding_lr=UNEMBEDDING_LR, embedding_lr=EMBEDDING_LR, matrix_lr=MATRIX_LR,
                                      weight_decay=WEIGHT_DECAY, adam_betas=ADAM_BETAS, scalar_lr=SCALAR_LR)
    if dtype == torch.float16:  # Polar Express in float16 where bf16 is missing (docs/small-machines.md)
        for group in (g for g in optimizer.param_groups if g["kind"] == "muon"):
            group["ortho_dtype"] = torch.float16
    if COMPILE:
        model = compile_model(model, device)

    # the largest micro-batch up to DEVICE_BATCH_SIZE that fits (the same tokens per step: more accumulation)
    micro_batch, micro_step_seconds = fit_micro_batch(model, optimizer, tokenizer, device, autocast_ctx,
                                                      DEVICE_BATCH_SIZE, MAX_SEQ_LEN, TOTAL_BATCH_SIZE)
    train_loader = make_dataloader(tokenizer, micro_batch, MAX_SEQ_LEN, "train")
    x, y, epoch = next(train_loader)  # prefetch first batch
    grad_accum_steps = TOTAL_BATCH_SIZE // (micro_batch * MAX_SEQ_LEN)
    step_seconds = grad_accum_steps * micro_step_seconds
    expected_seconds = 11 * step_seconds + max(TIME_BUDGET, step_seconds) + EVAL_TOKENS / TOTAL_BATCH_SIZE * step_seconds / 3
    if expected_seconds > 2 * TIME_BUDGET:  # 11 uncounted steps, the budget, the evaluation (forward only)
        print(f"warning: this machine is slow for these settings: about {step_seconds:.1f}s per optimizer step, so this "
              f"run will take about {expected_seconds / 60:.1f} minutes for a {TIME_BUDGET / 60:.1f}-minute budget "
              f"(see docs/small-machines.md)")

    print(f"Time budget: {TIME_BUDGET}s")
    print(f"Gradient accumulation steps: {grad_accum_steps}")

    # ---------------------------------------------------------------------------
    # Training loop
    # ---------------------------------------------------------------------------

    smooth_train_loss = 0.0
    total_training_time = 0.0
    counted_steps = 0
    skipped_steps = 0
    step = 0

    while True:
        synchronize(device)
        t0 = time.time()
        for micro_step in range(grad_accum_steps):
            with autocast_ctx:
                loss = model(x, y)
            train_loss = loss.detach()
            loss = loss / grad_accum_steps
            (scaler.scale(loss) if scaler else loss).backward()
            x, y, epoch = next(train_loader)

        progress = min(total_training_time / TIME_BUDGET, 1.0)
        lrm = get_lr_multiplier(progress)
        muon_momentum = get_muon_momentum(step)
        muon_weight_decay = get_weight_decay(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
        if scaler:  # float16: the step unscales; a step whose gradients overflowed is skipped, the scale lowered
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped_steps += scaler.get_scale() < scale
        else:
            optimizer.step()
        model.zero_grad(set_to_none=True)

        train_loss_f = train_loss.item()
        if math.isnan(train_loss_f) or train_loss_f > 100:  # fast fail: the run has diverged
            print("FAIL")
            sys.exit(1)

        synchronize(device)
        dt = time.time() - t0
        if step > 10:  # the first steps absorb compilation and are not counted
            total_training_time += dt
            counted_steps += 1

        ema_beta = 0.9
        smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss_f
        debiased_smooth_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
        pct_done = 100 * progress
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu = f"{100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / peak:.1f}%" if peak else "n/a"
        remaining = max(0, TIME_BUDGET - total_training_time)
        print(f"\rstep {step:05d} ({pct_done:.1f}%) | loss: {debiased_smooth_loss:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt * 1000:.0f}ms | tok/sec: {tok_per_sec:,} | mfu: {mfu} | epoch: {epoch} | "
              f"remaining: {remaining:.0f}s    ", end="", flush=True)

        # Python's collector pauses for ~500ms at random; collect once, freeze what survives, then stay off
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1
        if step > 10 and total_training_time >= TIME_BUDGET:
            break

    print()  # end the \r progress line
    train_loader.close()
    total_tokens = step * TOTAL_BATCH_SIZE

    # ---------------------------------------------------------------------------
    # Evaluation and summary
    # ---------------------------------------------------------------------------

    model.eval()
    with autocast_ctx:
        val_bpb = evaluate_bpb(model, tokenizer, micro_batch, training_seconds=total_training_time)
    t_end = time.time()

    if peak and total_training_time > 0:
        mfu_percent = f"{100 * num_flops_per_token * TOTAL_BATCH_SIZE * counted_steps / total_training_time / peak:.2f}"
    else:
        mfu_percent = "n/a"
    peak_vram_mb = cuda_peak_mb(device)  # training and evaluation: the memory fit reset the peak
    if scaler:
        print(f"Loss scaling: {skipped_steps} of {step} optimizer steps skipped (float16 gradients overflowed)")

    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
    print(f"mfu_percent:      {mfu_percent}")
    print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")


if __name__ == "__main__":
    main()
