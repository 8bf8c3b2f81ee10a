"""Known answers for engine.intervals: the bootstrap, the t interval, and the words (issue 32)."""

import math

import numpy as np
import pytest
from scipy import stats

from engine.intervals import difference_words, excludes_zero, paired_bootstrap, t_interval


def test_bootstrap_constant_difference_has_zero_width():
    a = np.arange(20, dtype=float)
    got = paired_bootstrap(a + 3.0, a)
    assert got["difference"] == pytest.approx(3.0)
    assert got["low"] == pytest.approx(3.0) and got["high"] == pytest.approx(3.0)
    assert got["n"] == 20


def test_bootstrap_known_mean_and_interval_around_it():
    rng = np.random.default_rng(1)
    b = rng.normal(size=400)
    a = b + 1.0 + rng.normal(scale=0.5, size=400)
    got = paired_bootstrap(a, b)
    diffs = a - b
    assert got["difference"] == pytest.approx(diffs.mean())
    assert got["low"] < got["difference"] < got["high"]
    # The percentile interval's half-width is close to 1.96 standard errors of the mean.
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert (got["high"] - got["low"]) / 2 == pytest.approx(1.96 * se, rel=0.15)


def test_bootstrap_drops_pairs_with_a_nan_and_repeats_with_its_seed():
    a = [1.0, 2.0, float("nan"), 4.0, 10.0]
    b = [0.0, 0.0, 0.0, float("nan"), 0.0]
    got = paired_bootstrap(a, b)
    assert got["n"] == 3 and got["difference"] == pytest.approx((1 + 2 + 10) / 3)
    assert paired_bootstrap(a, b) == got
    assert paired_bootstrap([float("nan")], [1.0])["difference"] is None
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_t_interval_equals_the_hand_computation():
    diffs = [-0.8, 1.3, -2.9]
    got = t_interval(diffs)
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert got["difference"] == pytest.approx(mean)
    assert got["low"] == pytest.approx(mean - half) and got["high"] == pytest.approx(mean + half)
    one = t_interval([2.0])
    assert one["difference"] == 2.0 and one["low"] is None and one["high"] is None


def test_words_switch_exactly_when_the_interval_crosses_zero():
    below = difference_words("A", "B", "Average Drop", -1.0, -1.5, -0.01, "lower")
    assert below.startswith("A's Average Drop is lower than B's by 1.00")
    assert "A is better" in below
    above = difference_words("A", "B", "Average Drop", 1.0, 0.01, 2.0, "lower")
    assert "higher than B's" in above and "B is better" in above
    touching = difference_words("A", "B", "Average Drop", -1.0, -2.0, 0.0, "lower")
    crossing = difference_words("A", "B", "Average Drop", -1.0, -2.0, 0.01, "lower")
    for text in (touching, crossing):
        assert text.startswith("no clear difference between A and B in Average Drop")
        assert "includes 0" in text and "better" not in text
    assert not excludes_zero(-2.0, 0.0) and excludes_zero(-2.0, -1e-9)
    no_interval = difference_words("A", "B", "accuracy", 0.5, None, None, "higher")
    assert "no direction is claimed" in no_interval


def test_method_differences_pair_each_method_with_the_base_per_metric():
    from engine.intervals import method_differences

    per_image = {"la": {"average_drop_pct": [10.0, 20.0, 30.0, 40.0], "deletion_auc": [0.1] * 4},
                 "gc": {"average_drop_pct": [15.0, 25.0, 35.0, 45.0], "deletion_auc": [0.1] * 4},
                 "pp": {"average_drop_pct": [10.0, 20.0, 30.0, 40.0]}}
    metrics = [("average_drop_pct", "Average Drop %", "lower"),
               ("deletion_auc", "deletion AUC", "lower")]
    rows = method_differences(per_image, {"la": "LA", "gc": "GC", "pp": "PP"}, metrics, "la")
    assert [(r["metric"], r["pair"]) for r in rows] == [
        ("Average Drop %", "GC − LA"), ("Average Drop %", "PP − LA"), ("deletion AUC", "GC − LA")]
    gc, pp, deletion = rows
    assert gc["difference"] == 5.0 and gc["95 % interval"] == "5.0 to 5.0"
    assert "GC's Average Drop % is higher than LA's by 5.0" in gc["sentence"]
    assert "LA is better" in gc["sentence"]
    # Equal values: a zero-width interval at 0, which does not exclude 0.
    assert pp["sentence"].startswith("no clear difference between PP and LA")
    assert deletion["sentence"].startswith("no clear difference")
