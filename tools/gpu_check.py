"""One command for whoever holds a GPU: the CUDA tests, the unmodified defaults for the full 5 minutes, the same
under a 24 GB limit (a smaller card), and every attention backend this torch offers timed and checked; one
markdown report with the GPU, driver and torch version.

    python tools/gpu_check.py                  # every step not done yet, then the report (about 25 minutes)
    python tools/gpu_check.py --step small     # one step, done again; steps: tests defaults small attention float16 report
    python tools/gpu_check.py --dry-run        # the plan, and which steps are done
    python tools/gpu_check.py --out DIR        # where the figures go (default ./gpu-check, ignored by git)

Plain `python` is enough (no uv): it runs train.py with the interpreter it runs under, so a machine with its
own torch works as long as the project's imports are there (rustbpe may have to come as a wheel). It runs on
whatever data prepare.py prepared; without network, serve a stand-in corpus as DEVELOPERS.md describes.
Each step runs in a temporary copy of the project (the repository's judge.log is never touched), stays under
10 minutes, and writes its figures to DIR/<step>.json (runs: DIR/<step>.log too), so a stopped check resumes
where it stopped. Without CUDA each step takes its CPU branch: the runs use the project as it is (edit its
constants down first, or pass --project), the 24 GB limit is skipped, the attention shapes are tiny.
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEPS = {  # name: (what it does, minutes on an H100)
    "tests": ("the CUDA tests (python -m pytest tests/test_attention.py tests/test_cuda_paths.py)", 2),
    "defaults": ("train.py unmodified for the full budget: summary, tokens/s, compile seconds", 7),
    "small": ("the same under a 24 GB limit, a 60 s budget: the micro-batch chosen, graphs, recompiles, peak memory", 7),
    "attention": ("every attention backend at the default shapes, forward and backward, checked and timed", 3),
    "float16": ("the float16 path of GPUs without bf16, forced (AUTORESEARCH_FLOAT16=1), a 60 s budget", 3),
    "report": ("report.md from the figures of the steps above", 0),
}
SMALL_CARD = 24 * 2**30         # bytes: a 24 GB card (RTX 3090/4090, L4), emulated with a per-process memory fraction
SMALL_BUDGET = 60               # seconds of training in the small step's copy: up to 4 graphs compile first
STEP_TIMEOUT = 570              # seconds a run may take: each step fits in one 10-minute command
RUN_FILES = ["train.py", "prepare.py", "machine.py", "files.py"]
TEST_FILES = ["tests/test_attention.py",   # the kernels against the fallback, the fallback's equivalence here
              "tests/test_cuda_paths.py"]  # the CUDA branches: those that allocate nothing on the real driver
TIMING_REPEATS = 10             # timed forward+backward passes per attention backend (after 3 warm-ups)
CHECK_ATOL = 3e-2               # bf16 outputs and gradients against the float32 reference: |error| <= atol + rtol |ref|
CHECK_RTOL = 2e-2               # a few bf16 steps (2^-8) of the value: gradients reach 8 at T=2048 (a step of 0.03)
LIMITED_RUN = ("import runpy, torch; total = torch.cuda.get_device_properties(0).total_memory; "
               "torch.cuda.set_per_process_memory_fraction(min(1.0, {limit} / total)); "
               "runpy.run_path('train.py', run_name='__main__')")

# ---------------------------------------------------------------------------
# Reading a run's log
# ---------------------------------------------------------------------------

def parse_run(log):
    """Figures of one train.py log (progress lines rewritten with \\r kept): the summary block, the lines that
    say how it started, and throughput and compile time from the progress lines."""
    figures = {"summary": {}, "attention": None, "fit": None, "shrunk": None, "recompiles": 0}
    if "\n---\n" in log:
        figures["summary"] = dict(re.findall(r"^(\w+): +(\S+)$", log.rsplit("\n---\n", 1)[1], flags=re.M))
    for line in re.split(r"[\r\n]", log):
        if line.startswith("Attention: "):
            figures["attention"] = line[len("Attention: "):]
        elif m := re.match(r"Memory fit: micro-batch (\d+), (\d+) sizes? probed in ([\d.]+)s"
                           r"(?:, (\d+) compiled graphs? \(recompile limit (\d+)\))?", line):
            figures["fit"] = dict(micro_batch=int(m[1]), sizes_probed=int(m[2]), seconds=float(m[3]),
                                  graphs=int(m[4]) if m[4] else None, recompile_limit=int(m[5]) if m[5] else None)
        elif line.startswith(("Precision: ", "Loss scaling: ")):
            figures[line.split(":")[0].lower().replace(" ", "_")] = line.split(": ", 1)[1]
        elif line.startswith("DEVICE_BATCH_SIZE ") and " does not fit" in line:
            figures["shrunk"] = line
        elif re.search(r"Recompiling function forward in \S*train\.py", line):  # TORCH_LOGS=recompiles: the
            figures["recompiles"] += 1  # model's graphs only (the optimizer's steps recompile per shape too)
    steps = [dict(step=int(m[0]), dt=int(m[1]) / 1000, tokens_per_second=int(m[2].replace(",", "")))
             for m in re.findall(r"step (\d{5}) \([\d.]+%\) \| .*? \| dt: (\d+)ms \| tok/sec: ([\d,]+) \|", log)]
    counted = [s for s in steps if s["step"] > 10]  # train.py counts from step 11: the first absorb compilation
    figures["steps"] = len(steps)
    if counted:
        step_seconds = statistics.median(s["dt"] for s in counted)
        figures["step_seconds_median"] = step_seconds
        figures["tokens_per_second_median"] = statistics.median(s["tokens_per_second"] for s in counted)
        figures["tokens_per_second_mean"] = round(statistics.mean(s["tokens_per_second"] for s in counted))
        warmup_extra = sum(s["dt"] for s in steps[:11]) - min(11, len(steps)) * step_seconds
        figures["compile_seconds"] = round((figures["fit"]["seconds"] if figures["fit"] else 0) + warmup_extra, 1)
    return figures

# ---------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------

def environment():
    """What the figures were measured on."""
    import torch
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                device="cpu", driver=None)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def step_tests(args):
    """pytest on TEST_FILES: the counts, and every test that did not run, by name, with pytest's reason for it (a
    test of the hub's kernel on a machine that cannot reach the hub is "not run", never passed)."""
    results = tempfile.NamedTemporaryFile(suffix=".xml", delete=False).name
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={results}",
               "-o", "addopts=",  # one process, without pyproject's xdist options: a GPU machine may lack pytest-xdist
               *TEST_FILES]
    t0 = time.time()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        return dict(command=" ".join(command[1:-1]), status="timed out", seconds=round(time.time() - t0, 1), passed=0,
                    failed=0, skipped=0, errors=0, not_run=[], tail=output.splitlines()[-30:])
    output = result.stdout + result.stderr
    outcomes = test_outcomes(results)
    os.remove(results)
    count = lambda kind: sum(1 for outcome, _ in outcomes.values() if outcome == kind)
    return dict(command=" ".join(c for c in command[1:] if not c.startswith("--junitxml")), status=result.returncode,
                seconds=round(time.time() - t0, 1), passed=count("passed"), failed=count("failed"),
                skipped=count("skipped"), errors=count("error"),
                not_run=[[name, why] for name, (outcome, why) in outcomes.items() if outcome == "skipped"],
                tail=output.splitlines()[-30:] if result.returncode else [])


