"""The GPT in train.py: parameter count, FLOPs per token, value-embedding layers, windows, forward contract.

Counts are computed here from the architecture (per layer q, k, v, projection and MLP; the embeddings, lm_head and
value embeddings; gates and scalars), independently of the model code, and the default model (depth 8, vocab
8192) must come to the known 50.3 M parameters.

    uv run pytest tests/test_model.py
"""

import pytest
import torch
import torch.nn.functional as F

import train


def default_config(depth=8, vocab=8192, seq=2048, pattern="SSSL"):
    """What train.py builds from its default constants."""
    model_dim = -(-depth * train.ASPECT_RATIO // train.HEAD_DIM) * train.HEAD_DIM
    heads = model_dim // train.HEAD_DIM
    return train.GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads,
                           n_embd=model_dim, window_pattern=pattern)


def meta_model(config):
    with torch.device("meta"):
        return train.GPT(config)


def test_default_constants_are_the_originals():
    assert (train.ASPECT_RATIO, train.HEAD_DIM, train.WINDOW_PATTERN) == (64, 128, "SSSL")
    assert (train.TOTAL_BATCH_SIZE, train.DEPTH, train.DEVICE_BATCH_SIZE) == (2**19, 8, 128)
    assert (train.EMBEDDING_LR, train.UNEMBEDDING_LR, train.MATRIX_LR, train.SCALAR_LR) == (0.6, 0.004, 0.04, 0.5)
    assert (train.WEIGHT_DECAY, train.ADAM_BETAS) == (0.2, (0.8, 0.95))
    assert (train.WARMUP_RATIO, train.WARMDOWN_RATIO, train.FINAL_LR_FRAC) == (0.0, 0.5, 0.0)


def test_parameter_count_at_depth_8():
    V, C, L = 8192, 512, 8  # depth 8 * aspect 64 = 512, already a multiple of 128: 4 heads of 128
    ve_layers = [1, 3, 5, 7]  # i % 2 == (L - 1) % 2
    per_layer = 4 * C * C + 2 * 4 * C * C  # q, k, v, proj; fc, proj
    expected = {
        "wte": V * C,
        "value_embeds": len(ve_layers) * V * C,
        "lm_head": V * C,
        "transformer_matrices": L * per_layer + len(ve_layers) * 32 * 4,  # ve_gate: 32 -> 4 heads
        "scalars": 2 * L,
    }
    expected["total"] = sum(expected.values())
    model = meta_model(default_config())
    assert model.num_scaling_params() == expected
    assert sum(p.numel() for p in model.parameters()) == expected["total"]
    assert round(expected["total"] / 1e6, 1) == 50.3  # the original's num_params_M


def test_flops_per_token_at_depth_8():
    C, T, heads, head_dim = 512, 2048, 4, 128
    matmul_weights = 8 * (12 * C * C) + 4 * (32 * 4) + 8192 * C  # blocks (with ve gates) and lm_head
    windows = [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]  # SSSL SSSL, last layer L
    expected = 6 * matmul_weights + sum(12 * heads * head_dim * w for w in windows)
    assert meta_model(default_config()).estimate_flops() == expected


