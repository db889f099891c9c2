"""Benchmark: the real dataloader against the plain reference, on the prepared data, same rows checked.

    uv run python tools/bench_dataloader.py [--batches 40] [--batch-size 128] [--seq-len 2048] [--split train]

Reads the cache that `uv run prepare.py` made (~/.cache/autoresearch, or $AUTORESEARCH_CACHE_DIR). Runs
the reference (tests/helpers.py: the original's steps, a linear scan, tokenizing every slice), then the real
loader twice with a fresh token cache in a temporary directory: cold (tokenizing and filling the cache, as
the first run of a night does) and warm (as every later run does). Every batch must equal the reference's.
Prints tokens/s for each and the ratios. Your real token cache is not touched.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from helpers import reference_dataloader  # noqa: E402  (puts the project on sys.path)
import prepare  # noqa: E402


def run(loader, batches, expected=None):
    """Time `batches` batches (the first one included); return tokens/s and the rows as uint16."""
    rows = []
    elapsed = 0.0
    for i in range(batches):
        t0 = time.perf_counter()
        x, y, epoch = next(loader)
        elapsed += time.perf_counter() - t0
        row = np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1).astype(np.uint16)
        if expected is not None and not (np.array_equal(row, expected[i][0]) and epoch == expected[i][1]):
            sys.exit(f"MISMATCH at batch {i}: the real loader's rows differ from the reference")
        rows.append((row, epoch))
    loader.close()
    return batches * x.numel() / elapsed, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=prepare.MAX_SEQ_LEN)
    parser.add_argument("--split", choices=["train", "val"], default="train")
    args = parser.parse_args()
    tokenizer = prepare.Tokenizer.from_directory()
    B, T, n = args.batch_size, args.seq_len, args.batches
    print(f"data: {prepare.DATA_DIR} ({args.split}), {n} batches of {B} x {T} = {n * B * T / 1e6:.1f} M tokens, "
          f"{os.cpu_count()} CPUs")

    ref_speed, expected = run(reference_dataloader(tokenizer, B, T, args.split), n)
    print(f"reference (linear scan, tokenize every run): {ref_speed / 1e6:8.2f} M tokens/s")
    with tempfile.TemporaryDirectory() as tokens_dir:
        prepare.TOKENS_DIR = tokens_dir
        cold_speed, _ = run(prepare.make_dataloader(tokenizer, B, T, args.split, device="cpu"), n, expected)
        print(f"real loader, cold token cache:               {cold_speed / 1e6:8.2f} M tokens/s  "
              f"({cold_speed / ref_speed:.1f}x)")
        warm_speed, _ = run(prepare.make_dataloader(tokenizer, B, T, args.split, device="cpu"), n, expected)
        print(f"real loader, warm token cache:               {warm_speed / 1e6:8.2f} M tokens/s  "
              f"({warm_speed / ref_speed:.1f}x)")
    print("rows identical to the reference: yes")


if __name__ == "__main__":
    main()
