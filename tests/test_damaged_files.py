"""Damaged files in the cache never stop a night, and prepare.py repairs what it finds damaged.

The damage matrix: each file kind (a shard, tokenizer.pkl, token_bytes.pt, a token-cache file) cut to half,
emptied (a power cut after the rename) and overwritten with random bytes. A damaged token-cache file is
tokenized again with one warning (same tokens); the other kinds stop train.py at start-up with one line
naming the file, and `prepare.py` repairs them. In-process for every cell; with the real commands for one
damage of each kind in turn (train.py, prepare.py through HF_ENDPOINT), then train.py again. Also: every final
file is fsynced before its rename, the sweep of temporary files spares live writers, and two prepare.py
runs at once on one cache end with the same shards and one tokenizer.

    uv run pytest tests/test_damaged_files.py
"""

import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import files
import prepare
from helpers import PREFIX, ROOT, TINY_PREPARE, InlinePool, make_documents, make_project, parquet_bytes, parse_summary, point_prepare_at, run_train, ShardServer

DAMAGES = ["truncated", "empty", "random"]
KINDS = ["shard", "tokenizer.pkl", "token_bytes.pt", "token cache"]


def damage(path, how):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        if how == "truncated":
            f.write(data[:len(data) // 2])
        elif how == "random":
            f.write(random.Random(len(data)).randbytes(len(data)))
        # "empty": nothing, as a power cut leaves a file renamed before its data reached the disk


@pytest.fixture
def cache(filled_cache, tmp_path, monkeypatch):
    """A copy of the filled cache, free to damage, prepare pointed at it."""
    root = tmp_path / "damaged_cache"
    shutil.copytree(filled_cache, root)
    point_prepare_at(monkeypatch, root)
    return root


def all_tokens(tokenizer, path):
    return [doc.tolist() for docs in prepare.token_slices(prepare.shard_token_groups(path, tokenizer)) for doc in docs]


def target(root, kind):
    """The file of `kind` in a cache: the first training shard, a tokenizer file, its first token-cache file."""
    if kind == "shard":
        return root / "data" / prepare.shard_filename(0)
    if kind == "token cache":
        (fingerprint,) = os.listdir(root / "tokens")
        return root / "tokens" / fingerprint / "shard_00000" / "00000.npz"
    return root / "tokenizer" / kind


def served_shards(root):
    """What a loopback 'Hugging Face' serves: the shards the cache was made from."""
    return {name: (root / "data" / name).read_bytes() for name in os.listdir(root / "data")}


# --- the matrix, in-process ----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_token_cache_file_is_tokenized_again_with_one_warning(cache, how, capsys):
    tokenizer = prepare.Tokenizer.from_directory()
    shard = prepare.list_shards("train")[0]
    before = all_tokens(tokenizer, shard)
    capsys.readouterr()
    damage(target(cache, "token cache"), how)
    assert all_tokens(tokenizer, shard) == before
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: token cache {target(cache, 'token cache')} is damaged")
    assert all_tokens(tokenizer, shard) == before and capsys.readouterr().err == ""  # rewritten whole


@pytest.mark.parametrize("swap", ["another row group's file", "documents missing", "no BOS"])
def test_a_token_cache_file_that_does_not_match_its_row_group_is_not_used(cache, swap, capsys):
    tokenizer = prepare.Tokenizer.from_directory()
    shard = prepare.list_shards("train")[0]
    before = all_tokens(tokenizer, shard)
    path = target(cache, "token cache")
    with np.load(path) as saved:
        arrays = dict(saved)
    if swap == "another row group's file":
        shutil.copy(path.parent / "00001.npz", path)
    elif swap == "documents missing":
        arrays["tokens"] = arrays["tokens"][:arrays["doc_lengths"][0]]
        arrays["doc_lengths"] = arrays["doc_lengths"][:1]
        np.savez(path, **arrays)
    else:
        arrays["tokens"][0] = tokenizer.get_bos_token_id() + 1
        np.savez(path, **arrays)
    capsys.readouterr()
    assert all_tokens(tokenizer, shard) == before


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_shard_is_named_at_start_up_and_downloaded_again(cache, how, monkeypatch):
    served = served_shards(cache)
    damage(target(cache, "shard"), how)
    with pytest.raises(SystemExit) as e:
        prepare.list_shards("train")
    assert str(e.value).startswith("error:") and str(target(cache, "shard")) in str(e.value)
    assert "uv run prepare.py" in str(e.value) and "\n" not in str(e.value)
    server = ShardServer(served)
    monkeypatch.setattr(prepare, "BASE_URL", server.endpoint + PREFIX.rstrip("/"))
    monkeypatch.setattr(prepare, "Pool", InlinePool)
    try:
        assert prepare.download_data(1) == []
    finally:
        server.close()
    assert server.requests == [prepare.shard_filename(0)]
    assert target(cache, "shard").read_bytes() == served[prepare.shard_filename(0)]


@pytest.mark.parametrize("kind", ["tokenizer.pkl", "token_bytes.pt"])
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_tokenizer_file_is_one_line_and_prepare_rebuilds_it(cache, kind, how, capsys):
    path = target(cache, kind)
    before = prepare.Tokenizer.from_directory().fingerprint, prepare.get_token_bytes()
    damage(path, how)
    with pytest.raises(SystemExit) as e:
        prepare.Tokenizer.from_directory()
    assert str(e.value).startswith(f"error: {path} ") and str(e.value).endswith("run `uv run prepare.py` to rebuild it")
    assert "\n" not in str(e.value)
    if kind == "token_bytes.pt":  # and where the evaluation reads it
        with pytest.raises(SystemExit) as e:
            prepare.get_token_bytes()
        assert str(e.value).startswith(f"error: {path} ") and "uv run prepare.py" in str(e.value)
    capsys.readouterr()
    prepare.train_tokenizer()
    out = capsys.readouterr().out
    said = "training it again" if kind == "tokenizer.pkl" else "rebuilding it from tokenizer.pkl"
    assert f"Tokenizer: {path} " in out and said in out
    assert prepare.Tokenizer.from_directory().fingerprint == before[0]  # the same tokenizer: its token cache holds
    assert torch.equal(prepare.get_token_bytes(), before[1])
    prepare.train_tokenizer()
    assert "already trained" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", ["a tokenizer of another size", "not a tokenizer", "byte counts of another size"])
def test_files_that_load_but_are_not_what_they_should_be_count_as_damaged(cache, wrong, monkeypatch):
    enc = prepare.load_encoding(target(cache, "tokenizer.pkl"))
    if wrong == "a tokenizer of another size":
        monkeypatch.setattr(prepare, "VOCAB_SIZE", enc.n_vocab + 1)
        name = "tokenizer.pkl"
    elif wrong == "not a tokenizer":
        target(cache, "tokenizer.pkl").write_bytes(pickle.dumps({"n_vocab": 8192}))
        name = "tokenizer.pkl"
    else:
        torch.save(torch.zeros(100, dtype=torch.int32), target(cache, "token_bytes.pt"))
        name = "token_bytes.pt"
    with pytest.raises(SystemExit) as e:
        prepare.Tokenizer.from_directory()
    assert f"{name} " in str(e.value) and "uv run prepare.py" in str(e.value)


# --- the matrix, with the real commands ----------------------------------------------------------------------

def run_prepare(cache_dir, endpoint, *args):
    env = dict(os.environ, HF_ENDPOINT=endpoint + "/", AUTORESEARCH_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "prepare.py", "--num-shards", "2", "--download-workers", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_real_commands_report_repair_and_run_again(cache, tmp_path):
    """One damage of each kind in turn: train.py names the file, prepare.py repairs it; a damaged token-cache
    file only costs time: the run after the repairs goes on with one warning."""
    project = make_project(tmp_path / "project", dict(TINY_PREPARE, TIME_BUDGET="0.01"))
    server = ShardServer(served_shards(cache))
    try:
        for kind, how in (("shard", "truncated"), ("tokenizer.pkl", "empty"), ("token_bytes.pt", "random")):
            damage(target(cache, kind), how)
            status, log = run_train(project, cache)
            assert status == 1 and "Traceback" not in log, log[-3000:]
            last = log.rstrip("\n").splitlines()[-1]
            assert last.startswith("error:") and str(target(cache, kind)) in last and "uv run prepare.py" in last
            repair = run_prepare(cache, server.endpoint)
            assert repair.returncode == 0, repair.stdout + repair.stderr
            assert str(target(cache, kind)) in repair.stdout  # said which file and why
    finally:
        server.close()
    damage(target(cache, "token cache"), "truncated")
    status, log = run_train(project, cache)
    assert status == 0, log[-3000:]
    warnings = [line for line in log.splitlines() if line.startswith("warning: token cache")]
    assert len(warnings) == 1 and str(target(cache, "token cache")) in warnings[0]
    parse_summary(log)


# --- durable writes, temporary files, two runs at once -------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps file descriptors to paths through /proc")
def test_every_final_file_is_synced_before_its_rename(tiny_cache, own_cache, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(prepare, "Pool", InlinePool)
    server = ShardServer({name: open(os.path.join(tiny_cache.data_dir, name), "rb").read()
                          for name in os.listdir(tiny_cache.data_dir)})
    monkeypatch.setattr(prepare, "BASE_URL", server.endpoint + PREFIX.rstrip("/"))
    try:
        assert prepare.download_data(2) == []
    finally:
        server.close()
    prepare.train_tokenizer()
    tokenizer = prepare.Tokenizer.from_directory()
    list(prepare.shard_token_groups(prepare.list_shards("train")[0], tokenizer))
    prepare.record_validation_digest()
    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "rename"]
    finals = {os.path.basename(dst) for _, _, dst in renames}
    assert {prepare.shard_filename(0), prepare.shard_filename(1), prepare.VAL_FILENAME,
            "tokenizer.pkl", "token_bytes.pt", "00000.npz", "val_digest.txt"} <= finals
    for i, src, dst in renames:
        assert ("fsync", src) in events[:i], f"{dst} renamed from {src} before it was synced"
        assert not os.path.exists(src)


def test_the_sweep_removes_only_temporary_files_that_nobody_writes(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    temporary = {
        "live": f"shard_00000.parquet.{host}.{os.getpid()}.1.tmp",             # this process: writing
        "dead": f"shard_00001.parquet.{host}.{dead.pid}.1.tmp",                # its process is gone
        "old format": "shard_00002.parquet.tmp",                              # an older version's
        "other machine": "shard_00003.parquet.elsewhere.example.7.1.tmp",     # written a moment ago
        "other machine, abandoned": "shard_00004.parquet.elsewhere.example.8.1.tmp",
        "a shard": "shard_00005.parquet",
    }
    (tmp_path / "sub").mkdir()
    for key, name in temporary.items():
        (tmp_path / "sub" / name).write_bytes(b"x")
    hours_ago = time.time() - 2 * files.STALE_TEMPORARY
    os.utime(tmp_path / "sub" / temporary["other machine, abandoned"], (hours_ago, hours_ago))
    files.sweep_temporary_files(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "sub")) == sorted(temporary[k] for k in ("live", "other machine", "a shard"))


def test_two_prepare_runs_at_once_end_with_the_same_shards_and_one_tokenizer(tmp_path):
    files = {prepare.shard_filename(i): parquet_bytes(make_documents(1500, seed=10 + i)) for i in range(2)}
    files[prepare.VAL_FILENAME] = parquet_bytes(make_documents(300, seed=19))
    server = ShardServer(files, pause=2.0)  # both runs are likely half-way through the same shards at once
    env = dict(os.environ, HF_ENDPOINT=server.endpoint + "/", AUTORESEARCH_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, "prepare.py", "--num-shards", "2", "--download-workers", "3"]
    try:
        runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]
        outputs = [run.communicate(timeout=300)[0] for run in runs]
    finally:
        server.close()
    for run, out in zip(runs, outputs):
        assert run.returncode == 0, out
    data = tmp_path / "cache" / "data"
    assert sorted(os.listdir(data)) == sorted(files)
    assert all((data / name).read_bytes() == body for name, body in files.items())
    assert sorted(os.listdir(tmp_path / "cache" / "tokenizer")) == ["token_bytes.pt", "tokenizer.pkl", "val_digest.txt"]
    prepare.load_encoding(str(tmp_path / "cache" / "tokenizer" / "tokenizer.pkl"))
    assert not [name for _, _, names in os.walk(tmp_path / "cache") for name in names if re.search(r"\.tmp", name)]
