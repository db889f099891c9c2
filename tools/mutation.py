"""Mutation testing with mutmut, scoped to what decides val_bpb: the model, the optimizer, the schedules,
the loader and the metric (not the download, tokenizer training, device set-up or the loop's printing).

    uv run --group mutation tools/mutation.py             # the whole scope: hours on 2 cores
    uv run --group mutation tools/mutation.py optimizer   # one part: model, optimizer, schedules,
                                                                         # loader, metric

mutmut copies the project into mutants/ (ignored by git), runs the in-process tests (listed under
[tool.mutmut] in pyproject.toml) once to learn which tests reach which function, then runs each mutant
against those tests only; it remembers results, so a second run only
redoes what changed. Afterwards `uv run --group mutation mutmut results` lists the survivors
and `... mutmut show NAME` shows one. Not part of CI: too slow for 2 cores. (mutmut and SkyPilot need
different versions of click: the two groups never share an environment.)
"""

import os
import subprocess
import sys

SCOPE = {  # module: functions and classes (every method) whose mutants are run
    "model": {"train": ["norm", "has_ve", "apply_rotary_emb", "CausalSelfAttention", "MLP", "Block", "GPT"],
              "machine": ["pytorch_attention", "sliding_window_block_mask"]},
    "optimizer": {"train": ["adamw_step", "muon_step", "MuonAdamW"]},
    "schedules": {"train": ["get_lr_multiplier", "get_muon_momentum", "get_weight_decay"]},
    "loader": {"prepare": ["DocumentBuffer", "make_dataloader", "token_batches", "shard_token_slices"]},
    "metric": {"prepare": ["evaluate_bpb", "_bits_per_byte_fitted", "_bits_per_byte", "get_token_bytes"]},
}


def patterns(parts):
    """mutmut's names: module.x_function__mutmut_N, and module.xǁClassǁmethod__mutmut_N for methods."""
    out = []
    for part in parts:
        for module, names in SCOPE[part].items():
            out += [f"{module}.xǁ{name}ǁ*" if name[0].isupper() else f"{module}.x_{name}__mutmut_*" for name in names]
    return out


if __name__ == "__main__":
    parts = sys.argv[1:] or list(SCOPE)
    unknown = [p for p in parts if p not in SCOPE]
    if unknown:
        sys.exit(f"error: unknown part {', '.join(unknown)}; choose from {', '.join(SCOPE)}")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per mutant worker: mutmut runs one worker per core
    sys.exit(subprocess.call(["mutmut", "run", *patterns(parts)], env=env))
