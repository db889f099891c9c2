"""Measurement: how much val_bpb moves between runs of the same commit on one machine (the noise).

    uv run python tools/bench_noise.py                  # the CPU settings of docs/small-machines.md, 3 runs of the full budget
    uv run python tools/bench_noise.py --defaults --runs 3   # the unmodified defaults (a GPU)

Runs train.py the agent's way (`python train.py > run.log 2>&1`) in a temporary copy of the project, one run
after the other, on the prepared data (~/.cache/autoresearch or $AUTORESEARCH_CACHE_DIR), and prints each
run's val_bpb and num_steps, their mean and standard deviation. The budget is wall clock, so the step count
varies with the machine's load: run it on an otherwise idle machine.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from helpers import make_project, settings  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--defaults", action="store_true", help="the unmodified defaults, not the CPU settings")
    args = parser.parse_args()
    cpu = settings("CPU")
    project = make_project(tempfile.mkdtemp(prefix="noise-"), *(({}, {}) if args.defaults else
                                                                 (cpu["prepare.py"], cpu["train.py"])))
    results = []
    for i in range(args.runs):
        with open(os.path.join(project, "run.log"), "w") as log:
            status = subprocess.run([sys.executable, "train.py"], cwd=project, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
        with open(os.path.join(project, "run.log")) as f:
            output = f.read()
        summary = dict(re.findall(r"^(\w+): +(\S+)$", output, flags=re.M))
        if status != 0 or "val_bpb" not in summary:
            sys.exit(f"run {i + 1} failed:\n{output[-3000:]}")
        results.append((float(summary["val_bpb"]), int(summary["num_steps"])))
        print(f"run {i + 1}: val_bpb {results[-1][0]:.6f}, {results[-1][1]} steps", flush=True)
    values, steps = [v for v, _ in results], [s for _, s in results]
    print(f"mean {statistics.fmean(values):.6f}, standard deviation {statistics.stdev(values):.6f} "
          f"({len(values)} runs); steps {min(steps)} to {max(steps)}")


if __name__ == "__main__":
    main()