def test_flops_per_token_for_windows_minus_one_whole_and_half():
    """flash_attn_func's -1 means no limit: the whole sequence, as a window of T does; T/2 counts half."""
    C, T, heads, head_dim = 128, 256, 1, 128
    model = meta_model(train.GPTConfig(sequence_len=T, vocab_size=512, n_layer=3, n_head=heads, n_kv_head=heads,
                                       n_embd=C))
    model.window_sizes = [(-1, 0), (T, 0), (T // 2, 0)]
    matmul_weights = 3 * (12 * C * C) + 2 * (32 * 1) + 512 * C  # blocks (ve gates on layers 0 and 2), lm_head
    expected = 6 * matmul_weights + 12 * heads * head_dim * (256 + 256 + 128)
    assert model.estimate_flops() == expected


@pytest.mark.parametrize("depth", [1, 2, 5, 8])
def test_value_embeddings_on_alternating_layers_ending_with_the_last(depth):
    model = meta_model(default_config(depth=depth))
    layers = sorted(int(i) for i in model.value_embeds)
    assert layers == list(range(depth - 1, -1, -2))[::-1]
    for i, block in enumerate(model.transformer.h):
        assert (block.attn.ve_gate is not None) == (i in layers)


@pytest.mark.parametrize("pattern,depth,expected", [
    ("SSSL", 8, "SSSLSSSL"),
    ("SSSL", 6, "SSSLSL"),   # the last layer is forced to L
    ("L", 3, "LLL"),
    ("SL", 4, "SLSL"),
    ("S", 3, "SSL"),
])
def test_window_sizes_per_layer(pattern, depth, expected):
    T = 2048
    sizes = meta_model(default_config(depth=depth, pattern=pattern)).window_sizes
    assert sizes == [(T if c == "L" else T // 2, 0) for c in expected]
    assert all(type(left) is int for left, _ in sizes)  # the kernel takes ints: 1024.0 would equal 1024 above


@pytest.mark.parametrize("pattern", ["SSX", "", "S L"])
def test_window_patterns_other_than_s_and_l_are_refused(pattern):
    with pytest.raises(AssertionError, match="WINDOW_PATTERN may only hold S and L"):
        train.GPT._compute_window_sizes(default_config(pattern=pattern))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = train.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    model = train.GPT(config)
    model.init_weights()
    return model


def test_initialisation():
    model = tiny_model()
    s = 3**0.5 * 64**-0.5
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
        assert 0 < block.attn.c_q.weight.abs().max() <= s
    assert model.transformer.h[1].attn.ve_gate.weight.abs().max() == 0
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.value_embeds["1"].weight.dtype == torch.bfloat16
    assert torch.equal(model.resid_lambdas, torch.ones(2)) and torch.allclose(model.x0_lambdas, torch.full((2,), 0.1))
    assert 0.0005 < model.lm_head.weight.std() < 0.002


def test_initial_weights_have_specs_distributions():
    """wte ~ N(0, 1), lm_head ~ N(0, 0.001), the input matrices and value embeddings ~ U(-s, s), s = sqrt(3/n_embd)."""
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=32, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256))
    model.init_weights()

    def assert_normal(w, std):
        w = w.float()
        assert abs(w.mean()) < 0.02 * std and abs(w.std() / std - 1) < 0.02, (w.mean(), w.std())

    assert_normal(model.transformer.wte.weight, 1.0)
    assert_normal(model.lm_head.weight, 0.001)
    s = (3 / 256) ** 0.5
    uniform = [model.value_embeds["1"].weight] + [w for block in model.transformer.h for w in
                                                   (block.attn.c_q.weight, block.attn.c_k.weight,
                                                    block.attn.c_v.weight, block.mlp.c_fc.weight)]
    bound = s * (1 + 2**-8)  # the value embeddings are stored in bf16, which may round a draw past s
    for w in uniform:  # 65 536 draws or more: the extremes come within 1 % of the bounds
        w = w.float()
        assert -bound <= w.min() < -0.99 * s and 0.99 * s < w.max() <= bound, (w.min(), w.max(), s)
        assert abs(w.mean()) < 0.02 * s


@pytest.mark.parametrize("n_head,n_kv_head,n_embd", [(4, 3, 64), (3, 3, 64)])
def test_heads_that_do_not_divide_are_refused(n_head, n_kv_head, n_embd):
    """Query heads must split n_embd evenly and share key/value heads evenly."""
    with pytest.raises(AssertionError):
        train.CausalSelfAttention(train.GPTConfig(n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd), 0)


def test_forward_reductions():
    model = tiny_model()
    idx = torch.randint(0, 64, (3, 32))
    targets = torch.randint(0, 64, (3, 32))
    targets[0, :5] = -1  # ignored
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as train.py runs it
        logits = model(idx)
        per_token = model(idx, targets, reduction="none")
        mean = model(idx, targets)
    assert logits.shape == (3, 32, 64) and logits.dtype == torch.float32
    expected = F.cross_entropy(logits.view(-1, 64), targets.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_token, expected)
    assert per_token.shape == (96,) and torch.all(per_token[:5] == 0) and torch.all(per_token[5:] > 0)
    torch.testing.assert_close(mean, per_token.sum() / 91)


def test_rotary_tables_are_buffers_left_out_of_the_state_dict():
    model = tiny_model()
    assert sorted(name for name, _ in model.named_buffers()) == ["cos", "sin"]
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


def test_sequences_up_to_the_rotary_tables_length_run_and_longer_ones_are_refused():
    model = tiny_model()  # tables of 10 x 32 positions
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as train.py runs it
        assert model(torch.zeros(1, 320, dtype=torch.long)).shape == (1, 320, 64)
        with pytest.raises(AssertionError, match="sequence of 321 tokens is longer than the rotary tables"):
            model(torch.zeros(1, 321, dtype=torch.long))


def test_rotary_preserves_norm_and_depends_only_on_relative_position():
    model = tiny_model()
    assert model.cos.size(1) == 10 * 32 and model.cos.dtype == torch.bfloat16
    cos, sin = model.cos[:, :8].float(), model.sin[:, :8].float()
    q, k = torch.randn(32), torch.randn(32)  # head_dim 64 / 2 heads
    x = torch.stack([q, k]).repeat(4, 1).view(1, 8, 1, 32)  # q at even positions, k at odd ones
    y = train.apply_rotary_emb(x, cos, sin)[0, :, 0]  # (8, 32)
    torch.testing.assert_close(y.norm(dim=-1), x[0, :, 0].norm(dim=-1), rtol=2e-2, atol=0)
    torch.testing.assert_close(y[0], q)  # position 0 is not rotated
    scores = [y[i] @ y[i + 1] for i in (0, 2, 4, 6)]  # q at i, k at i + 1: the same offset each time
    for s in scores[1:]:
        assert abs(s - scores[0]) < 0.05 * (q.norm() * k.norm())
    assert abs((y[0] @ y[5]) - scores[0]) > 0.05 * (q.norm() * k.norm())  # a different offset scores differently
