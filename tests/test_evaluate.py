"""evaluate_bpb, the fixed metric, against a hand computation.

A model that predicts the uniform distribution must score exactly ln(V) * (counted targets) / (ln 2 * bytes),
with the counts taken here from the reference loader's validation batches and token_bytes; a model told the
answer must score far lower; losses on 0-byte targets (BOS) must not count; and it runs a real GPT on the CPU.

    uv run pytest tests/test_evaluate.py
"""

import glob
import hashlib
import math
import os
import re
import shutil
import struct
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import files
import prepare
import train
from helpers import fresh_judge, judge_settings, reference_dataloader, UniformModel

B, T = 4, 64


class OracleModel(UniformModel):
    """Knows the next token: a logit of 30 on it."""

    def forward(self, x, y, reduction="mean"):
        logits = 30.0 * F.one_hot(y.reshape(-1), self.vocab_size).float() + self.dummy
        return F.cross_entropy(logits, y.reshape(-1), reduction=reduction)


@pytest.fixture
def small_eval(use_cache, monkeypatch):
    judge_settings(monkeypatch, MAX_SEQ_LEN=T, EVAL_TOKENS=5 * B * T + 17)  # 5 batches; the remainder is dropped


def hand_computed_uniform_bpb(tokenizer):
    token_bytes = prepare.get_token_bytes()
    batches = [next(loader) for loader in [reference_dataloader(tokenizer, B, T, "val")] for _ in range(5)]
    targets = torch.cat([y.reshape(-1) for _, y, _ in batches])
    counted = (token_bytes[targets] > 0).sum().item()
    nbytes = token_bytes[targets].sum().item()
    assert counted < targets.numel()  # some targets are BOS, which carry no bytes
    return math.log(tokenizer.get_vocab_size()) * counted / (math.log(2) * nbytes)


def test_uniform_model_scores_the_hand_computation(tokenizer, small_eval):
    expected = hand_computed_uniform_bpb(tokenizer)
    got = prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=B)
    assert got == pytest.approx(expected, rel=1e-6)


def test_losses_on_zero_byte_targets_do_not_count(tokenizer, small_eval):
    uniform = prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=B)
    bos = tokenizer.get_bos_token_id()
    assert prepare.evaluate_bpb(UniformModel(8192, extra_loss_on=bos), tokenizer, batch_size=B) == pytest.approx(uniform, rel=1e-6)


def test_a_model_told_the_answer_scores_far_lower(tokenizer, small_eval):
    uniform = prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=B)
    oracle = prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B)
    assert 0 <= oracle < 1e-3 * uniform


def test_evaluates_a_real_gpt_on_the_cpu(tokenizer, small_eval):
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=T, vocab_size=8192, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bpb = prepare.evaluate_bpb(model, tokenizer, batch_size=B)
        again = prepare.evaluate_bpb(model, tokenizer, batch_size=B)
    assert bpb == again  # same tokens, same model, same number
    uniform = hand_computed_uniform_bpb(tokenizer)
    assert bpb == pytest.approx(uniform, rel=0.02)  # lm_head starts near zero: nearly uniform predictions


JUDGE_FIELDS = ["run", "elapsed", "training", "steps", "step_seconds", "longest_step", "training_claimed",
                "eval_seconds", "EVAL_TOKENS", "MAX_SEQ_LEN", "TIME_BUDGET", "VOCAB_SIZE", "device", "torch",
                "precision", "val_digest", "val_opened", "replaced"]


def judge_lines():
    """judge.log's lines, where the run ran (the test's folder): [time, sha256, val_bpb, tokens, {key: value}]."""
    with open("judge.log") as f:
        lines = [line.rstrip("\n").split("\t") for line in f]
    return [fields[:4] + [dict(field.split("=", 1) for field in fields[4:])] for fields in lines]


