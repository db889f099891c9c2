"""MuonAdamW against references of its maths, and its steps compiled by inductor against their eager selves.

Two references each. A textbook one in float64 (tolerance: the formulas are right). A bitwise one that performs
the original's operations in its order and dtypes, compared with torch.equal: the hyperparameters are float32
0-d tensors; AdamW's lerp weights 1 - beta stay float32 for bf16 moments, and the update is
p.add_(m / denom, alpha=-(lr / (1 - beta1^t))); NorMuon's rate is 1 - beta2 with beta2 first cast to bf16
(0.05078125 for 0.95), and its scale is step * (norm_before / norm_after), the ratio first. A cast, a rounded
constant or a product reassociated changes the last bits, which compound over a night's steps; no tolerance
here would notice them.

    uv run pytest tests/test_optimizer.py
"""

import math
import os

import pytest
import torch
from torch._dynamo.utils import counters

import train
from helpers import polar_express_steps, require

POLAR_EXPRESS = [  # (a, b, c) of the five orthogonalisation steps, in order
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
SCHEDULE = [(1.0, 0.85, 1.0), (0.8, 0.88, 0.7), (0.5, 0.9, 0.4), (0.2, 0.93, 0.1)]  # (lr mult, momentum, wd mult)
eager_only = pytest.mark.skipif(train.COMPILE, reason="this machine compiles the steps: compared with eager below")
not_under_mutmut = pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines cannot be compiled")


def f32(x):
    return torch.tensor(x, dtype=torch.float32)


# --- AdamW --------------------------------------------------------------------------------------------

def adamw_textbook(p, grads, lr, betas, eps, wd):
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - (lr / (1 - b1**t)) * m / ((v / (1 - b2**t)).sqrt() + eps)
    return p


def original_adamw_step(p, grad, m, v, t, lr, b1, b2, eps, wd):
    """One step as the original takes it: float32 0-d hyperparameters, lerp weights left float32 (bf16 moments
    included: eager lerp rounds them to bf16 itself, a compiled one does not), the update as add_ with alpha."""
    p.mul_(1 - lr * wd)
    m.lerp_(grad, 1 - b1)
    v.lerp_(grad.square(), 1 - b2)
    denom = (v / (1 - b2**t)).sqrt() + eps
    p.add_(m / denom, alpha=-(lr / (1 - b1**t)))


def adamw_bitwise(p, grads, lrs, betas, eps, wd, step=original_adamw_step):
    p, m, v = p.clone(), torch.zeros_like(p), torch.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        step(p, g, m, v, f32(t), f32(lr), f32(betas[0]), f32(betas[1]), f32(eps), f32(wd))
    return p


def run_adamw(params, grads, lrs, betas, eps=1e-10, wd=0.0):
    opt = train.MuonAdamW([dict(kind="adamw", params=params, lr=lrs[0], betas=betas, eps=eps, weight_decay=wd)])
    for step, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g[step].clone()
        opt.step()


@eager_only
def test_adamw_two_steps_match_the_textbook():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 7))
    start = p.detach().clone()
    grads = [torch.randn(5, 7), torch.randn(5, 7)]
    run_adamw([p], [grads], [0.01, 0.01], (0.8, 0.95), wd=0.1)
    expected = adamw_textbook(start, grads, lr=0.01, betas=(0.8, 0.95), eps=1e-10, wd=0.1)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p.detach(), start)


@eager_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the embeddings are bf16, their moments too
def test_adamw_four_steps_are_the_originals_to_the_bit(dtype):
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(64, 48).to(dtype))
    start = p.detach().clone()
    grads = [torch.randn(64, 48).to(dtype) * 0.1 for _ in SCHEDULE]
    lrs = [0.6 * lrm for lrm, _, _ in SCHEDULE]
    run_adamw([p], [grads], lrs, (0.8, 0.95), wd=0.0)
    expected = adamw_bitwise(start, grads, lrs, (0.8, 0.95), 1e-10, 0.0)
    assert p.dtype == dtype and torch.equal(p.detach(), expected)


