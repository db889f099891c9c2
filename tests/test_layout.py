"""Which file holds what: prepare.py is the benchmark (constants, data, tokenizer, loader, metric) and nothing
about the machine; machine.py (the device, its precision and peak, the attention kernel, memory limits, CPU
tuning, the memory fit) imports from it,
never the reverse; train.py defines none of the machine's names. Every list of the project's files names each
fixed Python file: the parallel task's copy into the run directory, mutmut's copy, the tests' project copies,
the GPU check's, program.md, the night's deny rules (the audit holds every file but train.py fixed).

    uv run pytest tests/test_layout.py
"""

import ast
import os
import re
import subprocess
import sys

import yaml

import analysis
from tools import gpu_check
from helpers import PROJECT_FILES, ROOT


def source(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def top_level_names(name):
    """The functions, classes and constants a module defines, and the modules it imports."""
    tree = ast.parse(source(name))
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                for t in ast.walk(target) if isinstance(t, ast.Name)}
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return defined, imported


FIXED_CODE = ["prepare.py", "machine.py", "files.py"]  # the Python files beside train.py that a night never changes
MACHINE = {"memory_limit", "peak_memory", "address_space_limit", "keep_freed_memory", "bf16_slowdown",
           "fit_micro_batch", "synchronize", "reset_peak_memory", "cuda_peak_mb", "load_flash_attention_3",
           "load_attention", "pytorch_attention", "prepare_attention", "training_device", "autocast_dtype",
           "peak_flops", "PEAK_FLOPS"}


def test_prepare_holds_the_benchmark_and_machine_the_machine():
    prepare_defines, prepare_imports = top_level_names("prepare.py")
    machine_defines, machine_imports = top_level_names("machine.py")
    train_defines, _ = top_level_names("train.py")
    assert prepare_defines & MACHINE == set() and train_defines & MACHINE == set()  # the kernel too: fixed, as the hub's
    assert not {"get_device", "GPU_PEAK_FLOPS", "get_peak_flops"} & train_defines  # the device, its peak: machine.py's
    assert MACHINE <= machine_defines
    assert not re.search(r"mallopt|RLIMIT_AS|/proc/self/status|recompile_limit", source("prepare.py"))
    assert "machine" not in prepare_imports and "prepare" in machine_imports
    assert {"is_out_of_memory", "release_memory", "evaluate_bpb"} <= prepare_defines  # what the judge itself needs


def test_every_list_of_the_projects_files_names_each_fixed_file():
    assert analysis.AGENT_FILES == ["train.py"]  # the audit holds every other file fixed, machine.py included
    run = yaml.safe_load(source("parallel/sky.yaml"))["run"]
    copy = next(line for line in run.splitlines() if line.strip().startswith("cp "))
    assert {"train.py", *FIXED_CODE} <= set(copy.split())
    for name in FIXED_CODE:
        assert re.search(rf'(source_paths|also_copy) = \[[^\]]*"{name}"', source("pyproject.toml")), name  # mutmut
        assert name in PROJECT_FILES and name in gpu_check.RUN_FILES
        assert f"`{name}`" in source("program.md")  # named as fixed
        assert f'"Edit(./{name})"' in source("night/claude-settings.json")  # and denied to the agent


IMPORTED_QUIETLY = """
import os, socket, sys
env, connections = dict(os.environ), []
socket.create_connection = lambda *args, **kwargs: connections.append(args)
socket.socket.connect = lambda self, *args: connections.append(args)
import machine, train
print(connections, sorted(k for k in set(os.environ) | set(env) if os.environ.get(k) != env.get(k)))
"""


def test_importing_the_machine_reaches_no_network_and_sets_no_variable():
    """The kernel hub is asked by train.py's main (load_attention), not by whoever imports machine.py: a tool, a test.
    (train.py sets its allocator's and the hub's progress bars' variables as it starts, as the original does.)"""
    result = subprocess.run([sys.executable, "-c", IMPORTED_QUIETLY], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={k: v for k, v in os.environ.items() if k not in (
                                "HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTORCH_ALLOC_CONF")})
    assert result.stdout.strip() == "[] ['HF_HUB_DISABLE_PROGRESS_BARS', 'PYTORCH_ALLOC_CONF']", result.stderr[-2000:]
