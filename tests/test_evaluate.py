"""evaluate_bpb, the fixed metric, against a hand computation.

A model that predicts the uniform distribution must score exactly ln(V) * (counted targets) / (ln 2 * bytes),
with the counts taken here from the reference loader's validation batches and token_bytes; a model told the
answer must score far lower; losses on 0-byte targets (BOS) must not count; and it runs a real GPT on the CPU.

    uv run pytest tests/test_evaluate.py
"""

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import prepare
import train
from helpers import judge_settings, reference_dataloader, UniformModel

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


JUDGE_FIELDS = ["run", "elapsed", "training", "step_seconds", "training_claimed", "eval_seconds", "EVAL_TOKENS",
                "MAX_SEQ_LEN", "TIME_BUDGET", "VOCAB_SIZE", "device", "torch", "replaced"]


def judge_lines():
    """judge.log's lines: [time, sha256, val_bpb, tokens, {key: value}]."""
    with open(prepare.JUDGE_LOG) as f:
        lines = [line.rstrip("\n").split("\t") for line in f]
    return [fields[:4] + [dict(field.split("=", 1) for field in fields[4:])] for fields in lines]


def test_each_evaluation_leaves_the_judges_line(tokenizer, small_eval, monkeypatch):
    """judge.log, for the morning audit: time, sha256 of the script that ran, val_bpb as printed, tokens scored,
    then the run, its timing on the judge's clock, the settings used and the device."""
    monkeypatch.setattr(prepare, "RUN_SCRIPT_SHA256", "ab" * 32)
    monkeypatch.setattr(prepare, "_training", {})  # what an earlier test's memory fit told the judge, forgotten
    first = prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=B)
    second = prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B, training_seconds=300.04)
    with open(prepare.JUDGE_LOG) as f:
        assert [len(line.split("\t")) for line in f] == [4 + len(JUDGE_FIELDS)] * 2
    lines = judge_lines()
    assert [fields[1:4] for fields in lines] == [["ab" * 32, f"{v:.6f}", str(5 * B * T)] for v in (first, second)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields[0]) for fields in lines)
    one, two = lines[0][4], lines[1][4]
    assert list(one) == JUDGE_FIELDS
    assert one["run"] == two["run"] == prepare.RUN_ID and re.fullmatch(r"[0-9a-f]{12}", one["run"])
    assert (one["training_claimed"], two["training_claimed"]) == ("-", "300.0")  # train.py's claim, as given
    assert one["training"] == one["step_seconds"] == "-"  # no memory fit ran in this test
    assert (one["EVAL_TOKENS"], one["MAX_SEQ_LEN"], one["TIME_BUDGET"], one["VOCAB_SIZE"]) == (
        str(5 * B * T + 17), str(T), "300", "8192")
    assert one["device"] == "cpu" and one["torch"] == torch.__version__ and one["replaced"] == "-"
    assert 0 < float(one["elapsed"]) <= float(two["elapsed"]) and float(one["eval_seconds"]) >= 0


def test_the_judges_clock_times_the_training_from_the_memory_fit(tokenizer, small_eval, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(prepare, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(prepare, "RUN_STARTED", 990.0)
    monkeypatch.setattr(prepare, "_training", {})
    prepare.note_training_start(0.25)  # what the fit tells the judge as the clock starts
    clock[0] = 1000.0 + 3600  # an hour of "training" on a 300-second budget
    prepare.evaluate_bpb(UniformModel(8192), tokenizer, batch_size=B, training_seconds=300.0)
    fields = judge_lines()[0][4]
    assert (fields["elapsed"], fields["training"], fields["step_seconds"]) == ("3610.0", "3600.0", "0.250")
    assert fields["training_claimed"] == "300.0" and fields["eval_seconds"] == "0.0"


@pytest.mark.parametrize("name", ["EVAL_TOKENS", "MAX_SEQ_LEN", "make_dataloader", "get_token_bytes", "log_evaluation",
                                  "list_shards", "_bits_per_byte"])
def test_what_a_run_reassigns_in_prepare_does_not_change_the_judge(tokenizer, small_eval, monkeypatch, name):
    """Reassigned constants or functions: the same number, the judge's own line, the name in it, and the run's
    own assignment back in place afterwards."""
    expected = prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B)
    cheats = {
        "EVAL_TOKENS": B * T,                     # fewer, easier tokens
        "MAX_SEQ_LEN": T // 2,                    # shorter rows
        "make_dataloader": lambda tokenizer, B, T, split, **k: prepare.JUDGE_CODE["make_dataloader"](
            tokenizer, B, T, "train", **k),      # the training split, already seen
        "get_token_bytes": lambda device="cpu": torch.full((8192,), 100, dtype=torch.int32, device=device),
        "log_evaluation": lambda *a, **k: None,   # no line for the audit
        "list_shards": lambda split: prepare.JUDGE_CODE["list_shards"]("train"),
        "_bits_per_byte": lambda *a, **k: 0.5,
    }
    monkeypatch.setattr(prepare, name, cheats[name])
    assert prepare.evaluate_bpb(OracleModel(8192), tokenizer, batch_size=B) == expected
    first, second = judge_lines()
    assert first[2] == second[2] and second[4]["replaced"] == name and first[4]["replaced"] == "-"
    assert second[4]["EVAL_TOKENS"] == str(5 * B * T + 17) and second[4]["MAX_SEQ_LEN"] == str(T)
    assert getattr(prepare, name) is cheats[name]  # the run's own assignment, back after the evaluation
