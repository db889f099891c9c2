"""Benchmark: a CPU run with glibc's default allocator settings against train.py as shipped (freed memory kept).

    uv run python tools/bench_cpu_memory.py [--depth 4] [--device-batch-size 8] [--total-batch-size 16384]
                                            [--budget 20] [--eval-tokens 65536]

Makes two copies of the project in a temporary directory with the constants edited down (an edited-down
model, as the issue that asked for this measured: depth 4, micro-batch 8, 2^14 tokens a step, a 20 s
budget; the evaluation shortened), in one of which train.py does not call keep_freed_memory(), and runs
`train.py` in each, one after the other, on the prepared data (~/.cache/autoresearch or
$AUTORESEARCH_CACHE_DIR). Prints wall, user and system time, minor page faults, peak resident memory,
and the steps each run fitted in the budget. Run it on an otherwise idle machine.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from helpers import make_project  # noqa: E402


def measure(project):
    """Run train.py in `project`: its own resource usage (os.wait4) and the steps of its summary."""
    t0 = time.time()
    with open(os.path.join(project, "run.log"), "w") as log:
        child = subprocess.Popen([sys.executable, "train.py"], cwd=project, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.time() - t0
    with open(os.path.join(project, "run.log")) as f:
        output = f.read()
    if status != 0:
        sys.exit(f"the run in {project} failed:\n{output[-3000:]}")
    steps = re.search(r"^num_steps:\s+(\d+)", output, flags=re.M).group(1)
    return dict(wall=wall, user=usage.ru_utime, sys=usage.ru_stime, faults=usage.ru_minflt,
                peak=usage.ru_maxrss / 2**20, steps=steps)  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--device-batch-size", type=int, default=8)
    parser.add_argument("--total-batch-size", type=int, default=2**14)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--eval-tokens", type=int, default=4 * 8 * 2048)
    args = parser.parse_args()
    if not hasattr(os, "sched_getaffinity") or sys.platform != "linux":
        sys.exit("error: this benchmark measures glibc's allocator: it needs Linux")
    prepare_constants = dict(TIME_BUDGET=str(args.budget), EVAL_TOKENS=str(args.eval_tokens))
    train_constants = dict(DEPTH=str(args.depth), DEVICE_BATCH_SIZE=str(args.device_batch_size),
                           TOTAL_BATCH_SIZE=str(args.total_batch_size))
    print(f"CPU run: depth {args.depth}, micro-batch {args.device_batch_size}, {args.total_batch_size} tokens a step, "
          f"{args.budget} s budget, {args.eval_tokens} evaluation tokens, {len(os.sched_getaffinity(0))} cores")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, keep in (("glibc defaults", False), ("freed memory kept", True)):
            project = make_project(os.path.join(tmp, label.replace(" ", "_")), prepare_constants, train_constants)
            if not keep:
                path = os.path.join(project, "train.py")
                with open(path) as f:
                    text = f.read()
                assert text.count("keep_freed_memory()") == 1, "train.py no longer calls keep_freed_memory() once"
                with open(path, "w") as f:
                    f.write(text.replace("keep_freed_memory()", "None"))
            print(f"running: {label} ...", flush=True)
            rows.append((label, measure(project)))
    print(f"{'':20s} {'wall s':>8s} {'user s':>8s} {'system s':>9s} {'minor faults':>13s} {'peak GB':>8s} {'steps':>6s}")
    for label, r in rows:
        print(f"{label:20s} {r['wall']:8.0f} {r['user']:8.0f} {r['sys']:9.0f} {r['faults'] / 1e6:12.1f}M "
              f"{r['peak']:8.1f} {r['steps']:>6s}")


if __name__ == "__main__":
    main()