def test_each_evaluation_leaves_the_judges_line(tokenizer, small_eval, monkeypatch, tiny_cache):
    """judge.log, for the morning audit: time, sha256 of the script that ran, val_bpb as printed, tokens scored,
    then the run, its timing on the judge's clock, the settings used, the device, the validation tokens' digest."""
    judge_settings(monkeypatch, RUN_SCRIPT_SHA256="ab" * 32)  # as the run's train.py read when prepare was imported
    fresh_judge(monkeypatch)  # no training in this process: nothing for the judge's clock
    first = prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=B)
    second = prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B, training_seconds=300.04)
    with open("judge.log") as f:
        assert [len(line.split("\t")) for line in f] == [4 + len(JUDGE_FIELDS)] * 2
    lines = judge_lines()
    assert [fields[1:4] for fields in lines] == [["ab" * 32, f"{v:.6f}", str(5 * B * T)] for v in (first, second)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields[0]) for fields in lines)
    one, two = lines[0][4], lines[1][4]
    assert list(one) == JUDGE_FIELDS
    assert one["run"] == two["run"] == prepare.RUN_ID and re.fullmatch(r"[0-9a-f]{12}", one["run"])
    assert (one["training_claimed"], two["training_claimed"]) == ("-", "300.0")  # train.py's claim, as given
    assert (one["training"], one["steps"], one["step_seconds"], one["longest_step"]) == ("-", "0", "-", "-")
    assert (one["EVAL_TOKENS"], one["MAX_SEQ_LEN"], one["TIME_BUDGET"], one["VOCAB_SIZE"]) == (
        str(5 * B * T + 17), str(T), "300", "8192")
    assert one["device"] == "cpu" and one["torch"] == torch.__version__ and one["replaced"] == "-"
    assert one["precision"] == "float32"  # no autocast here; train.py evaluates under its own (test_train_run)
    assert one["val_digest"] == two["val_digest"] == files.recorded_val_digest(tiny_cache.tokenizer_dir)
    assert one["val_opened"] == "0"
    assert 0 < float(one["elapsed"]) <= float(two["elapsed"]) and float(one["eval_seconds"]) >= 0


def test_the_judges_clock_starts_with_a_train_loaders_second_batch_and_times_the_steps(tokenizer, small_eval,
                                                                                       monkeypatch):
    """No call of train.py's sets the clock: a train loader that hands out a second batch started training at its
    first (a loader that hands out one, as the memory fit's probes do, did not), and the optimizer steps after
    that start, from torch's own hook, give the steps' median and longest seconds."""
    clock = [990.0]
    monkeypatch.setattr(prepare, "time", SimpleNamespace(time=lambda: clock[0]))
    judge_settings(monkeypatch, RUN_STARTED=980.0)
    fresh_judge(monkeypatch)
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def step_at(t):
        clock[0] = t
        weight.grad = torch.ones(3)
        optimizer.step()

    probe = prepare.make_dataloader(tokenizer, 2, 16, "train", device="cpu")
    next(probe)  # a probe of the memory fit: one batch
    step_at(995.0)  # its optimizer step
    clock[0] = 1000.0
    loader = prepare.make_dataloader(tokenizer, 2, 16, "train", device="cpu")
    next(loader)
    clock[0] = 1000.5
    assert prepare._judge["training_started"] is None  # one batch is no training yet
    next(loader)
    assert prepare._judge["training_started"] == 1000.0
    for t in (1001.0, 1002.0, 1003.5):
        step_at(t)
    clock[0] = 1000.0 + 3600  # an hour of "training" on a 300-second budget
    prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=B, training_seconds=300.0)
    fields = judge_lines()[0][4]
    assert (fields["elapsed"], fields["training"], fields["training_claimed"]) == ("3620.0", "3600.0", "300.0")
    assert (fields["steps"], fields["step_seconds"], fields["longest_step"]) == ("3", "1.000", "1.500")


@pytest.mark.parametrize("name", ["EVAL_TOKENS", "MAX_SEQ_LEN", "VAL_FILENAME", "DATA_DIR", "TOKENS_DIR",
                                  "TOKENIZER_DIR", "JUDGE_LOG", "RUN_ID", "make_dataloader", "get_token_bytes",
                                  "log_evaluation", "list_shards", "_bits_per_byte"])
def test_what_a_run_reassigns_in_prepare_does_not_change_the_judge(tokenizer, small_eval, monkeypatch, tmp_path, name):
    """Reassigned settings (data paths included) or functions, through whatever name the run holds the module by:
    the same number (of a model whose loss differs token by token), the judge's own line, the name in it, and the
    run's own assignment back in place afterwards."""
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=T, vocab_size=8192, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    model.float()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # logits far from uniform: every token scored differently
    expected = prepare.evaluate_bpb(model, tokenizer, batch_size=B)
    assert 1 < expected < 20 and f"{expected:.6f}" != f"{prepare.evaluate_bpb(OracleModel(8192), tokenizer, B):.6f}"
    other_cache = tmp_path / "other"
    shutil.copytree(prepare.JUDGE_SETTINGS["DATA_DIR"], other_cache / "data")
    shutil.copy(other_cache / "data" / "shard_00000.parquet", other_cache / "data" / prepare.VAL_FILENAME)
    cheats = {
        "EVAL_TOKENS": B * T,                     # fewer, easier tokens
        "MAX_SEQ_LEN": T // 2,                    # shorter rows
        "VAL_FILENAME": "shard_00000.parquet",    # a training shard scored, the validation shard trained on
        "DATA_DIR": str(other_cache / "data"),    # a cache whose validation shard is a training shard
        "TOKENS_DIR": str(other_cache / "tokens"),
        "TOKENIZER_DIR": str(other_cache / "tokenizer"),
        "JUDGE_LOG": os.devnull,                  # no line for the audit
        "RUN_ID": "0" * 12,                       # another run's evaluation
        "make_dataloader": lambda tokenizer, B, T, split, **k: prepare.JUDGE_CODE["make_dataloader"](
            tokenizer, B, T, "train", **k),      # the training split, already seen
        "get_token_bytes": lambda device="cpu": torch.full((8192,), 100, dtype=torch.int32, device=device),
        "log_evaluation": lambda *a, **k: None,   # no line for the audit
        "list_shards": lambda split: prepare.JUDGE_CODE["list_shards"]("train"),
        "_bits_per_byte": lambda *a, **k: 0.5,
    }
    module = sys.modules[prepare.evaluate_bpb.__module__]  # the module, by another name than `prepare`
    monkeypatch.setattr(module, name, cheats[name])
    assert prepare.evaluate_bpb(model, tokenizer, batch_size=B) == expected
    first, _, second = judge_lines()
    assert first[2] == second[2] and second[4]["replaced"] == name and first[4]["replaced"] == "-"
    assert second[4]["EVAL_TOKENS"] == str(5 * B * T + 17) and second[4]["MAX_SEQ_LEN"] == str(T)
    assert second[4]["run"] == first[4]["run"] == prepare.JUDGE_SETTINGS["RUN_ID"]
    assert getattr(prepare, name) is cheats[name]  # the run's own assignment, back after the evaluation