def test_outcomes(junit_xml):
    """{test id: (passed, failed, error or skipped; the reason)} from pytest's JUnit XML report (none if absent)."""
    import xml.etree.ElementTree as ElementTree
    try:
        cases = ElementTree.parse(junit_xml).getroot().iter("testcase")
    except (OSError, ElementTree.ParseError):
        return {}
    outcomes = {}
    for case in cases:
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        found = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = {"failure": "failed", None: "passed"}.get(found.tag if found is not None else None,
                                                              found.tag if found is not None else "passed")
        outcomes[name] = (outcome, (found.get("message") or "").strip() if found is not None else "")
    return outcomes


def run_train(args, name, memory_limit=None, budget=None, env=None):
    """train.py in a temporary copy of the project, as the agent runs it (output into a log), with the copy's
    TIME_BUDGET set to `budget` if given; its figures."""
    import torch
    run_dir = tempfile.mkdtemp(prefix=f"gpu-check-{name}-")
    for file in RUN_FILES:
        shutil.copy(os.path.join(args.project, file), run_dir)
    if budget is not None:
        with open(os.path.join(run_dir, "prepare.py")) as f:
            text = f.read()
        with open(os.path.join(run_dir, "prepare.py"), "w") as f:
            f.write(re.sub(r"^TIME_BUDGET = \d+", f"TIME_BUDGET = {budget}", text, count=1, flags=re.M))
    command = [sys.executable, "train.py"]
    if memory_limit is not None:
        command = [sys.executable, "-c", LIMITED_RUN.format(limit=memory_limit)]
    env = dict(os.environ, PYTORCH_ALLOC_CONF="expandable_segments:True", TORCH_LOGS="recompiles",
               PYTHONUNBUFFERED="1", **(env or {}))
    log_path = os.path.join(args.out, f"{name}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(command, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    timeout=STEP_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            status = "timed out"
    with open(log_path, newline="") as f:
        text = f.read()
    shutil.rmtree(run_dir, ignore_errors=True)
    figures = dict(status=status, seconds=round(time.time() - t0, 1), memory_limit_gb=memory_limit and round(
        memory_limit / 2**30, 1), budget=budget, log=os.path.basename(log_path), cuda=torch.cuda.is_available(),
        **parse_run(text))
    if status != 0:
        figures["tail"] = text.replace("\r", "\n").splitlines()[-30:]
    return figures


def step_defaults(args):
    return run_train(args, "defaults")


def step_small(args):
    import torch
    if not torch.cuda.is_available():
        return dict(skipped="no CUDA device: a per-process memory fraction needs one")
    return run_train(args, "small", memory_limit=SMALL_CARD, budget=SMALL_BUDGET)


def step_float16(args):
    import torch
    if not torch.cuda.is_available():
        return dict(skipped="no CUDA device: the float16 path is for GPUs without bf16")
    return run_train(args, "float16", budget=SMALL_BUDGET, env={"AUTORESEARCH_FLOAT16": "1"})


def naive_reference(q, k, v, left):
    """Float32 softmax over keys i-left..i of each query, from a full (T x T) score matrix; (B, T, H, D), no GQA."""
    import torch
    T = q.size(1)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * q.size(-1) ** -0.5
    i = torch.arange(T, device=q.device)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - left)  # (T, T): key j for query i
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhij,bjhd->bihd", weights, v.float())


