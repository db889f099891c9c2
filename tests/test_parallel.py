"""A parallel night through SkyPilot: parallel/sky.yaml (one experiment on one GPU) and parallel/program.md (the
protocol).

- sky.yaml is loaded and validated by SkyPilot's own parser (sky.Task.from_yaml), with no cloud access;
- every `sky` command parallel/program.md names is parsed by the installed SkyPilot CLI's own definitions (what its
  --help prints): an unknown subcommand, flag or argument count fails;
- sky.yaml's setup and run are executed locally with bash on the tiny project, the data served on loopback
  (a cluster without the network beyond it), and the output, prefixed as `sky logs` prefixes it, is read
  with parallel/program.md's own commands into a ledger row, and the cluster's own judge.log is copied as it was
  into the night's, which the morning audit accepts;
- waves of results arriving out of order, decided with `--decide` (the baseline pair, re-runs, a keep
  re-applied on the new best) give the ledger and branch parallel/program.md describes.

SkyPilot is imported in a subprocess whose HOME is a temporary directory (it writes ~/.sky).

    uv run pytest tests/test_parallel.py
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

import analysis
import files
from files import judge_line, recorded_val_digest
from helpers import EXAMPLE, ROOT, TINY_PREPARE, code_lines, git, one_command, set_constants, ShardServer

with open(os.path.join(ROOT, "parallel", "program.md")) as f:
    PROTOCOL = f.read()
with open(os.path.join(ROOT, "parallel", "sky.yaml")) as f:
    TASK = yaml.safe_load(f)
CODE = code_lines(PROTOCOL)
INLINE = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", PROTOCOL, flags=re.S))


def fill(command, **values):
    """A protocol command with its <placeholders> filled in (the example values unless given)."""
    for key, value in {**EXAMPLE, **{f"<{k}>": v for k, v in values.items()}}.items():
        command = command.replace(key, value)
    return command


def protocol_command(prefix):
    """The one code line of parallel/program.md that starts with `prefix`."""
    return one_command(CODE, prefix, "parallel/program.md")


SKY_COMMANDS = sorted({c for c in CODE + INLINE if c.startswith("sky ")})

SKY_CHECK = """
import json, shlex, sys
import click
import sky
from sky.client.cli.command import cli

task = sky.Task.from_yaml(sys.argv[1])
out = {"name": task.name, "envs": task.envs, "setup": task.setup, "run": task.run, "workdir": task.workdir,
       "accelerators": sorted(str(r.accelerators) for r in task.resources), "commands": {}}
for command in json.loads(sys.argv[2]):
    words = shlex.split(command)
    sub = cli.get_command(click.Context(cli), words[1])
    if sub is None:
        out["commands"][command] = f"no such subcommand: sky {words[1]}"
        continue
    try:
        sub.make_context(words[1], words[2:])  # parses every flag and argument as `sky` would, runs nothing
        out["commands"][command] = "ok"
    except click.ClickException as e:
        out["commands"][command] = e.format_message()
