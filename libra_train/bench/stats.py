"""Error bars for accuracies: over seeds (Student's t), over a finite question set (binomial), paired differences.

Two sources of noise enter an accuracy measured on a held-out set:

* *training randomness* (initialisation, data order and, when every seed generates its own data, which
  questions are asked): seen only by repeating the experiment. With ``n`` seeds the mean has standard error
  ``s / sqrt(n)`` (``s`` the sample standard deviation) and its 95% interval is ``mean +- t_{0.975, n-1} *
  s / sqrt(n)``; with 3 seeds ``t = 4.30``, so few seeds give wide intervals, honestly.
* *the finite question set*: ``k`` correct of ``N`` questions is a binomial sample; `binomial_interval` gives
  Wilson's 95% interval (``scipy.stats.binomtest(...).proportion_ci``), which is sensible near 0 and 1 where the
  normal approximation is not. Pooled over seeds it is the error of the measurement alone, a lower bound on the
  seed interval when every seed asks its own questions.

Methods compared on the same model and the same questions differ by much less than either interval suggests
(the noise is shared): `paired_interval` is the t-interval of the per-seed differences, the test of "A beats B".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["Interval", "binomial_interval", "paired_interval", "seed_interval"]


@dataclass(frozen=True)
class Interval:
    """A mean (or proportion), its standard error and a two-sided confidence interval; NaN where undefined
    (one seed has no spread)."""

    mean: float
    se: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (False when the interval is undefined)."""
        return not math.isnan(self.low) and (value < self.low or value > self.high)

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready, with ``half_width``; NaN becomes None."""
        data = {**asdict(self), "half_width": self.half_width}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}


def seed_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``values`` (one per seed), standard error ``s / sqrt(n)`` and the Student-t interval.

    Raises:
        ValueError: no values.
    """
    from scipy import stats

    n = len(values)
    if n == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    t = float(stats.t.ppf((1 + level) / 2, n - 1))
    return Interval(mean, se, mean - t * se, mean + t * se, n, level)


def binomial_interval(correct: int, total: int, level: float = 0.95) -> Interval:
    """Proportion ``correct / total`` with its binomial standard error ``sqrt(p (1 - p) / N)`` and Wilson's
    interval.

    Raises:
        ValueError: ``total`` < 1 or ``correct`` outside ``[0, total]``.
    """
    from scipy import stats

    if total < 1 or not 0 <= correct <= total:
        raise ValueError(
            f"binomial_interval needs 0 <= correct <= total and total >= 1, got {correct}/{total}"
        )
    p = correct / total
    ci = stats.binomtest(int(correct), int(total)).proportion_ci(confidence_level=level, method="wilson")
    return Interval(p, math.sqrt(p * (1 - p) / total), float(ci.low), float(ci.high), int(total), level)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The t-interval of ``a[i] - b[i]`` over seeds: is A better than B on the same models and questions?

    Raises:
        ValueError: different lengths or no values.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_interval needs one value per seed on both sides, got {len(a)} and {len(b)}")
    return seed_interval([x - y for x, y in zip(a, b)], level)
