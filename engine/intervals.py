"""95 % intervals for differences, and the words that follow them (issue 32).

Two intervals, for two kinds of pairing:

- :func:`paired_bootstrap`: per-image paired values of two maps on the same images (the Compare
  page). The images are resampled with replacement; the interval is the percentile interval of
  the resampled mean differences. It assumes nothing about the shape of the per-image values
  (Increase in Confidence is 0 or 100 per image), which is why it is used there.
- :func:`t_interval`: per-seed paired differences (mutual − alone). With three seeds a bootstrap
  has only 10 distinct resamples, so the Student t interval over seeds (n − 1 degrees of
  freedom) is used; it is wide when n is small, as it should be (t(0.975, 2) = 4.30).

:func:`difference_words` says a difference in words that never claim more than the interval:
a direction only when the interval excludes 0. Torch-free; numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_REPS = 2000
BOOTSTRAP_SEED = 0


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, reps: int = BOOTSTRAP_REPS,
                     seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict:
    """Mean of ``a − b`` over pairs and its percentile bootstrap interval (images resampled).

    A pair with a NaN on either side is dropped (``n`` counts the pairs kept); with no pair
    left every value is None. The same ``seed`` gives the same interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need two 1-D arrays of one length, got {x.shape} "
                         f"and {y.shape}")
    diffs = (x - y)[~(np.isnan(x) | np.isnan(y))]
    if diffs.size == 0:
        return {"difference": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, diffs.size, size=(reps, diffs.size))
    means = diffs[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"difference": float(diffs.mean()), "low": float(low), "high": float(high),
            "n": int(diffs.size)}


def t_interval(diffs: Sequence[float], level: float = 0.95) -> dict:
    """Mean of ``diffs`` and its Student t interval (n − 1 degrees of freedom).

    Fewer than two values give the mean with no interval (low and high None)."""
    from scipy import stats

    values = [float(d) for d in diffs if d is not None and not math.isnan(d)]
    n = len(values)
    if n == 0:
        return {"difference": None, "low": None, "high": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"difference": mean, "low": None, "high": None, "n": n}
    sd = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(1 - (1 - level) / 2, n - 1)) * sd / math.sqrt(n)
    return {"difference": mean, "low": mean - half, "high": mean + half, "n": n}


def excludes_zero(low: float | None, high: float | None) -> bool:
    """Whether the interval lies wholly on one side of 0 (a point interval at 0 does not)."""
    return low is not None and high is not None and (low > 0 or high < 0)


def _num(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def difference_words(name_a: str, name_b: str, metric: str, diff: float | None,
                     low: float | None, high: float | None, better: str = "",
                     digits: int = 2) -> str:
    """One sentence for ``A − B`` in ``metric`` that follows its interval.

    ``better`` is the metric's direction (``"higher"`` / ``"lower"``, as in
    engine.metric_table); a direction is claimed only when the interval excludes 0."""
    if diff is None:
        return f"no {metric} to compare between {name_a} and {name_b}."
    if low is None or high is None:
        return (f"{name_a} − {name_b} in {metric}: {_num(diff, digits)}, with no interval "
                "(fewer than two values), so no direction is claimed.")
    interval = f"95 % interval {_num(low, digits)} to {_num(high, digits)}"
    if not excludes_zero(low, high):
        return (f"no clear difference between {name_a} and {name_b} in {metric} "
                f"({_num(diff, digits)}, {interval} includes 0).")
    side = "higher" if low > 0 else "lower"
    text = (f"{name_a}'s {metric} is {side} than {name_b}'s by {abs(diff):.{digits}f} "
            f"({interval})")
    if better in ("higher", "lower"):
        text += f": {name_a if side == better else name_b} is better"
    return text + "."


def method_differences(per_image: dict[str, dict[str, list]], labels: dict[str, str],
                       metrics: Sequence[tuple[str, str, str]], base: str) -> list[dict]:
    """Each method − ``base``, per metric, from per-image paired values (the same images):
    the mean difference, its paired-bootstrap 95 % interval, and the sentence.

    ``metrics``: (key, label, better) triples; a metric or method without per-image values
    is left out. Rows are ordered by metric, then method."""
    rows = []
    for key, label, better in metrics:
        if key not in per_image.get(base, {}):
            continue
        for method, values in per_image.items():
            if method == base or key not in values:
                continue
            got = paired_bootstrap(values[key], per_image[base][key])
            if got["difference"] is None:
                continue
            digits = 1 if key.endswith("_pct") else 3
            name_a, name_b = labels.get(method, method), labels.get(base, base)
            rows.append({"metric": label, "pair": f"{name_a} − {name_b}",
                         "difference": round(got["difference"], digits),
                         "95 % interval": f"{got['low']:.{digits}f} to {got['high']:.{digits}f}",
                         "n": got["n"],
                         "sentence": difference_words(name_a, name_b, label, got["difference"],
                                                      got["low"], got["high"], better, digits)})
    return rows