@eager_only
def test_adamw_skips_a_parameter_without_gradient_and_adds_eps_to_tiny_ones():
    """A frozen parameter first in its group leaves the others updated; gradients near eps (1e-12 against
    1e-10) are where eps decides the step's size and sign."""
    torch.manual_seed(0)
    frozen, p = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 6))
    start, frozen_start = p.detach().clone(), frozen.detach().clone()
    grads = [torch.randn(4, 6) * torch.tensor([1e-12, 1e-12, 1.0, 1.0])[:, None] for _ in range(2)]
    run_adamw([frozen, p], [None, grads], [0.01, 0.01], (0.8, 0.95))
    expected = adamw_textbook(start, grads, lr=0.01, betas=(0.8, 0.95), eps=1e-10, wd=0.0)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-7)
    assert (expected[:2] - start[:2]).abs().min() > 1e-6  # the tiny rows do move, by eps's measure
    assert torch.equal(frozen.detach(), frozen_start)


# --- Muon ---------------------------------------------------------------------------------------------

def orthogonalise(X, rows, cols, ns_steps):
    return polar_express_steps(X, rows, cols, POLAR_EXPRESS[:ns_steps])


def muon_textbook(p, grads, lrs, momentums, wds, beta2, ns_steps=5):
    """One matrix, in float32 beside the bf16 orthogonalisation, Python floats for the hyperparameters."""
    p = p.clone()
    rows, cols = p.shape
    buf, red = torch.zeros_like(p), -1 if rows >= cols else -2
    second = torch.zeros((rows, 1) if rows >= cols else (1, cols))
    for g, lr, mu, wd in zip(grads, lrs, momentums, wds):
        buf = buf + (1 - mu) * (g - buf)
        g = g + mu * (buf - g)
        X = g.bfloat16()
        X = orthogonalise(X / (X.norm() * 1.02 + 1e-6), rows, cols, ns_steps).float()
        n = X.size(red)
        vm = (X * X).mean(dim=red, keepdim=True)
        norm_before = math.sqrt(vm.sum().item() * n)
        second = second + (1 - beta2) * (vm - second)
        step = second.clamp_min(1e-10).rsqrt()
        norm_after = math.sqrt((vm * n * step * step).sum().item())
        X = X * step * norm_before / max(norm_after, 1e-10)
        scaled_lr = lr * max(1.0, rows / cols) ** 0.5
        p = p - scaled_lr * X - scaled_lr * wd * p * (X * p >= 0).float()
    return p


def original_muon_step(g, p, buf, second, mu, lr, wd, beta2, ns_steps, red):
    """One step on k same-shape matrices (k, rows, cols), stacked, as the original takes it: beta2 cast to bf16
    before 1 - beta2 (0.05078125 for 0.95), NorMuon's scale step * (norm_before / norm_after), ratio first."""
    rows, cols = p.shape[-2:]
    buf.lerp_(g, 1 - mu.to(g.dtype))
    g.lerp_(buf, mu.to(g.dtype))
    X = g.bfloat16()
    X = orthogonalise(X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6), rows, cols, ns_steps)
    n = X.size(red)
    vm = X.float().square().mean(dim=red, keepdim=True)  # (k, rows, 1) or (k, 1, cols)
    norm_before = (vm.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second.lerp_(vm.to(second.dtype), 1 - beta2.to(X.dtype))
    step = second.clamp_min(1e-10).rsqrt()
    norm_after = (vm * n * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    X = X * (step * (norm_before / norm_after.clamp_min(1e-10))).to(X.dtype)
    lr, wd = lr.to(X.dtype), wd.to(X.dtype)
    p.sub_(lr * X + lr * wd * p * ((X * p) >= 0))


def muon_bitwise(stack, grads, lrs, momentums, wds, beta2, ns_steps=5, step=original_muon_step):
    p = stack.clone()
    k, rows, cols = p.shape
    red = -1 if rows >= cols else -2
    buf, second = torch.zeros_like(p), torch.zeros((k, rows, 1) if rows >= cols else (k, 1, cols))
    for g, lr, mu, wd in zip(grads, lrs, momentums, wds):
        lr = lr * max(1.0, rows / cols) ** 0.5  # MuonAdamW's scale for tall matrices
        step(g.clone(), p, buf, second, f32(mu), f32(lr), f32(wd), f32(beta2), ns_steps, red)
    return p


def run_muon(params, grads, lr, momentums, wds, beta2, lrms, ns_steps=5):
    group = dict(kind="muon", params=params, lr=lr, momentum=momentums[0], ns_steps=ns_steps, beta2=beta2,
                 weight_decay=wds[0])
    opt = train.MuonAdamW([group])
    opt.param_groups[0]["initial_lr"] = lr
    for step, (lrm, mu, wd) in enumerate(zip(lrms, momentums, wds)):
        opt.param_groups[0].update(lr=lr * lrm, momentum=mu, weight_decay=wd)
        for p, g in zip(params, grads):
            p.grad = g[step].clone()
        opt.step()


def muon_case(shape, seed, count=2):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.5) for _ in range(count)]
    grads = [[torch.randn(shape) for _ in SCHEDULE] for _ in params]
    return params, grads


