"""How far Muon's Polar Express lands from its exact result in float16, bf16 and float32, on the default model's
matrix shapes: the dtype GPUs without bf16 orthogonalise in (docs/small-machines.md).

    uv run python tools/bench_polar_express.py

For each shape (a block's q, k, v and projection, the MLP's two, a value-embedding gate) and two kinds of gradient
(Gaussian, and nearly low-rank as real gradients are), the five steps run as muon_step runs them; printed: the
range of the singular values after them, and the distance to the same steps in float64 (relative, Frobenius).
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from helpers import polar_express_steps  # noqa: E402  (the plain orthogonalisation of the optimizer's tests)
from train import POLAR_EXPRESS_COEFFS  # noqa: E402

SHAPES = [(512, 512), (2048, 512), (512, 2048), (4, 32)]  # depth 8, width 512: c_q/c_k/c_v/c_proj, c_fc, mlp c_proj, ve_gate
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def polar_express(g, dtype):
    """muon_step's orthogonalisation of one matrix, in `dtype`; the result in float64."""
    X = g.to(dtype)
    return polar_express_steps(X / (X.norm() * 1.02 + 1e-6), *g.shape, POLAR_EXPRESS_COEFFS).double()


def main():
    generator = torch.Generator().manual_seed(0)
    print(f"{'shape':>12} {'gradient':>9}  " + "  ".join(f"{str(d)[6:]:>26}" for d in DTYPES))
    print(f"{'':>12} {'':>9}  " + "  ".join(f"{'singular values  vs f64':>26}" for _ in DTYPES))
    worst = {d: 0.0 for d in DTYPES}
    for shape in SHAPES:
        for kind in ("gaussian", "low-rank"):
            g = torch.randn(shape, generator=generator)
            if kind == "low-rank":
                g = torch.randn(shape[0], 8, generator=generator) @ torch.randn(8, shape[1], generator=generator) + 0.01 * g
            exact = polar_express(g.double(), torch.float64)
            cells = []
            for dtype in DTYPES:
                X = polar_express(g, dtype)
                s = torch.linalg.svdvals(X)
                error = ((X - exact).norm() / exact.norm()).item()
                worst[dtype] = max(worst[dtype], error)
                cells.append(f"[{s.min():.3f}, {s.max():.3f}]  {error:8.2e}")
            print(f"{str(shape):>12} {kind:>9}  " + "  ".join(f"{c:>26}" for c in cells))
    print("largest distance to float64: " + ", ".join(f"{str(d)[6:]} {e:.2e}" for d, e in worst.items()))


if __name__ == "__main__":
    main()
