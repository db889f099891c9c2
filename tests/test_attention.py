"""Attention: the PyTorch fallback against a naive masked softmax, forward and backward, with the kernel's windows.

Covers the three paths of machine.pytorch_attention (causal SDPA for full windows, a dense mask when called
eagerly, the FlexAttention block mask inside a compiled graph, chosen per call; the block mask is also checked
on the CPU) for windows S, L, the forced-L last layer and the edges 0 and T-1, with several query/key-value head
counts. On CUDA, Flash Attention 3 from the kernel hub against the naive reference when the hub kernel loads.

    uv run pytest tests/test_attention.py
"""

import functools
import math

import pytest
import torch

import machine
import train

T = 64


def naive_attention(q, k, v, left):
    """Softmax over keys j with i - left <= j <= i, computed on a full (T x T) score matrix; (B, T, H, D) layout."""
    B, T, Hq, D = q.shape
    repeat = Hq // k.size(2)  # query head h reads key/value head h // repeat
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (j >= i - left)
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


def random_qkv(n_head, n_kv_head, dtype=torch.float64, device="cpu", seed=0, length=T):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, length, n_head, 16), (2, length, n_kv_head, 16), (2, length, n_kv_head, 16)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def windows_of_a_model():
    """The distinct windows GPT gives its layers at sequence length T: S, L, and L forced onto the last layer."""
    config = train.GPTConfig(sequence_len=T, n_layer=3, window_pattern="SSS")
    sizes = train.GPT._compute_window_sizes(config)
    assert sizes == [(T // 2, 0), (T // 2, 0), (T, 0)]
    return sorted({left for left, _ in sizes})


WINDOWS = windows_of_a_model() + [0, 1, T - 2, T - 1, -1]
HEADS = [(4, 4), (4, 2), (4, 1)]


def assert_same_forward_backward(fn, q, k, v, left, atol, backward=True):
    out = fn(q, k, v) if backward else fn(q.detach(), k.detach(), v.detach())
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_inputs, left if left >= 0 else T)
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=atol)
    if not backward:
        return
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, ref_inputs, torch.ones_like(ref))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double().cpu(), rg, atol=atol, rtol=atol)


@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
@pytest.mark.parametrize("left", WINDOWS)
def test_fallback_matches_naive_attention(left, n_head, n_kv_head):
    q, k, v = random_qkv(n_head, n_kv_head)
    fallback = lambda q, k, v: machine.pytorch_attention(q, k, v, causal=True, window_size=(left, 0))
    assert_same_forward_backward(fallback, q, k, v, left, atol=1e-10)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
