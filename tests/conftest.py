"""Shared fixtures: tiny climbmix-shaped shards and a tokenizer trained on them in the cache the judge reads, caches
of a test's own, a fake CUDA driver, and one scripted night. Plain helpers are in helpers.py.

The judge reads prepare.py's folders as they were imported, as a user's run does: so this file names a temporary
cache in AUTORESEARCH_CACHE_DIR before anything imports prepare, one per test process, and the tiny corpus is
prepared into it. Everything lives in temporary directories; nothing touches ~/.cache/autoresearch or the network.
"""

import atexit
import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import pytest
import torch

JUDGE_CACHE = tempfile.mkdtemp(prefix="autoresearch-cache-")  # this test process's cache, as a user names one
os.environ["AUTORESEARCH_CACHE_DIR"] = JUDGE_CACHE
atexit.register(shutil.rmtree, JUDGE_CACHE, ignore_errors=True)

from helpers import HEADER, TINY_TRAIN, Agent, FakeCudaDriver, make_project, point_prepare_at, replace_in, \
    set_constants, write_corpus
import prepare  # noqa: E402  (helpers put the project on sys.path)


@pytest.fixture(scope="session")
def tiny_cache():
    """The judge's cache (data/ + tokenizer/), prepared as prepare.py prepares it: 2 training shards, the validation
    shard, a trained tokenizer and the validation tokens' digest."""
    from pathlib import Path
    cache = Path(JUDGE_CACHE)
    data_dir, tokenizer_dir = prepare.JUDGE_SETTINGS["DATA_DIR"], prepare.JUDGE_SETTINGS["TOKENIZER_DIR"]
    assert (data_dir, tokenizer_dir) == (str(cache / "data"), str(cache / "tokenizer"))
    shards = write_corpus(data_dir)
    with pytest.MonkeyPatch.context() as mp:
        point_prepare_at(mp, cache)  # as imported, whatever a test pointed them at meanwhile
        prepare.train_tokenizer()
        prepare.record_validation_digest()
    return SimpleNamespace(dir=cache, data_dir=data_dir, tokenizer_dir=tokenizer_dir, shards=shards)


@pytest.fixture(scope="session")
def filled_cache(tiny_cache, tmp_path_factory):
    """The tiny cache (data, tokenizer) with a token cache of its own, filled once, as a first run leaves it."""
    root = tmp_path_factory.mktemp("filled") / "cache"
    shutil.copytree(tiny_cache.dir, root, ignore=shutil.ignore_patterns("tokens"))
    with pytest.MonkeyPatch.context() as mp:
        point_prepare_at(mp, root)
        tokenizer = prepare.Tokenizer.from_directory()
        for path in prepare.list_shards("train"):
            list(prepare.shard_token_groups(path, tokenizer))
    return root


@pytest.fixture(scope="session", autouse=True)
def nothing_written_where_the_suite_runs():
    """No test leaves a judge's log, a ledger or a run log in the directory pytest runs in."""
    def state():
        names = ("judge.log", "results.tsv", "run.log")
        return {name: os.path.exists(name) and os.stat(name).st_mtime_ns for name in names}
    before = state()
    yield
    assert state() == before, f"a test wrote into {os.getcwd()}: {state()} (was {before})"