@eager_only
@pytest.mark.parametrize("shape,ns_steps", [((16, 8), 5), ((8, 16), 5), ((12, 12), 5), ((16, 8), 3)])
def test_muon_matches_the_textbook(shape, ns_steps):
    params, grads = muon_case(shape, seed=1)
    start = [p.detach().clone() for p in params]
    lr, beta2 = 0.1, 0.75  # exact in bf16, and far from 1: a wrong rate shows
    momentums, wds = [mu for _, mu, _ in SCHEDULE], [0.5 * w for _, _, w in SCHEDULE]
    lrms = [lrm for lrm, _, _ in SCHEDULE]
    run_muon(params, grads, lr, momentums, wds, beta2, lrms, ns_steps)
    for p, s, g in zip(params, start, grads):
        expected = muon_textbook(s, g, [lr * m for m in lrms], momentums, wds, beta2, ns_steps)
        change = (expected - s).abs().max().item()
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0.02 * change)


@eager_only
@pytest.mark.parametrize("shape,count", [((64, 32), 3), ((32, 64), 3), ((48, 48), 3), ((2**18, 4), 1)])
def test_muon_four_steps_are_the_originals_to_the_bit(shape, count):
    """beta2 = 0.95 as train.py sets it: 1 - bf16(0.95) = 0.05078125, 1.6 % above 0.05. The tall stack has 2^18
    row scales a step: where the scale's float32 arithmetic is reordered, its last bit moves in about a third of
    them, and a few in 100,000 of those cross a bf16 rounding boundary, which the update then carries."""
    params, grads = muon_case(shape, seed=2, count=count)
    start = torch.stack([p.detach() for p in params])
    lr, beta2 = 0.04, 0.95
    momentums, wds = [mu for _, mu, _ in SCHEDULE], [0.2 * w for _, _, w in SCHEDULE]
    lrms = [lrm for lrm, _, _ in SCHEDULE]
    run_muon(params, grads, lr, momentums, wds, beta2, lrms)
    expected = muon_bitwise(start, [torch.stack(g) for g in zip(*grads)], [lr * m for m in lrms], momentums, wds, beta2)
    assert torch.equal(torch.stack([p.detach() for p in params]), expected)


def test_muon_output_is_nearly_orthogonal_before_normuon():
    """Independent of the references: Polar Express must push all singular values close to 1."""
    torch.manual_seed(2)
    X = torch.randn(32, 16).bfloat16()
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
    assert capsys.readouterr().out == "Scaling AdamW LRs by 1/sqrt(192/768) = 2.000000\n"
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


# --- the steps compiled by inductor, as on a GPU ----------------------------------------------------------