@pytest.mark.parametrize("left", [0, 1, T // 2, T - 2])
def test_flex_block_mask_matches_naive_attention(left, n_head, n_kv_head):
    """The CUDA path's block mask, run through FlexAttention's eager implementation on the CPU.

    torch 2.9 (the locked version) runs FlexAttention's backward on the CPU; later releases refuse it."""
    q, k, v = random_qkv(n_head, n_kv_head)
    mask = machine.sliding_window_block_mask(T, left, torch.device("cpu"))

    def flex(q, k, v):
        y = machine.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                                 enable_gqa=n_head != n_kv_head)
        return y.transpose(1, 2)

    cpu_backward = torch.__version__.startswith("2.9.")
    assert_same_forward_backward(flex, q, k, v, left, atol=1e-10, backward=cpu_backward)


def test_window_is_left_plus_one_keys_not_left():
    """Off-by-one guard: with window (left, 0), query i must see key i - left (the kernel does)."""
    q, k, v = (t.detach() for t in random_qkv(1, 1))
    left = 4
    out = machine.pytorch_attention(q, k, v, causal=True, window_size=(left, 0))
    v2 = v.clone()
    v2[:, 10 - left] += 100.0  # key 6 is inside query 10's window, key 5 is not
    assert not torch.allclose(machine.pytorch_attention(q, k, v2, causal=True, window_size=(left, 0))[:, 10], out[:, 10])
    v3 = v.clone()
    v3[:, 10 - left - 1] += 100.0
    torch.testing.assert_close(machine.pytorch_attention(q, k, v3, causal=True, window_size=(left, 0))[:, 10], out[:, 10])


@pytest.mark.parametrize("length", [2, 4])
@pytest.mark.parametrize("left", [-1, 0])
def test_grouped_query_heads_at_any_sequence_length(length, left):
    """4 query heads on 2 key/value heads where T equals one head count or the other (sizes not to be confused)."""
    q, k, v = random_qkv(4, 2, length=length)
    out = machine.pytorch_attention(q, k, v, causal=True, window_size=(left, 0))
    torch.testing.assert_close(out, naive_attention(q, k, v, left if left >= 0 else length))


@pytest.mark.parametrize("kwargs", [dict(), dict(causal=False, window_size=(-1, 0)),
                                    dict(causal=True, window_size=(-1, -1)), dict(causal=True, window_size=(4, 4))])
def test_only_causal_attention_with_a_left_window_is_accepted(kwargs):
    """The kernel's defaults (not causal, no window) and right windows are refused, not silently made causal."""
    q, k, v = (t.detach() for t in random_qkv(2, 2))
    with pytest.raises(AssertionError, match="only causal attention with a left window is implemented"):
        machine.pytorch_attention(q, k, v, **kwargs)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("compiled", [True, False])
def test_the_window_path_is_chosen_per_call(monkeypatch, compiled):
    """FlexAttention only inside a compiled graph (where the compiler fuses it); an eager call (an agent that
    drops torch.compile, an evaluation that falls back) takes the dense mask, never FlexAttention unfused."""
    left = T // 2
    q, k, v = (t.detach().float() for t in random_qkv(2, 2))
    expected = naive_attention(q.double(), k.double(), v.double(), left).float()
    machine.sliding_window_block_mask(T, left, q.device)  # built ahead of compilation, as main does
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    attention = lambda q, k, v: machine.pytorch_attention(q, k, v, causal=True, window_size=(left, 0))
    if compiled:
        torch._dynamo.reset()
        out = torch.compile(attention, backend=recording_backend, fullgraph=True)(q, k, v)
        calls = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
        assert any("flex_attention" in c for c in calls) and not any("scaled_dot_product" in c for c in calls), calls
        torch._dynamo.reset()
    else:
        def unfused(*args, **kwargs):
            raise AssertionError("FlexAttention called eagerly")

        monkeypatch.setattr(machine, "flex_attention", unfused)
        out = attention(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --- CUDA only: the hub kernel against the fallback -------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
@pytest.mark.parametrize("left", [T // 2, T, 0, 1])
def test_cuda_fallback_in_bf16_matches_naive(left, n_head, n_kv_head):
    q, k, v = random_qkv(n_head, n_kv_head, dtype=torch.bfloat16, device="cuda")
    fallback = lambda q, k, v: machine.pytorch_attention(q, k, v, causal=True, window_size=(left, 0))
    assert_same_forward_backward(fallback, q, k, v, left, atol=3e-2)


@functools.cache
def hub_kernel():
    """What train.py's main loads on this GPU, looked for once: (the function, the line naming it)."""
    return machine.load_attention(torch.device("cuda"))


@cuda
@pytest.mark.parametrize("n_head,n_kv_head", HEADS)
@pytest.mark.parametrize("left", [T // 2, T, 0, 1])
def test_hub_kernel_matches_fallback(left, n_head, n_kv_head):
    kernel, attention = hub_kernel()
    if kernel is machine.pytorch_attention:
        why = "hub unreachable" if not machine.hub_reachable() else "the hub's kernel did not load"
        pytest.skip(f"not run: {why} ({attention})")
    q, k, v = random_qkv(n_head, n_kv_head, dtype=torch.bfloat16, device="cuda")
    attend = lambda q, k, v: kernel(q, k, v, causal=True, window_size=(left, 0))
    assert_same_forward_backward(attend, q, k, v, left, atol=3e-2)
