"""GPT.forward against an independent forward written here, at random non-zero weights; compiled, against eager.

At initialisation every block's output projection and every value-embedding gate is zero, so a forward
there cannot see attention, QK-norm, rotary, the MLP's activation, the gate or the lambdas. Here every
weight is random (projections, gates and lambdas included) and the reference below recomputes the model
with plain tensor operations (no module of train.py is reused): logits, per-token and mean losses, and
the gradient of every parameter must agree, in float64, for S and L windows, the last layer forced to L,
grouped-query heads, and logits pushed far past the softcap of 15.

    uv run pytest tests/test_forward_reference.py
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.debugging import aot_eager

import machine
import train

SEQ = 16  # config.sequence_len: the S window (SEQ // 2) is shorter than the input, so its mask matters
VOCAB, WIDTH = 96, 64


def rms_norm(x):
    return x / torch.sqrt(x.square().mean(dim=-1, keepdim=True))


def rotary_tables(T, head_dim):
    """cos and sin of position * 10000^(-2i/head_dim), i < head_dim/2, rounded to bf16 as the model stores them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    return angles.cos().bfloat16().double(), angles.sin().bfloat16().double()


def rotate(x, cos, sin):
    """x (B, T, H, D): first half x1, second half x2 -> (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def windowed_attention(q, k, v, left):
    """Query i attends to keys j with i - left <= j <= i; kv head h // (Hq / Hkv) serves query head h. One query
    at a time, over the slice of keys it sees (tests/test_attention.py's reference masks a full score matrix)."""
    B, T, Hq, D = q.shape
    group = Hq // k.size(2)
    out = torch.empty_like(q)
    for h in range(Hq):
        for i in range(T):
            first = max(0, i - left)
            keys, values = k[:, first:i + 1, h // group], v[:, first:i + 1, h // group]  # (B, keys, D)
            weights = torch.softmax((keys @ q[:, i, h, :, None]).squeeze(-1) / math.sqrt(D), dim=-1)  # (B, keys)
            out[:, i, h] = (weights[:, :, None] * values).sum(dim=1)
    return out


def reference_forward(W, idx, n_layer, n_head, n_kv_head, pattern):
    """Raw (uncapped) and capped logits of the GPT as the original builds it, from a dict of weights named as in the
    model."""
    B, T = idx.shape
    head_dim = WIDTH // n_head
    cos, sin = rotary_tables(T, head_dim)
    lefts = [SEQ if pattern[i % len(pattern)] == "L" else SEQ // 2 for i in range(n_layer)]
    lefts[-1] = SEQ
    x = rms_norm(W["transformer.wte.weight"][idx])
    x0 = x
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        x = W["resid_lambdas"][i] * x + W["x0_lambdas"][i] * x0
        h = rms_norm(x)
        q = (h @ W[p + "attn.c_q.weight"].T).view(B, T, n_head, head_dim)
        k = (h @ W[p + "attn.c_k.weight"].T).view(B, T, n_kv_head, head_dim)
        v = (h @ W[p + "attn.c_v.weight"].T).view(B, T, n_kv_head, head_dim)
        if i % 2 == (n_layer - 1) % 2:  # value embedding layers: alternating, the last one included
            ve = W[f"value_embeds.{i}.weight"][idx].view(B, T, n_kv_head, head_dim)
            gate = 2 * torch.sigmoid(h[..., :32] @ W[p + "attn.ve_gate.weight"].T)  # (B, T, n_kv_head)
            v = v + gate[..., None] * ve
        q, k = rms_norm(rotate(q, cos, sin)), rms_norm(rotate(k, cos, sin))
        y = windowed_attention(q, k, v, lefts[i]).reshape(B, T, WIDTH)
        x = x + y @ W[p + "attn.c_proj.weight"].T
        h = rms_norm(x)
        x = x + torch.relu(h @ W[p + "mlp.c_fc.weight"].T).square() @ W[p + "mlp.c_proj.weight"].T
    raw = rms_norm(x) @ W["lm_head.weight"].T
    return raw, 15 * torch.tanh(raw / 15)


def random_model(n_layer, n_head, n_kv_head, pattern, head_std, seed=0):
    """The model in float64 with every parameter random and non-zero; also the same weights as plain leaves."""
    config = train.GPTConfig(sequence_len=SEQ, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head,
                             n_kv_head=n_kv_head, n_embd=WIDTH, window_pattern=pattern)
    model = train.GPT(config)
    model.init_weights()
    model.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name == "resid_lambdas":
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64))
            elif name == "x0_lambdas":
                p.copy_(0.2 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64))
            elif name == "lm_head.weight":
                p.copy_(noise * head_std)
            elif "wte" in name or "value_embeds" in name:
                p.copy_(noise)
            else:  # block matrices and gates, scaled by fan-in so that activations stay of order one
                p.copy_(noise / p.size(1) ** 0.5)
    weights = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    return model, weights


