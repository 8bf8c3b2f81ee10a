"""The sanity check's statistics over many images (engine.sanity): rank correlation and SSIM on
hand-built maps with known answers, each step's mean, sd and interval, the verdict on numbers
built to pass, fail and stay unclear, and the cascade over several images of the shipped
model."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr, t

from engine.sanity import (
    PASS_BELOW,
    StepSummary,
    join_cascades,
    spearman_rows,
    ssim,
    summarise_steps,
    verdict,
)

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"


def test_rank_correlation_known_answers():
    a = np.array([1.0, 2, 3, 4, 5])
    # one swap in each of two neighbouring pairs: ρ = 1 - 6 Σd² / (n (n² - 1)) = 1 - 24/120
    rows = np.stack([a, a ** 3, -a, np.array([2.0, 1, 4, 3, 5]), np.ones(5)])
    rho = spearman_rows(rows, a)
    assert rho[:4] == pytest.approx([1.0, 1.0, -1.0, 0.8])
    assert math.isnan(rho[4])  # a constant map has no ranking
    assert np.isnan(spearman_rows(rows[:2], np.zeros(5))).all()
    # ties share their mean rank, as scipy's spearmanr has them; 2-d maps are flattened
    rng = np.random.default_rng(0)
    maps, ref = rng.integers(0, 4, (6, 5, 5)).astype(float), rng.random((5, 5))
    expected = [spearmanr(m.ravel(), ref.ravel()).statistic for m in maps]
    assert spearman_rows(maps, ref) == pytest.approx(expected)


def test_ssim_known_answers():
    rng = np.random.default_rng(1)
    a = rng.random((16, 16))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 1 - a) < 0  # the structure reversed
    # two flat maps: only the luminance term is left, (2 μa μb + C1) / (μa² + μb² + C1)
    c1 = 0.01 ** 2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    assert ssim(np.full((7, 7), 0.5), np.full((7, 7), 0.25)) == pytest.approx(expected)


def test_each_steps_mean_sd_and_interval():
    values = np.array([[1.0, 1.0, 1.0], [0.2, 0.4, 0.6], [0.1, np.nan, 0.3], [np.nan, 0.5,
                                                                           np.nan]])
    trained, step, holed, single = summarise_steps(values)
    assert (trained.mean, trained.sd, trained.low, trained.high) == (1.0, 0.0, 1.0, 1.0)
    half = t.ppf(0.975, 2) * 0.2 / math.sqrt(3)  # Student's t, 2 degrees of freedom
    assert (step.mean, step.sd, step.n) == pytest.approx((0.4, 0.2, 3))
    assert (step.low, step.high) == pytest.approx((0.4 - half, 0.4 + half))
    assert str(step) == "0.40 ± 0.20"
    assert holed.n == 2 and holed.mean == pytest.approx(0.2)  # the constant map left out
    assert single.n == 1 and math.isnan(single.high)  # one value: no interval


def steps(*intervals) -> list[StepSummary]:
    """A trained step, then one step per (low, high) with the mean between them."""
    return [StepSummary(1.0, 0.0, 16, 1.0, 1.0),
            *[StepSummary((lo + hi) / 2, 0.1, 16, lo, hi) for lo, hi in intervals]]


LABELS = ["trained", "classifier", "+ patch layer", "+ backbone 2/2", "+ backbone 1/2"]


def test_verdict_on_numbers_built_to_pass_fail_and_stay_unclear():
    # the classifier step (1) is not judged: only from the whole head random (2) on
    passes = verdict(steps((0.8, 0.9), (0.1, 0.3), (-0.1, 0.2), (0.2, 0.45)), LABELS, 2)
    assert passes.outcome == "passes"
    assert "'+ backbone 1/2'" in passes.text and "0.20 to 0.45" in passes.text
    fails = verdict(steps((0.1, 0.2), (0.85, 0.95), (0.1, 0.2), (0.6, 0.7)), LABELS, 2)
    assert fails.outcome == "fails" and "'+ patch layer'" in fails.text  # the clearest one
    # a rebound at the last step (every layer random) counts as much as any other step
    late = verdict(steps((0.1, 0.2), (0.1, 0.2), (0.1, 0.2), (0.5, 0.6)), LABELS, 2)
    assert late.outcome == "fails" and "'+ backbone 1/2'" in late.text
    straddles = verdict(steps((0.1, 0.2), (0.1, 0.2), (0.46, 0.62), (0.1, 0.2)), LABELS, 2)
    assert straddles.outcome == "unclear" and "more images" in straddles.text
    assert verdict(steps((0.1, 0.2), (0.1, PASS_BELOW), (0.1, 0.2), (0.1, 0.2)), LABELS,
                   2).outcome == "unclear"  # the line itself is not below it
    few = steps((0.1, 0.2), (0.1, 0.2), (0.1, 0.2), (0.1, 0.2))
    few[3] = StepSummary(0.1, math.nan, 1, math.nan, math.nan)
    assert verdict(few, LABELS, 2).outcome == "unclear"


def test_cascade_over_many_images_in_parts():
    """Two parts of a sample joined equal the cascade of the whole sample at once (the
    randomised copies are seeded), and the statistics come with where the judging starts."""
    from engine.checkpoint import load_model
    from engine.data.digits import generate
    from engine.sanity import cascade_similarity

    model, _ = load_model(SHIPPED)
    data = generate("test", 8, 32, False, 0)
    methods = ["loss_attention", "gradcam"]
    whole = cascade_similarity(model, data, range(6), "true", methods, 0.1)
    joined = join_cascades([cascade_similarity(model, data, range(3), "true", methods, 0.1),
                            cascade_similarity(model, data, range(3, 6), "true", methods, 0.1)])
    assert "maps" not in whole
    assert whole["steps"][whole["judged_from"]] == "+ patch layer"
    assert joined["classes"] == whole["classes"]
    for key in ("rho", "ssim"):
        for m in methods:
            assert joined[key][m].shape == (len(whole["steps"]), 6)
            np.testing.assert_allclose(joined[key][m], whole[key][m], atol=1e-6)
            np.testing.assert_allclose(whole[key][m][0], 1.0)  # the trained map vs itself
