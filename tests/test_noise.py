"""Keeps above noise: the decision rule of analysis.py (--decide) against simulated nights of known noise.

Each night is drawn with a per-run noise sigma: the baseline run twice, then experiments that are either
no-ops (the same true val_bpb as the best) or real gains of 3 sigma over it. The rule sees only the runs, as
a night would: its noise floor comes from its own pairs (the baseline's, then every re-run). Counted: the
no-ops kept (the original's strict "lower than the best kept run" rule against this one), the real gains
kept, and the re-runs it costs. Seeded, so the figures are exact; docs/noise.md's table is what

    uv run python tests/test_noise.py

prints. The t-quantiles are checked against a printed table, and a floor that rests on one pair of identical
runs must not make every gain clear.

    uv run pytest tests/test_noise.py
"""

import os
import random
import statistics
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import analysis  # noqa: E402

SIGMA = 0.0003                 # per-run noise of the simulated nights (an H100's is about 0.0002 to 0.0003)
EXPERIMENTS = 30               # per night, after the baseline pair
NIGHTS = 300
SCENARIOS = {"no-ops only": 0.0, "1 in 5 a real gain": 0.2, "real gains only": 1.0}  # share of 3-sigma gains


def noise_rule_night(rng, share_of_gains, sigma=SIGMA):
    """[(kind, kept, runs)] of one night under analysis.decide."""
    truth = 1.0
    best_runs = [rng.gauss(truth, sigma), rng.gauss(truth, sigma)]
    groups, out = [best_runs], []
    for _ in range(EXPERIMENTS):
        kind = "gain" if rng.random() < share_of_gains else "no-op"
        mean = truth - (3 * sigma if kind == "gain" else 0.0)
        runs = [rng.gauss(mean, sigma)]
        while True:
            floor, df = analysis.noise_floor(groups + [runs])
            decision, _, _ = analysis.decide(runs, best_runs, floor, df)
            if decision != "rerun":
                break
            runs.append(rng.gauss(mean, sigma))
        if len(runs) > 1:
            groups.append(runs)
        if decision == "keep":
            best_runs, truth = runs, mean
        out.append((kind, decision == "keep", len(runs)))
    return out


def strict_rule_night(rng, share_of_gains, sigma=SIGMA):
    """[(kind, kept, runs)] of one night under the original's rule: one run, kept when below the best kept run."""
    truth = 1.0
    best = rng.gauss(truth, sigma)
    out = []
    for _ in range(EXPERIMENTS):
        kind = "gain" if rng.random() < share_of_gains else "no-op"
        mean = truth - (3 * sigma if kind == "gain" else 0.0)
        value = rng.gauss(mean, sigma)
        kept = value < best
        if kept:
            best, truth = value, mean
        out.append((kind, kept, 1))
    return out


def simulate(night, share_of_gains, seed=0):
    """(share of no-ops kept, share of real gains kept, re-runs per experiment) over NIGHTS nights."""
    rng = random.Random(seed)
    results = [r for _ in range(NIGHTS) for r in night(rng, share_of_gains)]
    kept = lambda kind: [k for what, k, _ in results if what == kind]
    share = lambda values: statistics.fmean(values) if values else None
    return share(kept("no-op")), share(kept("gain")), statistics.fmean(runs - 1 for _, _, runs in results)


@pytest.fixture(scope="module")
def table():
    return {(rule, scenario): simulate(night, share) for scenario, share in SCENARIOS.items()
            for rule, night in (("strict", strict_rule_night), ("noise", noise_rule_night))}


def test_no_ops_are_seldom_kept_and_real_gains_nearly_always(table):
    for scenario in ("no-ops only", "1 in 5 a real gain"):
        noop_noise, _, _ = table[("noise", scenario)]
        noop_strict, _, _ = table[("strict", scenario)]
        assert noop_noise <= 0.10 and noop_noise < noop_strict / 2, (scenario, noop_noise, noop_strict)
    for scenario in ("1 in 5 a real gain", "real gains only"):
        assert table[("noise", scenario)][1] >= 0.90, (scenario, table[("noise", scenario)])
    assert all(0 < table[("noise", s)][2] < 1 for s in SCENARIOS)  # re-runs cost less than a run per experiment


def test_a_mean_that_merely_beats_the_best_would_keep_far_more_no_ops(monkeypatch, table):
    """The confirming margin matters: with it at zero (any mean below the best), no-ops pass far more often."""
    monkeypatch.setattr(analysis, "CONFIRM_QUANTILE", 0.5)  # t-quantile 0: any gain confirms
    for scenario in ("no-ops only", "1 in 5 a real gain"):
        loose, _, _ = simulate(noise_rule_night, SCENARIOS[scenario])
        assert loose > 2 * table[("noise", scenario)][0] and loose > 0.08, (scenario, loose)


@pytest.mark.parametrize("p,df,expected", [(0.8, 1, 1.376), (0.8, 2, 1.061), (0.8, 10, 0.879), (0.95, 5, 2.015),
                                           (0.999, 1, 318.309), (0.999, 4, 7.173), (0.999, 30, 3.385)])
def test_t_quantiles_match_the_printed_table(p, df, expected):
    assert analysis.t_quantile(p, df) == pytest.approx(expected, abs=1e-3)


def test_a_floor_from_one_pair_of_identical_runs_does_not_make_every_gain_clear():
    best = [1.000000, 1.000000]  # a deterministic machine: the floor is 0 on 1 df
    floor, df = analysis.noise_floor([best])
    assert (floor, df) == (0.0, 1)
    decision, gain, margin = analysis.decide([0.999000], best, floor, df)
    assert decision == "rerun" and gain == pytest.approx(0.001)
    assert margin == pytest.approx(318.309 * analysis.MIN_NOISE * (1 + 1 / 2) ** 0.5, rel=1e-4)
    assert analysis.decide([0.999000, 0.999000], best, *analysis.noise_floor([best, [0.999, 0.999]]))[0] == "keep"


def print_table():
    print(f"{NIGHTS} nights of {EXPERIMENTS} experiments after a baseline pair, noise sigma {SIGMA}; "
          f"real gains are 3 sigma")
    print("| night | rule | no-ops kept | real gains kept | re-runs per experiment |")
    print("| --- | --- | --- | --- | --- |")
    for scenario, share in SCENARIOS.items():
        for rule, night in (("strict (original)", strict_rule_night), ("noise floor", noise_rule_night)):
            noop, gain, reruns = simulate(night, share)
            cell = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"
            print(f"| {scenario} | {rule} | {cell(noop)} | {cell(gain)} | {reruns:.2f} |")


if __name__ == "__main__":
    print_table()