CASES = [  # n_layer, n_head, n_kv_head, pattern
    (2, 4, 4, "SL"),     # one S layer, one L layer
    (3, 4, 2, "S"),      # S, S, and the last layer forced to L; grouped-query attention, 2 query heads per kv head
    (3, 4, 1, "SSSL"),   # S, S, L; multi-query
]


@pytest.fixture(autouse=True)
def cpu_attention(monkeypatch):
    """The model on the CPU goes through the PyTorch fallback even where a hub kernel loaded."""
    monkeypatch.setattr(train, "flash_attn_func", machine.pytorch_attention)


def data(seed=1, B=3):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    targets[0, :4] = -1  # ignored positions
    return idx, targets


@pytest.mark.parametrize("head_std", [0.2, 6.0], ids=["moderate-logits", "logits-past-the-softcap"])
@pytest.mark.parametrize("n_layer,n_head,n_kv_head,pattern", CASES)
def test_logits_and_losses_equal_the_reference(n_layer, n_head, n_kv_head, pattern, head_std):
    model, W = random_model(n_layer, n_head, n_kv_head, pattern, head_std)
    idx, targets = data()
    with torch.no_grad():
        raw, expected = reference_forward(W, idx, n_layer, n_head, n_kv_head, pattern)
        logits = model(idx)
        per_token = model(idx, targets, reduction="none")
        mean = model(idx, targets)
    if head_std > 1:
        assert raw.abs().max() > 45 and (raw.abs() > 15).float().mean() > 0.3  # the cap is doing real work
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    ref_per_token = F.cross_entropy(expected.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_token.double(), ref_per_token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_per_token.sum() / (targets >= 0).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_std", [0.2, 6.0], ids=["moderate-logits", "logits-past-the-softcap"])
@pytest.mark.parametrize("n_layer,n_head,n_kv_head,pattern", CASES)
def test_gradients_of_every_parameter_equal_the_reference(n_layer, n_head, n_kv_head, pattern, head_std):
    model, W = random_model(n_layer, n_head, n_kv_head, pattern, head_std)
    idx, targets = data()
    model(idx, targets).backward()
    _, logits = reference_forward(W, idx, n_layer, n_head, n_kv_head, pattern)
    F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1).backward()
    for name, p in model.named_parameters():
        expected = W[name].grad
        assert expected.abs().max() > 0, f"{name} gets no gradient in the reference"
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")



# --- the model compiled as train.py compiles it ------------------------------------------------------------

@pytest.mark.skipif("MUTANT_UNDER_TEST" in __import__("os").environ, reason="mutmut's trampolines cannot be compiled")
@pytest.mark.parametrize("n_layer,n_head,n_kv_head,pattern", [CASES[1]])
def test_the_compiled_model_is_one_graph_with_the_eager_loss_and_gradients(n_layer, n_head, n_kv_head, pattern):
    """train.compile_model with torch's aot_eager backend and fullgraph=True (stricter than train.py: a graph
    break is an error): the windows go through FlexAttention's block mask inside the graph, the eager model
    through the dense mask, and both give the same loss and gradients. Inductor cannot take this graph on the CPU
    in torch 2.9.1 (its FlexAttention lowering there is for inference only): the GPU check compiles it for real."""
    eager, _ = random_model(n_layer, n_head, n_kv_head, pattern, head_std=0.2)
    model, _ = random_model(n_layer, n_head, n_kv_head, pattern, head_std=0.2)
    idx, targets = data()
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = train.compile_model(model, idx.device, backend=recording_aot_eager, fullgraph=True)
    loss = compiled(idx, targets)
    loss.backward()
    expected = eager(idx, targets)
    expected.backward()
    torch._dynamo.reset()
    assert len(graphs) == 1 and sum("flex_attention" in target for target in graphs[0]) == n_layer - 1, graphs
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert q.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12 * q.grad.abs().max().item(), msg=lambda m: f"{name}: {m}")