import inspect, re  # how `sky logs` prefixes a job's lines: SkyPilot's own parser of them, and the Ray task's name
import sky.backends.task_codegen, sky.logs.agent
out["log_line"] = re.search(r"'regex': r'(.*)',$", inspect.getsource(sky.logs.agent), re.M).group(1)
out["named_after_the_task"] = "'{task_name},' if {task_name!r} != None" in inspect.getsource(sky.backends.task_codegen)
print("RESULT " + json.dumps(out))
"""


def sky_log_prefix(pid, task="autoresearch"):
    """What `sky logs` puts before each line of a job on a one-node cluster: SkyPilot runs it as a Ray task named
    `<task name>,` (sky/backends/task_codegen.py) and Ray prefixes its output `(<name> pid=<pid>)`."""
    return f"({task}, pid={pid}) "


@pytest.fixture(scope="module")
def skypilot(tmp_path_factory):
    """What the installed SkyPilot makes of sky.yaml and of every sky command in parallel/program.md."""
    return check_with_skypilot([fill(c) for c in SKY_COMMANDS], tmp_path_factory.mktemp("sky"))


def check_with_skypilot(commands, tmp):
    """Run SKY_CHECK in the agent's repository (a copy of sky.yaml, and the worktree the commands name)."""
    repo, home = tmp / "repo", tmp / "home"
    os.makedirs(tmp / fill("worktrees/<id>"))
    os.makedirs(repo)
    home.mkdir()
    os.makedirs(repo / "parallel")
    shutil.copy(os.path.join(ROOT, "parallel", "sky.yaml"), repo / "parallel")
    result = subprocess.run([sys.executable, "-c", SKY_CHECK, "parallel/sky.yaml", json.dumps(commands)], cwd=repo,
                            env=dict(os.environ, HOME=str(home)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT ", 1)[1])


def test_the_log_lines_are_prefixed_as_skypilot_parses_them(skypilot):
    """The prefix these tests put before a job's lines is the one SkyPilot's own log parser (its fluent-bit regex,
    sky/logs/agent.py) reads: the task's name, the pid, then the line as the job printed it."""
    assert skypilot["named_after_the_task"]
    parser = re.compile(skypilot["log_line"].replace("(?<", "(?P<"))
    line = parser.fullmatch(sky_log_prefix(4242, skypilot["name"]) + "val_bpb:          0.997900")
    assert line and (line["worker_name"], line["pid"], line["rank"]) == ("autoresearch", "4242", None)
    assert line["log_line"] == "val_bpb:          0.997900"


def test_skypilot_parses_the_task_file(skypilot):
    assert skypilot["name"] == "autoresearch" and skypilot["workdir"] == "."
    assert set(skypilot["envs"]) == {"EXPERIMENT_ID", "COMMIT", "TRAIN_SHA256", "DESCRIPTION", "NUM_SHARDS"}
    assert skypilot["accelerators"] == ["{'H100': 1}"]  # one type for the night; --gpus names another
    assert "uv sync --locked" in skypilot["setup"] and "uv run prepare.py" in skypilot["setup"]
    assert "uv run train.py > run.log 2>&1" in skypilot["run"]  # the one-GPU command, unchanged


def test_every_sky_command_of_the_protocol_is_accepted_by_the_cli(skypilot):
    subcommands = {shlex.split(c)[1] for c in SKY_COMMANDS}
    assert {"check", "launch", "status", "exec", "queue", "logs", "cancel", "down", "cost-report"} <= subcommands
    assert {c: r for c, r in skypilot["commands"].items() if r != "ok"} == {}


def test_the_cli_check_can_fail(skypilot, tmp_path):
    """The check above is not vacuous: a flag SkyPilot does not have is refused."""
    commands = ["sky exec c parallel/sky.yaml --no-such-flag", "sky teleport c", "sky queue --no-follow",
                fill("sky exec c parallel/sky.yaml --workdir ../worktrees/<id>-missing")]
    verdicts = check_with_skypilot(commands, tmp_path)["commands"]
    assert all(v != "ok" for v in verdicts.values()), verdicts


# --- the task's setup and run, locally --------------------------------------------------------------------------


def sh(command, cwd, env=None):
    """A protocol command, as the agent runs it, in bash."""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env or os.environ, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def parallel_night(night, tmp_path):
    """The scripted night's project (conftest.py) on its next night, a parallel one: its main branch cloned, then
    parallel/program.md's setup (branch autoresearch/nov23, the ledger's header)."""
    agent, _, _ = night
    repo = str(tmp_path / "repo")
    git(tmp_path, "clone", "-q", "--branch", "main", agent.project, repo)
    git(repo, "remote", "remove", "origin")  # the tiny project as it was before the first night
    git(repo, "config", "user.name", "agent")
    git(repo, "config", "user.email", "agent@example.com")
    git(repo, "checkout", "-q", "-b", "autoresearch/nov23")
    with open(os.path.join(repo, "results.tsv"), "w") as f:
        f.write("\t".join(files.LEDGER_HEADER) + "\n")
    sh(fill(protocol_command("mkdir ")), repo)
    return repo


def new_experiment(repo, id, base, edit=None, description=None):
    """parallel/program.md's steps for one experiment: a worktree at base, the edit, a commit; (worktree, commit, sha)."""
    worktree = os.path.normpath(os.path.join(repo, fill("../worktrees/<id>", id=id)))
    sh(fill(protocol_command("git worktree add --detach ../worktrees/<id> <base>"), id=id, base=base), repo)
    if edit is not None:
        edit(os.path.join(worktree, "train.py"))
        sh(fill(protocol_command("git -C ../worktrees/<id> commit -qam"), id=id, description=description), repo)
    commit = sh(fill(protocol_command("git -C ../worktrees/<id> rev-parse"), id=id), repo).strip()
    sha = sh(fill(protocol_command("git -C ../worktrees/<id> show HEAD:train.py"), id=id), repo).split()[0]
    return worktree, commit, sha


@pytest.fixture
def cluster(tmp_path, tiny_cache):
    """A stand-in cluster: its own HOME, a `uv` that records what it is asked and runs the synced environment,
    and the data set on a loopback server."""
    home, bin_dir = tmp_path / "cluster_home", tmp_path / "cluster_bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> "{tmp_path}/uv_calls"
        case "$1" in
          sync) exit 0 ;;  # this test's environment is already the locked one
          run) shift; exec "{sys.executable}" "$@" ;;
        esac
        exit 2
        """))
    (bin_dir / "uv").chmod(0o755)
    data = tiny_cache.data_dir
    server = ShardServer({name: open(os.path.join(data, name), "rb").read() for name in os.listdir(data)})
    env = {**os.environ, **{k: str(v) for k, v in TASK["envs"].items()}, "NUM_SHARDS": "2", "HOME": str(home),
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_ENDPOINT": server.endpoint + "/"}
    env.pop("AUTORESEARCH_CACHE_DIR", None)  # the cluster's default cache, under its HOME
    yield env, tmp_path / "uv_calls"
    server.close()


def run_job(workdir, env, **envs):
    """sky.yaml's run in a copy of workdir (what SkyPilot syncs), its output prefixed as `sky logs` shows it."""
    synced = os.path.join(env["HOME"], "sky_workdir")
    shutil.rmtree(synced, ignore_errors=True)
    shutil.copytree(workdir, synced, ignore=shutil.ignore_patterns(".git"))
    result = subprocess.run(["bash", "-c", TASK["run"]], cwd=synced, env={**env, **envs}, capture_output=True,
                            text=True, timeout=600)
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, "".join(f"{sky_log_prefix(4242)}{line}\n" for line in lines)


