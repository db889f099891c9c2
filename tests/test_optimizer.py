"""MuonAdamW against plain-PyTorch rewrites of SPEC's formulas, and its compiled steps against recompilation.

AdamW: decoupled weight decay, lerp moments, bias correction, per-group learning rates from setup_optimizer.
Muon: Nesterov momentum, Polar Express in bf16, NorMuon variance reduction, cautious weight decay and the
max(1, rows/cols)^0.5 lr scale, on tall, wide and square stacks, over three steps so the buffers carry over.
The references loop over single matrices in the textbook form; the product stacks same-shape matrices.

    uv run pytest tests/test_optimizer.py
"""

import math
import os

import pytest
import torch

import train

POLAR_EXPRESS = [  # SPEC section 3, in order
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_reference(p, grads, lr, betas, eps, wd):
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - (lr / (1 - b1**t)) * m / ((v / (1 - b2**t)).sqrt() + eps)
    return p


def muon_reference(matrices, grads_per_step, lr, momentums, wd, beta2, ns_steps=5):
    """Each matrix on its own: Nesterov, Polar Express (bf16), NorMuon, cautious weight decay."""
    out = []
    for k, p in enumerate(matrices):
        p = p.clone()
        rows, cols = p.shape
        buf = torch.zeros_like(p)
        red = -1 if rows >= cols else -2
        second = torch.zeros((rows, 1) if rows >= cols else (1, cols))
        for grads, mu in zip(grads_per_step, momentums):
            g = grads[k]
            buf = buf + (1 - mu) * (g - buf)
            g = g + mu * (buf - g)
            X = g.bfloat16()
            X = X / (X.norm() * 1.02 + 1e-6)
            for a, b, c in POLAR_EXPRESS[:ns_steps]:
                if rows > cols:
                    A = X.T @ X
                    X = a * X + X @ (b * A + c * (A @ A))
                else:
                    A = X @ X.T
                    X = a * X + (b * A + c * (A @ A)) @ X
            X = X.float()
            n = X.size(red)
            vm = (X * X).mean(dim=red, keepdim=True)
            norm_before = math.sqrt(vm.sum().item() * n)
            second = second + (1 - beta2) * (vm - second)
            step = second.clamp_min(1e-10).rsqrt()
            norm_after = math.sqrt((vm * n * step * step).sum().item())
            X = X * step * norm_before / max(norm_after, 1e-10)
            scaled_lr = lr * max(1.0, rows / cols) ** 0.5
            agree = (X * p >= 0).float()
            p = p - scaled_lr * X - scaled_lr * wd * p * agree
        out.append(p)
    return out


@pytest.fixture
def eager_steps(monkeypatch):
    """The step functions as written: on a CUDA machine they are compiled, and inductor's fused bf16
    arithmetic rounds differently from the formulas; compiling them is torch's job, the maths is ours."""
    monkeypatch.setattr(train, "adamw_step_fused", train.adamw_step)
    monkeypatch.setattr(train, "muon_step_fused", train.muon_step)


def test_adamw_two_steps_match_reference(eager_steps):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 7))
    start = p.detach().clone()
    grads = [torch.randn(5, 7), torch.randn(5, 7)]
    group = dict(kind="adamw", params=[p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = train.MuonAdamW([group])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = adamw_reference(start, grads, lr=0.01, betas=(0.8, 0.95), eps=1e-10, wd=0.1)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p.detach(), start)


def test_adamw_skips_a_parameter_without_gradient_and_adds_eps_to_tiny_ones(eager_steps):
    """A frozen parameter first in its group leaves the others updated; gradients near eps (1e-12 against
    1e-10) are where eps decides the step's size and sign."""
    torch.manual_seed(0)
    frozen, p = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 6))
    start, frozen_start = p.detach().clone(), frozen.detach().clone()
    grads = [torch.randn(4, 6) * torch.tensor([1e-12, 1e-12, 1.0, 1.0])[:, None] for _ in range(2)]
    opt = train.MuonAdamW([dict(kind="adamw", params=[frozen, p], lr=0.01, betas=(0.8, 0.95), eps=1e-10,
                                weight_decay=0.0)])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = adamw_reference(start, grads, lr=0.01, betas=(0.8, 0.95), eps=1e-10, wd=0.0)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-7)
    assert (expected[:2] - start[:2]).abs().min() > 1e-6  # the tiny rows do move, by eps's measure
    assert torch.equal(frozen.detach(), frozen_start)