def test_the_judge_scores_with_its_own_tokenizer(tokenizer, small_eval):
    """The tokenizer a run hands in is not used: the judge loads its own from its folder."""
    expected = prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B)
    other = SimpleNamespace(get_vocab_size=lambda: 8192, fingerprint="0" * 16, get_bos_token_id=lambda: 0,
                            encode_arrays=lambda texts, prepend: [np.array([0, 1], dtype=np.uint16) for _ in texts])
    assert prepare.evaluate_bpb(OracleModel(8192), other, batch_size=B) == expected


def test_the_validation_digest_is_of_the_token_stream():
    """sha256 of each row group's document lengths (int64) and tokens (uint16), little-endian, in order: written
    out here; one token changed changes it."""
    groups = [(np.array([5, 7, 9, 5, 1], dtype=np.uint16), np.array([2, 3])),
              (np.array([5, 300], dtype=np.uint16), np.array([2]))]
    by_hand = hashlib.sha256(struct.pack("<2q", 2, 3) + struct.pack("<5H", 5, 7, 9, 5, 1)
                             + struct.pack("<q", 2) + struct.pack("<2H", 5, 300))
    assert prepare.validation_digest(groups) == (by_hand.hexdigest()[:16], 7)
    groups[1][0][1] = 301
    assert prepare.validation_digest(groups)[0] != by_hand.hexdigest()[:16]


def test_the_judge_logs_the_digest_of_what_it_scored(tokenizer, small_eval, tiny_cache):
    """A token cache of the validation shard rewritten before the evaluation (and put back after): the judge scores
    what it read, and its line shows a digest other than the one prepare.py recorded."""
    recorded = files.recorded_val_digest(tiny_cache.tokenizer_dir)
    prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B)
    [cache] = glob.glob(os.path.join(prepare.JUDGE_SETTINGS["TOKENS_DIR"], "*", prepare.VAL_FILENAME[:-8], "00000.npz"))
    original = open(cache, "rb").read()
    try:
        with np.load(cache) as saved:
            arrays = dict(saved)
        arrays["tokens"][1:] = arrays["tokens"][1]  # every document the same token, BOS first in the first
        arrays["tokens"][np.cumsum(arrays["doc_lengths"]) - arrays["doc_lengths"]] = tokenizer.get_bos_token_id()
        with open(cache, "wb") as f:
            np.savez(f, **arrays)
        prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B)
    finally:
        with open(cache, "wb") as f:
            f.write(original)
    honest, tampered = judge_lines()
    assert honest[4]["val_digest"] == recorded and tampered[4]["val_digest"] != recorded


def test_the_validation_split_read_outside_the_evaluation_is_counted(tokenizer, small_eval, monkeypatch):
    """Through prepare (a "val" loader: training on it) and by Python code (its token cache opened): each counts;
    the judge's own reading does not."""
    fresh_judge(monkeypatch)
    prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B)
    assert prepare._judge["val_opened"] == 0
    prepare.list_shards("val")  # what a "val" loader does first (its thread then opens the token cache's files)
    assert prepare._judge["val_opened"] == 1
    [cache] = glob.glob(os.path.join(prepare.JUDGE_SETTINGS["TOKENS_DIR"], "*", prepare.VAL_FILENAME[:-8], "00000.npz"))
    np.load(cache).close()
    assert prepare._judge["val_opened"] == 2
    prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B)
    assert [line[4]["val_opened"] for line in judge_lines()] == ["0", "2"]
