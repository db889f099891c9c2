"""prepare.py's download step against a loopback HTTP server laid out like the Hugging Face data set.

Success; recovery after HTTP 500s and after a body cut short; a permanent 404 (non-zero exit, the shard
named, nothing partial left); shards already present are skipped and a corrupt one replaced; the pinned
validation shard always fetched; bad arguments refused; and the whole CLI run through HF_ENDPOINT.
Retry waits are shortened through prepare.RETRY_WAIT; the product keeps 2 s, doubling.

    uv run pytest tests/test_download.py
"""

import os
import subprocess
import sys

import pytest

import prepare
from helpers import PREFIX, ROOT, InlinePool, make_documents, parquet_bytes, ShardServer

PRODUCT_RETRY_WAIT = prepare.RETRY_WAIT  # as the product sets it, before any fixture shortens it


@pytest.fixture(scope="module")
def shard_files():
    names = [prepare.shard_filename(i) for i in range(3)] + [prepare.VAL_FILENAME]
    return {name: parquet_bytes(make_documents(40, seed=i)) for i, name in enumerate(names)}


@pytest.fixture
def server(shard_files, tmp_path, monkeypatch):
    s = ShardServer(shard_files)
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(prepare, "BASE_URL", s.endpoint + PREFIX.rstrip("/"))
    monkeypatch.setattr(prepare, "RETRY_WAIT", 0.01)
    yield s
    s.close()


def data_files():
    return sorted(os.listdir(prepare.DATA_DIR))


def test_downloads_training_shards_and_the_pinned_validation_shard(server, shard_files):
    assert prepare.download_data(2, download_workers=2) == []
    assert data_files() == ["shard_00000.parquet", "shard_00001.parquet", prepare.VAL_FILENAME]
    for name in data_files():
        with open(os.path.join(prepare.DATA_DIR, name), "rb") as f:
            assert f.read() == shard_files[name]
    assert sorted(server.requests) == data_files()


def test_recovers_after_server_errors_and_a_truncated_body(server, shard_files):
    server.plan = {"shard_00000.parquet": [500, 500, "ok"], prepare.VAL_FILENAME: ["truncate", 500, "ok"]}
    assert prepare.download_data(1, download_workers=2) == []
    assert server.requests.count("shard_00000.parquet") == 3
    assert server.requests.count(prepare.VAL_FILENAME) == 3
    with open(os.path.join(prepare.DATA_DIR, prepare.VAL_FILENAME), "rb") as f:
        assert f.read() == shard_files[prepare.VAL_FILENAME]
    assert data_files() == ["shard_00000.parquet", prepare.VAL_FILENAME]


def test_permanent_404_exits_nonzero_naming_the_shard_and_leaves_nothing_partial(server, capsys):
    server.plan = {"shard_00001.parquet": [404] * prepare.DOWNLOAD_ATTEMPTS}
    with pytest.raises(SystemExit) as e:
        prepare.main(["--num-shards", "2", "--download-workers", "3"])
    message = str(e.value.code)
    assert e.value.code not in (0, None)
    assert "shard_00001.parquet" in message and "uv run prepare.py" in message and "\n" not in message
    assert server.requests.count("shard_00001.parquet") == prepare.DOWNLOAD_ATTEMPTS
    assert data_files() == ["shard_00000.parquet", prepare.VAL_FILENAME]  # no .tmp, no partial file
    assert "2/3 shards ready" in capsys.readouterr().out


def test_present_shards_are_skipped_and_a_corrupt_one_is_replaced(server, shard_files):
    os.makedirs(prepare.DATA_DIR)
    with open(os.path.join(prepare.DATA_DIR, "shard_00000.parquet"), "wb") as f:
        f.write(shard_files["shard_00000.parquet"])
    with open(os.path.join(prepare.DATA_DIR, "shard_00001.parquet"), "wb") as f:
        f.write(b"not parquet at all")
    with open(os.path.join(prepare.DATA_DIR, "shard_00002.parquet.tmp"), "wb") as f:
        f.write(b"left by an interrupted run")
    assert prepare.download_data(2) == []
    assert sorted(server.requests) == ["shard_00001.parquet", prepare.VAL_FILENAME]
    with open(os.path.join(prepare.DATA_DIR, "shard_00001.parquet"), "rb") as f:
        assert f.read() == shard_files["shard_00001.parquet"]
    assert data_files() == ["shard_00000.parquet", "shard_00001.parquet", prepare.VAL_FILENAME]
    server.requests.clear()
    assert prepare.download_data(2) == []
    assert server.requests == []  # everything present: nothing fetched