@pytest.mark.parametrize("shape,ns_steps", [((16, 8), 5), ((8, 16), 5), ((12, 12), 5), ((16, 8), 3)])
def test_muon_three_steps_match_reference(shape, ns_steps, eager_steps):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.5) for _ in range(2)]
    start = [p.detach().clone() for p in params]
    grads_per_step = [[torch.randn(shape) for _ in params] for _ in range(3)]
    lr, wd, beta2, momentums = 0.1, 0.5, 0.8, [0.85, 0.9, 0.95]  # beta2 far from 1 and from 1 - beta2: both show
    group = dict(kind="muon", params=params, lr=lr, momentum=momentums[0], ns_steps=ns_steps, beta2=beta2,
                 weight_decay=wd)
    opt = train.MuonAdamW([group])
    for grads, mu in zip(grads_per_step, momentums):
        opt.param_groups[0]["momentum"] = mu
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = muon_reference(start, grads_per_step, lr, momentums, wd, beta2, ns_steps)
    for p, e, s in zip(params, expected, start):
        change = (e - s).abs().max().item()
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0.02 * change)


def test_muon_output_is_nearly_orthogonal_before_normuon():
    """Independent of the reference: Polar Express must push all singular values close to 1."""
    torch.manual_seed(2)
    g = torch.randn(32, 16)
    X = g.bfloat16()
    X = X / (X.norm() * 1.02 + 1e-6)
    for a, b, c in train.POLAR_EXPRESS_COEFFS:
        A = X.T @ X
        X = a * X + X @ (b * A + c * (A @ A))
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.6 and s.max() < 1.3
    assert train.POLAR_EXPRESS_COEFFS == POLAR_EXPRESS


def test_setup_optimizer_groups_and_learning_rates(capsys):
    config = train.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=192)
    model = train.GPT(config)
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, weight_decay=0.2,
                                adam_betas=(0.8, 0.95), scalar_lr=0.5)
    scale = (192 / 768) ** -0.5  # = 2
    assert capsys.readouterr().out == "Scaling AdamW learning rates by (n_embd/768)^-0.5 = 2.000000\n"
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    expect = [
        (model.lm_head.weight, "adamw", 0.004 * scale, (0.8, 0.95)),
        (model.transformer.wte.weight, "adamw", 0.6 * scale, (0.8, 0.95)),
        (model.value_embeds["1"].weight, "adamw", 0.6 * scale, (0.8, 0.95)),
        (model.resid_lambdas, "adamw", 0.5 * 0.01, (0.8, 0.95)),
        (model.x0_lambdas, "adamw", 0.5, (0.96, 0.95)),
    ]
    for p, kind, lr, betas in expect:
        g = by_param[id(p)]
        assert (g["kind"], g["betas"], g["eps"], g["weight_decay"]) == (kind, betas, 1e-10, 0.0)
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == g["lr"]
    muon_groups = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert sorted(tuple(g["params"][0].shape) for g in muon_groups) == [(2, 32), (192, 192), (192, 768), (768, 192)]
    for g in muon_groups:
        assert len({p.shape for p in g["params"]}) == 1
        assert (g["lr"], g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.04, 0.95, 5, 0.95, 0.2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines cannot be compiled (fullgraph)")
def test_changing_hyperparameters_does_not_recompile(monkeypatch):
    """Compile both steps (fullgraph: no graph breaks allowed), then change every scheduled value."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for name in ("adamw_step", "muon_step"):
        compiled = torch.compile(getattr(train, name), backend=counting_backend, fullgraph=True, dynamic=False)
        monkeypatch.setattr(train, f"{name}_fused", compiled)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(8, 4))
    opt = train.MuonAdamW([
        dict(kind="adamw", params=[a], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="muon", params=[b], lr=0.04, momentum=0.85, ns_steps=5, beta2=0.95, weight_decay=0.2),
    ])
    for step in range(4):
        for group in opt.param_groups:
            group["lr"] = 0.1 / (step + 1)
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = 0.85 + 0.02 * step, 0.2 * (1 - step / 4)
        a.grad, b.grad = torch.randn(4, 4), torch.randn(8, 4)
        opt.step()
        if step == 0:
            first = len(graphs)
    assert first == 2
    assert len(graphs) == 2, "a hyperparameter change recompiled a step"
    torch._dynamo.reset()