def test_the_task_runs_an_experiment_whose_result_becomes_a_ledger_row(parallel_night, cluster):
    repo = parallel_night
    env, uv_calls = cluster
    setup = subprocess.run(["bash", "-c", TASK["setup"]], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert open(uv_calls).read().splitlines() == ["sync --locked", "run prepare.py --num-shards 2"]
    cache = os.path.join(env["HOME"], ".cache", "autoresearch")
    assert {"data", "tokenizer"} <= set(os.listdir(cache))

    status, output = run_job(repo, env)  # sky launch runs the task once, without an experiment
    assert status == 0 and "cluster ready: no experiment given" in output

    worktree, commit, sha = new_experiment(repo, "w1-1", "HEAD")  # the baseline
    status, output = run_job(worktree, env, EXPERIMENT_ID="w1-1", COMMIT=commit, TRAIN_SHA256="f" * 64)
    assert status == 1 and "error: the synced train.py is not the one of commit" in output
    assert not os.path.exists(os.path.join(env["HOME"], "autoresearch-runs", "w1-1", "run.log"))  # never ran

    status, output = run_job(worktree, env, EXPERIMENT_ID="w1-1", COMMIT=commit, TRAIN_SHA256=sha,
                             DESCRIPTION="baseline")
    assert status == 0, output
    log = fill("logs/<id>.log", id="w1-1")
    with open(os.path.join(repo, log), "w") as f:
        f.write(output)
    values = dict(line.split(":", 1) for line in sh(fill(protocol_command("grep -o \"val_bpb"), id="w1-1"),
                                                    repo).splitlines())
    assert set(values) == {"val_bpb", "peak_vram_mb"}
    copy_judge_file(repo, "w1-1", env["HOME"])
    with open(os.path.join(repo, "results.tsv"), "a") as f:
        f.write(f"{commit}\t{float(values['val_bpb']):.6f}\t{float(values['peak_vram_mb']) / 1024:.1f}\tkeep\tbaseline\n")
    rows, problems = analysis.read_ledger(os.path.join(repo, "results.tsv"))
    assert problems == [] and len(rows) == 1
    with open(os.path.join(repo, "judge.log")) as f:
        judged = f.read().splitlines()
    with open(os.path.join(env["HOME"], "autoresearch-runs", "w1-1", "judge.log")) as f:
        assert judged == f.read().splitlines()  # the cluster's own file, as it was
    assert len(judged) == 1 and judged[0].split("\t")[1:3] == [sha, values["val_bpb"].strip()]
    assert analysis.audit(rows, repo) == ([], [])  # the run's number, checked against the judge's own line


# --- a wave, results out of order -------------------------------------------------------------------------------

def copy_judge_file(repo, id, cluster_home):
    """parallel/program.md's copy of the cluster's judge.log into the night's, the cluster's SSH host being its HOME here."""
    for prefix in ("scp ", "cat logs/"):
        command = fill(protocol_command(prefix), id=id)
        sh(command.replace(fill("ar-<tag>-<i>:"), f"{cluster_home}/"), repo)


def record(repo, id, commit, sha, val_bpb, cluster_home):
    """A result as it arrives: the fetched log (the task's output lines), the cluster's judge.log copied."""
    lines = [f"experiment: {id}", f"commit: {commit}", f"val_bpb:          {val_bpb:.6f}", "peak_vram_mb:     45060.2"]
    with open(os.path.join(repo, fill("logs/<id>.log", id=id)), "w") as f:
        f.write("".join(f"{sky_log_prefix(77)}{line}\n" for line in lines))
    run_dir = os.path.join(cluster_home, "autoresearch-runs", id)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "judge.log"), "w") as f:  # what the judge on the cluster wrote
        f.write(judge_line(sha, val_bpb, 2048, dict(  # the tiny project's settings
            run=id, elapsed="8.0", training="1.6", steps=30, step_seconds="0.040", longest_step="0.050",
            training_claimed="1.0", eval_seconds="0.5", EVAL_TOKENS=2048, MAX_SEQ_LEN=64,
            TIME_BUDGET=TINY_PREPARE["TIME_BUDGET"], VOCAB_SIZE=8192, device="NVIDIA H100 80GB HBM3",
            torch="2.9.1+cu128", precision="bfloat16", val_digest=recorded_val_digest(), val_opened=0, replaced="-")))
    copy_judge_file(repo, id, cluster_home)
    out = sh(fill(protocol_command("grep -o \"val_bpb"), id=id), repo)
    return float(re.search(r"val_bpb:\s*(\S+)", out).group(1))