@pytest.mark.parametrize("args,message", [
    (["--num-shards", "0"], "--num-shards must be between 1 and 6542"),
    (["--num-shards", "-2"], "--num-shards must be between 1 and 6542"),
    (["--num-shards", "6543"], "--num-shards must be between 1 and 6542"),
    (["--download-workers", "0"], "--download-workers must be at least 1"),
])
def test_bad_arguments_are_refused_before_any_download(server, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert server.requests == [] and not os.path.exists(prepare.DATA_DIR)


def test_cli_downloads_through_hf_endpoint_and_trains_the_tokenizer(tmp_path):
    """The real command, in a subprocess: HF_ENDPOINT points at the loopback server, the cache at tmp."""
    files = {prepare.shard_filename(i): parquet_bytes(make_documents(1500, seed=10 + i)) for i in range(2)}
    files[prepare.VAL_FILENAME] = parquet_bytes(make_documents(300, seed=19))
    server = ShardServer(files)
    try:
        env = dict(os.environ, HF_ENDPOINT=server.endpoint + "/", AUTORESEARCH_CACHE_DIR=str(tmp_path / "cache"))
        result = subprocess.run([sys.executable, "prepare.py", "--num-shards", "2", "--download-workers", "2"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Cache directory: {tmp_path / 'cache'}" in result.stdout
    assert "Data: 3/3 shards ready" in result.stdout and "Tokenizer: 8192 tokens trained" in result.stdout
    assert sorted(os.listdir(tmp_path / "cache" / "data")) == sorted(files)
    assert sorted(os.listdir(tmp_path / "cache" / "tokenizer")) == ["token_bytes.pt", "tokenizer.pkl", "val_digest.txt"]


# --- retry waits and the moment a shard gets its name --------------------------------------------------------


@pytest.fixture
def in_process(server, monkeypatch):
    """Downloads in this process, with the product's 2 s first wait, and every sleep recorded instead of slept."""
    waits = []
    InlinePool.created = []
    monkeypatch.setattr(prepare, "Pool", InlinePool)
    monkeypatch.setattr(prepare, "RETRY_WAIT", PRODUCT_RETRY_WAIT)
    monkeypatch.setattr(prepare.time, "sleep", waits.append)
    return waits


@pytest.mark.parametrize("plan,waits", [
    ([500, "ok"], [2]),
    ([500, "truncate", 404, "ok"], [2, 4, 8]),
    ([500, "truncate", 404, 500, 500], [2, 4, 8, 16]),  # five attempts, no wait after the last
])
def test_the_wait_doubles_after_each_failed_attempt(server, in_process, plan, waits):
    server.plan = {"shard_00000.parquet": list(plan)}
    failed = prepare.download_data(1, download_workers=8)
    assert in_process == waits
    assert failed == ([] if plan[-1] == "ok" else ["shard_00000.parquet"])
    assert server.requests.count("shard_00000.parquet") == len(plan)
    assert InlinePool.created == [2]  # min(workers, shards missing)


@pytest.fixture
def file_events(monkeypatch):
    """Every write-open, parquet check and rename done by prepare, in order."""
    events = []
    real_open, real_check, real_replace, real_rename = open, prepare.check_parquet, os.replace, os.rename

    def spy_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            events.append(("write", os.fspath(path)))
        return real_open(path, mode, *args, **kwargs)

    def spy_check(path):
        try:
            real_check(path)
        except ValueError:
            events.append(("check failed", os.fspath(path)))
            raise
        events.append(("check passed", os.fspath(path)))

    def spy_move(real):
        def move(src, dst, *args, **kwargs):
            events.append(("rename", os.fspath(src), os.fspath(dst)))
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(prepare, "open", spy_open, raising=False)
    monkeypatch.setattr(prepare, "check_parquet", spy_check)
    monkeypatch.setattr(os, "replace", spy_move(real_replace))
    monkeypatch.setattr(os, "rename", spy_move(real_rename))
    return events


def test_a_shard_that_fails_its_check_never_gets_its_final_name(server, in_process, file_events, monkeypatch):
    final = os.path.join(prepare.DATA_DIR, "shard_00000.parquet")
    seen_at_waits = []
    monkeypatch.setattr(prepare.time, "sleep", lambda s: seen_at_waits.append(os.path.exists(final)))
    server.plan = {"shard_00000.parquet": ["corrupt"] * prepare.DOWNLOAD_ATTEMPTS}
    assert prepare.download_data(1) == ["shard_00000.parquet"]
    touching_final = [e for e in file_events if final in e[1:]]
    assert touching_final == [], touching_final  # never written, renamed to, or checked under its final name
    assert seen_at_waits == [False] * (prepare.DOWNLOAD_ATTEMPTS - 1) and not os.path.exists(final)
    assert sum(e[0] == "check failed" for e in file_events) == prepare.DOWNLOAD_ATTEMPTS


def test_a_shard_is_renamed_to_its_final_name_only_after_passing_its_check(server, in_process, file_events):
    final = os.path.join(prepare.DATA_DIR, "shard_00000.parquet")
    server.plan = {"shard_00000.parquet": ["corrupt", "ok"]}
    assert prepare.download_data(1) == []
    renames = [i for i, e in enumerate(file_events) if e[0] == "rename" and e[2] == final]
    assert len(renames) == 1 and not any(e[0] == "write" and e[1] == final for e in file_events)
    src = file_events[renames[0]][1]
    last_check = max(i for i, e in enumerate(file_events[:renames[0]]) if e[1] == src)
    assert file_events[last_check] == ("check passed", src)  # the last thing that happened to it: a passed check
