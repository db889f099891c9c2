"""Measurement: the bits-per-byte denominator as the judge counts it, against the text's true bytes.

    uv run python tools/bench_bpb_denominator.py [--budget 300]

The judge counts each target token's bytes as the UTF-8 length of the token decoded alone (the original's
count, kept so results compare): a token holding part of a multi-byte character decodes to U+FFFD and counts
3 bytes, not its 1 or 2. This runs train.py once with the CPU settings of docs/small-machines.md on the prepared data
(~/.cache/autoresearch or $AUTORESEARCH_CACHE_DIR), in a temporary copy of the project, and evaluates the
trained model twice: val_bpb as the judge computes it, and with each token's true byte length. Prints both,
the two byte totals of the validation tokens, and how far apart they are.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from helpers import make_project, settings  # noqa: E402

BOTH = """
import runpy, torch, prepare
judge = prepare.evaluate_bpb

def both(model, tokenizer, batch_size, training_seconds=None):
    value = judge(model, tokenizer, batch_size, training_seconds=training_seconds)
    enc, device = tokenizer.enc, next(model.parameters()).device
    special = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    true_bytes = torch.tensor([0 if i in special else len(enc.decode_single_token_bytes(i))
                               for i in range(enc.n_vocab)], dtype=torch.int32, device=device)
    judged_bytes = prepare.get_token_bytes(device)
    rows = prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN
    true = prepare._bits_per_byte(model, tokenizer, batch_size, rows, true_bytes, device)
    totals = [0, 0]
    loader = prepare.make_dataloader(tokenizer, batch_size, prepare.MAX_SEQ_LEN, "val", device=device)
    for start in range(0, rows, batch_size):
        _, y, _ = next(loader)
        y = y[:rows - start].reshape(-1)
        totals[0] += judged_bytes[y].sum().item()
        totals[1] += true_bytes[y].sum().item()
    loader.close()
    print(f"denominator: judge {value:.6f} true {true:.6f} bytes {totals[0]} {totals[1]}", flush=True)
    return value

prepare.evaluate_bpb = both
runpy.run_path("train.py", run_name="__main__")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=300, help="seconds of training (TIME_BUDGET)")
    args = parser.parse_args()
    cpu = settings("CPU")
    project = make_project(tempfile.mkdtemp(prefix="bpb-denominator-"),
                           {**cpu["prepare.py"], "TIME_BUDGET": str(args.budget)}, cpu["train.py"])
    result = subprocess.run([sys.executable, "-c", BOTH], cwd=project, capture_output=True, text=True)
    found = re.search(r"^denominator: judge (\S+) true (\S+) bytes (\d+) (\d+)$", result.stdout, flags=re.M)
    if result.returncode != 0 or not found:
        sys.exit(f"the run in {project} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    judged, true, judged_bytes, true_bytes = float(found[1]), float(found[2]), int(found[3]), int(found[4])
    steps = re.search(r"^num_steps:\s+(\d+)", result.stdout, flags=re.M).group(1)
    print(f"one run of the CPU settings of docs/small-machines.md, {args.budget} s budget, {steps} steps; validation tokens of "
          f"{settings('CPU')['prepare.py']['EVAL_TOKENS']} targets")
    print(f"{'':24s} {'val_bpb':>9s} {'bytes':>12s}")
    print(f"{'as the judge counts':24s} {judged:9.6f} {judged_bytes:12,d}")
    print(f"{'true UTF-8 bytes':24s} {true:9.6f} {true_bytes:12,d}")
    print(f"the judge counts {100 * (judged_bytes / true_bytes - 1):+.3f}% bytes, so its val_bpb is "
          f"{100 * (judged / true - 1):+.3f}% off the true-byte figure")


if __name__ == "__main__":
    main()
