"""Mutation testing with mutmut, scoped to what decides val_bpb (the model, the optimizer, the schedules, the
loader, the metric) and to what decides what a night keeps and refuses (the decision and its noise floor, the
morning audit, the memory fit's choices, the night's guard and keep-going hooks); not the download, tokenizer
training, device set-up or the loop's printing.

    uv run --group mutation tools/mutation.py             # the whole scope: hours on 2 cores
    uv run --group mutation tools/mutation.py optimizer   # one part: model, optimizer, schedules, loader,
                                                          # metric, decision, audit, fit, guard

mutmut copies the project into mutants/ (ignored by git), runs the in-process tests (listed under
[tool.mutmut] in pyproject.toml) once to learn which tests reach which function, then runs each mutant
against those tests only; it remembers results, so a second run only
redoes what changed. Afterwards `uv run --group mutation mutmut results` lists the survivors
and `... mutmut show NAME` shows one. Not part of CI: too slow for 2 cores. (mutmut and SkyPilot need
different versions of click: the two groups never share an environment.)
"""

import os
import shutil
import subprocess
import sys
import tempfile

SCOPE = {  # module: functions and classes (every method) whose mutants are run
    "model": {"train": ["norm", "has_ve", "apply_rotary_emb", "CausalSelfAttention", "MLP", "Block", "GPT"],
              "machine": ["pytorch_attention", "sliding_window_block_mask"]},
    "optimizer": {"train": ["adamw_step", "muon_step", "MuonAdamW"]},
    "schedules": {"train": ["get_lr_multiplier", "get_muon_momentum", "get_weight_decay"]},
    "loader": {"prepare": ["DocumentBuffer", "make_dataloader", "token_batches", "shard_token_groups", "token_slices", "packed_rows"]},
    "metric": {"prepare": ["evaluate_bpb", "training_record", "validation_digest", "_bits_per_byte_fitted",
                           "_bits_per_byte", "get_token_bytes"]},
    "decision": {"analysis": ["Experiment", "experiments", "noise_floor", "t_cdf", "t_quantile", "decide",
                              "chain_of_keeps", "decide_commit"]},
    "audit": {"analysis": ["audit", "Night", "audit_files", "audit_keeps", "audit_numbers", "run_findings",
                           "timing_findings", "match_runs", "kept_diff_signs", "settings_of", "find_branch",
                           "night_start"]},
    "fit": {"machine": ["fit_micro_batch", "Trial", "sizes_that_fit", "allow_a_graph_per_size", "memory_limit",
                        "peak_memory", "reset_peak_memory", "autocast_dtype", "peak_flops"]},
    "guard": {"night.hooks": ["on_a_night", "outside_the_rules", "split_commands", "commit_changes",
                              "refusal_to_commit", "guard_git", "guard", "ledger_rows", "keep_going", "git_hook",
                              "main"]},
}


NIGHT_FREE = {"decision", "audit", "guard"}  # parts whose code the scripted night's own runs never execute mutated
                                            # (analysis.py runs there as __main__; the hooks do not run at all)


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
    cache = tempfile.mkdtemp(prefix="autoresearch-night-")
    if set(parts) <= NIGHT_FREE:  # the scripted night is played once, not once per mutant (conftest.py's night)
        env["AUTORESEARCH_NIGHT_CACHE"] = os.path.join(cache, "night")
    try:
        status = subprocess.call(["mutmut", "run", *patterns(parts)], env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    sys.exit(status)