@pytest.fixture(scope="module")
def inductor():
    """train.py's steps and the original's, each compiled as train.py compiles its steps, on the CPU (a C++ compiler
    and setuptools: the test setup's)."""
    require("g++")
    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile workers for a few small kernels
        yield {name: (train.compile_step(getattr(train, name)), train.compile_step(original))
               for name, original in [("adamw_step", original_adamw_step), ("muon_step", original_muon_step)]}
    torch._dynamo.reset()


def adamw_runs(dtype, *steps):
    """(start, the parameter after four AdamW steps of each step function), on the embeddings' learning rate."""
    torch.manual_seed(4)
    start = torch.randn(64, 48).to(dtype)
    grads = [torch.randn(64, 48).to(dtype) * 0.1 for _ in SCHEDULE]
    lrs = [0.6 * lrm for lrm, _, _ in SCHEDULE]
    return start, [adamw_bitwise(start, grads, lrs, (0.8, 0.95), 1e-10, 0.0, step) for step in steps]


def muon_runs(shape, *steps):
    """(start, the stack of three matrices after four Muon steps of each step function), on the schedule."""
    _, grads = muon_case(shape, seed=5, count=3)
    start = torch.randn(3, *shape)
    lrs, momentums, wds = zip(*[(0.04 * lrm, mu, 0.2 * wdm) for lrm, mu, wdm in SCHEDULE])
    batches = [torch.stack(g) for g in zip(*grads)]
    return start, [muon_bitwise(start, batches, lrs, momentums, wds, 0.95, 5, step) for step in steps]


@not_under_mutmut
def test_compiled_the_steps_are_the_originals_to_the_bit_and_new_values_never_recompile(inductor):
    """Four steps of each with new hyperparameter values at every step, both compiled by inductor: the same
    operations give the same kernels, so the same bits. Here the lerp weights' dtype shows, which eager lerp
    hides (it rounds a float32 weight to the bf16 moments' dtype itself)."""
    counters.clear()
    for dtype in (torch.float32, torch.bfloat16):
        _, (ours, original) = adamw_runs(dtype, *inductor["adamw_step"])
        assert torch.equal(ours, original), dtype
    for shape in [(64, 32), (32, 64)]:
        _, (ours, original) = muon_runs(shape, *inductor["muon_step"])
        assert torch.equal(ours, original), shape
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2 * (2 + 2), f"{graphs} graphs: each step a graph per dtype (AdamW) or shape (Muon), whatever the values"


BOUND = {torch.float32: 1e-6, torch.bfloat16: 2e-2, "muon": 0.15}  # |compiled - eager| / |eager's change|


def relative_difference(compiled, eager, start):
    """Frobenius norm of what the compiled steps did differently, over that of what the eager steps changed."""
    return ((compiled.float() - eager.float()).norm() / (eager.float() - start.float()).norm()).item()


@not_under_mutmut
def test_compiled_the_steps_follow_their_eager_selves(inductor):
    """Not to the bit: inductor fuses each chain of elementwise operations into one loop that keeps float32
    between them, where eager rounds every intermediate (to bf16 for the bf16 embeddings' AdamW and all of
    Muon), and it orders float32 arithmetic its own way. Measured over three seeds (|compiled - eager| /
    |eager's change|, four steps): AdamW 7e-8 to 8e-8 in float32 (40 % of the elements a last bit apart),
    4.2e-3 to 4.5e-3 in bf16; Muon 5 % to 6.5 %, because Polar Express's five bf16 steps (coefficients up to
    22) amplify each rounding (its output differs by 6 % of the largest element between bf16 and float32
    arithmetic), and where the cautious mask's sign flips an element moves by lr * wd * |p|."""
    for dtype in (torch.float32, torch.bfloat16):
        start, (compiled, eager) = adamw_runs(dtype, inductor["adamw_step"][0], train.adamw_step)
        assert 0 < relative_difference(compiled, eager, start) < BOUND[dtype], dtype
    for shape in [(64, 32), (32, 64)]:
        start, (compiled, eager) = muon_runs(shape, inductor["muon_step"][0], train.muon_step)
        assert 0 < relative_difference(compiled, eager, start) < BOUND["muon"], shape