def close_enough(out, ref, atol, rtol):
    """Whether every element is within atol + rtol * |reference| of it."""
    return bool(((out.float() - ref).abs() <= atol + rtol * ref.abs()).all())


def attention_backends(torch, F, machine, cuda):
    """(name, the layers it serves, function(q, k, v, left) on (B, T, H, D)), every one this machine may have."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def attend(q, k, v, left):
            with sdpa_kernel(backend):
                y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True)
            return y.transpose(1, 2)
        return attend

    fallback = lambda q, k, v, left: machine.pytorch_attention(q, k, v, causal=True, window_size=(left, 0))
    backends = [("SDPA flash", "full", sdpa(SDPBackend.FLASH_ATTENTION)),
                ("SDPA cuDNN", "full", sdpa(SDPBackend.CUDNN_ATTENTION)),
                ("SDPA efficient", "full", sdpa(SDPBackend.EFFICIENT_ATTENTION)),
                ("SDPA math", "full", sdpa(SDPBackend.MATH)),
                ("fallback, eager (dense mask)", "window", fallback)]
    if cuda:
        backends.append(("fallback, compiled (FlexAttention)", "window", torch.compile(fallback, dynamic=False)))
    fa3, source = machine.load_attention(torch.device("cuda" if cuda else "cpu"))  # as train.py's main loads it
    if fa3 is not machine.pytorch_attention:
        hub = lambda q, k, v, left: fa3(q, k, v, causal=True, window_size=(left, 0))
        backends += [(f"Flash Attention 3 ({source})", "full", hub), (f"Flash Attention 3 ({source})", "window", hub)]
    try:
        from flash_attn import flash_attn_func  # PyPI's Flash Attention 2, where installed
        pypi = lambda q, k, v, left: flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
        backends += [("Flash Attention 2 (PyPI)", "full", pypi), ("Flash Attention 2 (PyPI)", "window", pypi)]
    except ImportError:
        pass
    return backends, source


def step_attention(args):
    import torch
    import torch.nn.functional as F
    import machine
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # the default model's shapes: DEVICE_BATCH_SIZE sequences of MAX_SEQ_LEN, heads of HEAD_DIM
        B, T, D, H = 128, 2048, 128, 4  # train.py's defaults (importing it would print and load it)
    else:
        B, T, H, D = 2, 256, 2, 64
    dtype = torch.bfloat16 if cuda else torch.float32
    windows = {"full": T, "window": T // 2}  # L and S layers
    if cuda:
        for left in windows.values():
            machine.sliding_window_block_mask(T, left, device)  # built ahead of compilation, as main does
    backends, hub = attention_backends(torch, F, machine, cuda)
    results = []
    for name, layers, attend in backends:
        left = windows[layers]
        keys = sum(min(i, left) + 1 for i in range(T))  # keys each query sees, summed
        flops = 3.5 * 4 * B * H * D * keys  # forward 4*B*H*D per query-key pair; backward 2.5 times that
        row = dict(backend=name, layers=layers, window=left, shape=[B, T, H, D])
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(2, T, H, D, generator=g, device=device, dtype=dtype).requires_grad_()
                       for _ in range(3))
            out = attend(q, k, v, left)
            ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref = naive_reference(*ref_inputs, left)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            ref_grads = torch.autograd.grad(ref, ref_inputs, torch.ones_like(ref))
            atol, rtol = (CHECK_ATOL, CHECK_RTOL) if cuda else (1e-4, 0)  # bf16, float32
            pairs = list(zip((out, *grads), (ref, *ref_grads)))
            row["max_error"] = max((a.float() - b).abs().max().item() for a, b in pairs)
            row["matches_reference"] = all(close_enough(a, b, atol, rtol) for a, b in pairs)
            q, k, v = (torch.randn(B, T, H, D, generator=g, device=device, dtype=dtype).requires_grad_()
                       for _ in range(3))
            times = []
            for i in range(3 + TIMING_REPEATS):
                machine.synchronize(device)
                t0 = time.perf_counter()
                attend(q, k, v, left).backward(torch.ones(B, T, H, D, device=device, dtype=dtype))
                machine.synchronize(device)
                times.append(time.perf_counter() - t0)
            row["ms"] = round(1000 * statistics.median(times[3:]), 3)
            row["tflops"] = float(f"{flops / statistics.median(times[3:]) / 1e12:.3g}")
        except Exception as e:  # not on this GPU, this torch, this dtype, or out of memory
            row["unavailable"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        results.append(row)
        if cuda:
            torch.cuda.empty_cache()
    return dict(device=str(device), dtype=str(dtype).replace("torch.", ""), backends=results,
                attention=hub)

# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def run_section(title, figures):
    out = [f"## {title}", ""]
    if "skipped" in figures:
        return out + [f"Skipped: {figures['skipped']}.", ""]
    summary = figures.get("summary", {})
    limit = f", limited to {figures['memory_limit_gb']} GiB" if figures.get("memory_limit_gb") else ""
    limit += f", a {figures['budget']} s budget" if figures.get("budget") else ""
    out.append(f"Exit status {figures['status']} after {figures['seconds']} s{limit}; log: `{figures['log']}`.")
    out.append(f"Attention: {figures.get('attention')}")
    out += [f"{label}: {figures[key]}" for key, label in (("precision", "Precision"), ("loss_scaling", "Loss scaling"))
            if figures.get(key)]
    if figures.get("shrunk"):
        out.append(f"`{figures['shrunk']}`")
    fit = figures.get("fit")
    if fit:
        graphs = (f", {fit['graphs']} compiled graphs (recompile limit {fit['recompile_limit']})"
                  if fit["graphs"] is not None else "")
        out.append(f"Memory fit: micro-batch {fit['micro_batch']}, {fit['sizes_probed']} sizes probed in "
                   f"{fit['seconds']} s{graphs}; torch logged {figures['recompiles']} recompiles.")
    if "tokens_per_second_median" in figures:
        out.append(f"Counted steps: median {figures['step_seconds_median'] * 1000:.0f} ms, "
                   f"{figures['tokens_per_second_median']:,.0f} tokens/s (mean {figures['tokens_per_second_mean']:,}); "
                   f"compile about {figures['compile_seconds']} s (the fit and the first 11 steps' excess).")
    if summary:
        out += ["", "```", "---"] + [f"{key + ':':18s}{value}" for key, value in summary.items()] + ["```"]
    if figures.get("tail"):
        out += ["", "The end of the log:", "", "```"] + figures["tail"] + ["```"]
    return out + [""]


def report(figures):
    """report.md from the figures of each step (a step not run yet is named as such)."""
    env = next((f["environment"] for f in figures.values() if "environment" in f), {})
    out = ["# GPU check", "",
           f"Device {env.get('device')} ({env.get('memory_gb', '?')} GB), driver {env.get('driver')}, torch "
           f"{env.get('torch')} (CUDA {env.get('cuda')}), Triton {env.get('triton')}, Python {env.get('python')}.", ""]
    missing = [name for name in STEPS if name != "report" and name not in figures]
    if missing:
        out += [f"Not run yet: {', '.join(missing)}.", ""]
    if "tests" in figures:
        t = figures["tests"]
        out += ["## Tests", "", f"`{t['command']}`: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                f"{t['skipped']} not run, in {t['seconds']} s (exit status {t['status']}).", ""]
        if t.get("not_run"):
            out += ["Not run (so not checked):", ""] + [f"- `{name}`: {why}" for name, why in t["not_run"]] + [""]
        if t.get("tail"):
            out += ["```"] + t["tail"] + ["```", ""]
    if "defaults" in figures:
        out += run_section("The defaults, full budget", figures["defaults"])
    if "small" in figures:
        out += run_section("Under a 24 GB limit", figures["small"])
    if "float16" in figures:
        out += run_section("Float16 with loss scaling, forced", figures["float16"])
    if "attention" in figures:
        a = figures["attention"]
        out += ["## Attention backends", "", f"Forward and backward on {a['device']} in {a['dtype']}; each checked "
                f"against the naive float32 reference on 2 sequences first. Training's attention: {a['attention']}.", "",
                "| backend | layers | window | B x T x H x D | ms | TFLOP/s | matches | max error |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in a["backends"]:
            shape = " x ".join(map(str, r["shape"]))
            if "unavailable" in r:
                out.append(f"| {r['backend']} | {r['layers']} | {r['window']} | {shape} | unavailable: "
                           f"{r['unavailable'].replace('|', '/')} | | | |")
            else:
                out.append(f"| {r['backend']} | {r['layers']} | {r['window']} | {shape} | {r['ms']} | {r['tflops']} "
                           f"| {'yes' if r['matches_reference'] else 'NO'} | {r['max_error']:.2e} |")
        out.append("")
    return "\n".join(out)

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def read_figures(out):
    figures = {}
    for name in STEPS:
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                figures[name] = json.load(f)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description="The GPU check: CUDA tests, the defaults, a 24 GB card, attention.")
    parser.add_argument("--step", choices=list(STEPS), help="run this step (again), then write the report")
    parser.add_argument("--out", default=os.path.join(ROOT, "gpu-check"), help="folder of the figures and the report")
    parser.add_argument("--project", default=ROOT, help="the project whose train.py runs (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = parser.parse_args(argv)
    args.out, args.project = os.path.abspath(args.out), os.path.abspath(args.project)
    done = read_figures(args.out)
    todo = [args.step] if args.step else [name for name in STEPS if name not in done or name == "report"]
    if args.dry_run:
        print(f"GPU check into {args.out}, project {args.project}:")
        for name, (what, minutes) in STEPS.items():
            state = "to run" if name in todo else "done"
            print(f"  {name:10s} {state:7s} ~{minutes} min  {what}")
        print(f"about {sum(STEPS[n][1] for n in todo)} minutes of GPU time; one step per call: --step NAME")
        return 0
    os.makedirs(args.out, exist_ok=True)
    for name in todo:
        if name != "report":
            print(f"{name}: {STEPS[name][0]} ...", flush=True)
            t0 = time.time()
            figures = globals()[f"step_{name}"](args)
            figures["environment"] = environment()
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(figures, f, indent=1)
            print(f"{name}: done in {time.time() - t0:.0f}s", flush=True)
        if name == "report" or args.step:
            text = report(read_figures(args.out))
            with open(os.path.join(args.out, "report.md"), "w") as f:
                f.write(text + "\n")
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