def prepared_files():
    """The judge's data and tokenizer files, with their sizes and times: what no test may change."""
    files = {}
    for folder in (os.path.join(JUDGE_CACHE, "data"), os.path.join(JUDGE_CACHE, "tokenizer")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            stat = os.stat(os.path.join(folder, name))
            files[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(autouse=True)
def in_a_folder_of_its_own(monkeypatch, tmp_path):
    """Every test runs in its own tmp dir, where an evaluation writes judge.log as a run does where it runs, and
    leaves the judge's prepared data and tokenizer as it found them."""
    monkeypatch.chdir(tmp_path)
    before = prepared_files()
    yield
    assert prepared_files() == before, "a test changed the judge's cache: give it a cache of its own (own_cache)"


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """prepare's folders pointed at an empty cache of the test's own, for what reads them at call time (the download,
    the tokenizer's training, the loader); the judge keeps the folders it was imported with."""
    point_prepare_at(monkeypatch, tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def use_cache(tiny_cache):
    """The tiny corpus in the judge's cache, where prepare's folders point as imported."""
    return tiny_cache


@pytest.fixture
def tokenizer(tiny_cache):
    return prepare.Tokenizer.from_directory(tiny_cache.tokenizer_dir)


@pytest.fixture
def fake_cuda(monkeypatch):
    """One H100 (80 GiB) behind torch.cuda's real Python layer; the test changes .properties or .fraction as it
    needs. Only where torch is built with CUDA and no real GPU is present."""
    if not torch.backends.cuda.is_built():
        pytest.skip("this torch is built without CUDA: torch.cuda's wrappers refuse before the driver")
    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: the fake driver stands in for allocations and kernels this test makes up")
    return FakeCudaDriver().install(monkeypatch)


class RealCudaDriver:
    """The GPU itself, for the CUDA tests that allocate nothing: its memory and the process's fraction of it
    (put back after the test), answered by the real driver (the GPU check runs them; DEVELOPERS.md)."""

    def __init__(self):
        self.properties = torch.cuda.get_device_properties(0)
        self.restore = torch.cuda.get_per_process_memory_fraction(0)

    def set_fraction(self, fraction):
        torch.cuda.set_per_process_memory_fraction(fraction, 0)


@pytest.fixture
def cuda_driver(monkeypatch):
    """The real driver where a GPU is here, else the fake one: for the CUDA tests that allocate nothing."""
    if torch.cuda.is_available():
        driver = RealCudaDriver()
        yield driver
        torch.cuda.set_per_process_memory_fraction(driver.restore, 0)
        return
    if not torch.backends.cuda.is_built():
        pytest.skip("this torch is built without CUDA: torch.cuda's wrappers refuse before the driver")
    driver = FakeCudaDriver().install(monkeypatch)
    driver.set_fraction = lambda fraction: setattr(driver, "fraction", fraction)
    yield driver


NIGHT_CACHE = os.environ.get("AUTORESEARCH_NIGHT_CACHE")  # tools/mutation.py: one night for every mutant's run


@pytest.fixture(scope="session")
def night(tiny_cache, tmp_path_factory):
    """One scripted night, shared by the contract and the morning report: setup, the baseline run twice, a
    worse idea, a syntax error, a divergence, and a better idea committed with a typo (fixed by amending),
    run again when told and kept. Tests that change the project work on a copy (copy_night). Where
    AUTORESEARCH_NIGHT_CACHE names a folder, the night is played once into it and copied from it afterwards."""
    if NIGHT_CACHE and os.path.exists(os.path.join(NIGHT_CACHE, "night.json")):
        project = str(tmp_path_factory.mktemp("agent") / "autoresearch")
        shutil.copytree(os.path.join(NIGHT_CACHE, "autoresearch"), project)
        with open(os.path.join(NIGHT_CACHE, "night.json")) as f:
            saved = json.load(f)
        agent = Agent(project, tiny_cache.dir)
        agent.logs = [tuple(log) for log in saved["logs"]]
        return agent, {name: tuple(run) for name, run in saved["runs"].items()}, saved["baseline"]
    # the night's baseline has lm_head's learning rate 5 times the default: the better idea, back to the default,
    # gains 0.02 to 0.04 on the tiny model (the more steps, the less), 10 times its noise, however busy the machine
    project = str(make_project(tmp_path_factory.mktemp("agent") / "autoresearch",
                               train_constants=dict(TINY_TRAIN, UNEMBEDDING_LR="0.02")))
    agent = Agent(project, tiny_cache.dir)
    agent.git("init", "-q", "-b", "main")
    agent.git("add", "-A")
    agent.git("-c", "user.name=human", "-c", "user.email=h@example.com", "commit", "-qm", "'the project'")
    agent.git("config", "user.name", "agent")
    agent.git("config", "user.email", "agent@example.com")
    # setup, as program.md lists it
    assert agent.git("branch", "--list", "'autoresearch/*'") == ""
    agent.git("checkout", "-q", "-b", "autoresearch/nov22", "main")
    assert {"data", "tokenizer"} <= set(os.listdir(tiny_cache.dir))
    with open(os.path.join(project, "results.tsv"), "w") as f:
        f.write(HEADER + "\n")
    baseline_commit = agent.git("rev-parse", "HEAD")

    def better_with_a_typo(path):
        set_constants(path, UNEMBEDDING_LR="0.004")
        replace_in(path, "import gc\n", "import gc\nimport gcc\n")

    runs = {
        "baseline": agent.experiment("baseline"),
        "worse": agent.experiment("learning rates to zero",
                                  lambda p: set_constants(p, MATRIX_LR="0.0", EMBEDDING_LR="0.0", UNEMBEDDING_LR="0.0")),
        "syntax": agent.experiment("half-written edit", lambda p: open(p, "a").write("\ndef broken(:\n")),
        "nan": agent.experiment("MATRIX_LR 1e30", lambda p: set_constants(p, MATRIX_LR="1e30")),
        "better": agent.experiment("UNEMBEDDING_LR 0.02 -> 0.004", better_with_a_typo,
                                   fix=lambda p: replace_in(p, "import gcc\n", "")),
    }
    if NIGHT_CACHE:
        saving = f"{NIGHT_CACHE}.{os.getpid()}"
        shutil.copytree(project, os.path.join(saving, "autoresearch"))
        with open(os.path.join(saving, "night.json"), "w") as f:
            json.dump(dict(runs=runs, baseline=baseline_commit, logs=agent.logs), f)
        if os.path.exists(NIGHT_CACHE):  # another process saved it meanwhile
            shutil.rmtree(saving)
        else:
            os.replace(saving, NIGHT_CACHE)
    return agent, runs, baseline_commit


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist's loadgroup, the tests of the scripted night share one worker: the night is built once."""
    for item in items:
        if "night" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("night"))


if os.environ.get("PYTEST_XDIST_WORKER"):  # one of `-n auto`'s workers: one thread each, for it and what it runs
    torch.set_num_threads(1)  # a worker a core: more threads only fight over the cores
    os.environ["OMP_NUM_THREADS"] = "1"