def decide(repo, commit):
    """parallel/program.md's decision on one experiment's commit: the first word of analysis.py's one line."""
    command = fill(protocol_command("uv run analysis.py --decide"), commit=commit)
    return sh(command.replace("uv run ", f"{sys.executable} ", 1), repo).split(":")[0]


def log_rows(ledger, rows):
    with open(ledger, "a") as f:
        f.writelines(f"{c}\t{v:.6f}\t44.0\t{s}\t{d}\n" for c, v, s, d in rows)


def test_waves_arriving_out_of_order_keep_what_beats_the_noise(parallel_night, tmp_path):
    """Wave 1: the baseline twice and three ideas; two beat the baseline by less than a clear margin (rerun),
    one is worse. Wave 2: the two run again, both confirm, the lower mean is kept and the other re-applied on
    it. Wave 3: the re-applied idea, kept at once."""
    repo, home = parallel_night, str(tmp_path / "cluster_home")
    ledger = os.path.join(repo, "results.tsv")
    edits = {"w1-3": ("MATRIX_LR 0.04 -> 0.05", "MATRIX_LR", "0.05"),
             "w1-4": ("WARMDOWN_RATIO 0.5 -> 0.6", "WARMDOWN_RATIO", "0.6"),
             "w1-5": ("DEPTH 2 -> 3", "DEPTH", "3")}
    wave = {id: new_experiment(repo, id, "autoresearch/nov23") for id in ("w1-1", "w1-2")}  # the baseline, twice
    for id, (description, name, value) in edits.items():
        wave[id] = new_experiment(repo, id, "autoresearch/nov23", lambda p, n=name, v=value: set_constants(p, **{n: v}),
                                  description)
    arrivals = [("w1-5", 1.010), ("w1-3", 0.995), ("w1-1", 1.000), ("w1-4", 0.990), ("w1-2", 1.0004)]
    results = {id: record(repo, id, wave[id][1], wave[id][2], value, home) for id, value in arrivals}
    assert wave["w1-1"][1] == wave["w1-2"][1]  # one commit, two runs
    log_rows(ledger, [(wave["w1-1"][1], results[id], "keep", "baseline") for id in ("w1-1", "w1-2")])
    decisions = {id: decide(repo, wave[id][1]) for id in edits}
    assert decisions == {"w1-3": "rerun", "w1-4": "rerun", "w1-5": "discard"}  # one pair: wide margins
    log_rows(ledger, [(wave["w1-5"][1], results["w1-5"], "discard", edits["w1-5"][0])])
    for id in ("w1-1", "w1-2", "w1-5"):
        sh(fill(protocol_command("git worktree remove"), id=id), repo)

    # wave 2: the same two commits once more, in worktrees of their own; both confirm; the lower mean wins
    again = {"w2-1": ("w1-3", 0.9952), "w2-2": ("w1-4", 0.9898)}
    for id, (first, value) in again.items():
        sh(f"git worktree add --detach ../worktrees/{id} {wave[first][1]}", repo)  # parallel/program.md's inline command
        results[id] = record(repo, id, wave[first][1], wave[first][2], value, home)
    assert {first: decide(repo, wave[first][1]) for first, _ in again.values()} == {"w1-3": "keep", "w1-4": "keep"}
    sh(fill(protocol_command("git merge --ff-only"), commit=wave["w1-4"][1]), repo)
    log_rows(ledger, [(wave["w1-3"][1], results[id], "discard", edits["w1-3"][0]) for id in ("w1-3", "w2-1")] +
             [(wave["w1-4"][1], results[id], "keep", edits["w1-4"][0]) for id in ("w1-4", "w2-2")])
    for id in ("w1-3", "w1-4", "w2-1", "w2-2"):
        sh(fill(protocol_command("git worktree remove"), id=id), repo)

    # wave 3: the other gain re-applied on top of the new best, judged on its own run
    sh(fill(protocol_command("git worktree add --detach ../worktrees/<id> autoresearch/"), id="w3-1"), repo)
    sh(fill(protocol_command("git -C ../worktrees/<id> cherry-pick"), id="w3-1", commit=wave["w1-3"][1]), repo)
    commit = sh(fill(protocol_command("git -C ../worktrees/<id> rev-parse"), id="w3-1"), repo).strip()
    sha = sh(fill(protocol_command("git -C ../worktrees/<id> show HEAD:train.py"), id="w3-1"), repo).split()[0]
    value = record(repo, "w3-1", commit, sha, 0.985, home)
    assert decide(repo, commit) == "keep"  # 0.0049 below the best's mean, the floor now on 3 df
    sh(fill(protocol_command("git merge --ff-only"), commit=commit), repo)
    log_rows(ledger, [(commit, value, "keep", "MATRIX_LR 0.04 -> 0.05 (re-run on the new best)")])
    sh(fill(protocol_command("git worktree remove"), id="w3-1"), repo)

    # the branch: baseline, the wave's winner, the re-applied idea; the ledger in the one-GPU format; a clean audit
    history = git(repo, "log", "--format=%h", "--abbrev=7", "main..autoresearch/nov23").split()
    assert history == [commit, wave["w1-4"][1]]
    assert git(repo, "show", "HEAD:train.py").count("MATRIX_LR = 0.05") == 1
    assert git(repo, "show", "HEAD:train.py").count("WARMDOWN_RATIO = 0.6") == 1
    rows, problems = analysis.read_ledger(ledger)
    assert problems == [] and [r.status for r in rows] == ["keep"] * 2 + ["discard"] * 3 + ["keep"] * 3
    assert analysis.audit(rows, repo) == ([], [])
    gains = [round(g, 6) for _, g in analysis.chain_of_keeps(analysis.experiments(rows))[1:]]
    assert gains == [round(1.0002 - 0.9899, 6), round(0.9899 - 0.985, 6)]
