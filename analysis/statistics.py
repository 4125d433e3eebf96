"""Paired statistics over training seeds: the one copy of the arithmetic behind every seed comparison
of the tables (KS gain, gain from the mask, dual modes vs. the baseline, teacher minus student).

    paired_summary(a, b)   # a[i] - b[i] per seed: n, mean, sample sd, two-sided paired t-test p,
                           # 95% confidence interval of the mean difference (t distribution),
                           # how many differences are positive
    holm(pvalues)          # Holm's step-down adjustment across the comparisons of one table

Values go in at full precision (the records' fractions, or percent); nothing is rounded here. A pair
with a NaN on either side is left out. With one pair there is no spread, so sd, p and the interval are
NaN ("n/a" when printed), not an error; with two or more equal differences the sd is 0 and the t
statistic undefined: p is 1 when the differences are 0 and 0 otherwise, and the interval is the point.
"""
import math
from dataclasses import dataclass, field

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedSummary:
    """Summary of the paired differences a[i] - b[i] (NaN pairs left out)."""
    n: int
    mean: float
    sd: float
    p: float
    ci_low: float
    ci_high: float
    positive: int
    differences: tuple = field(default=())


def paired_summary(a, b, confidence=CONFIDENCE):
    """PairedSummary of a[i] - b[i] over the pairs where both are numbers (not NaN)."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired_summary: {len(a)} values against {len(b)}; expected one per pair")
    diffs = tuple(float(x) - float(y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y)))
    n = len(diffs)
    nan = math.nan
    if n == 0:
        return PairedSummary(0, nan, nan, nan, nan, nan, 0, diffs)
    mean = math.fsum(diffs) / n
    positive = sum(d > 0 for d in diffs)
    if n == 1:
        return PairedSummary(1, mean, nan, nan, nan, nan, positive, diffs)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    dof = n - 1
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
        low = high = mean
    else:
        p = float(2 * stats.t.sf(abs(mean / se), dof))
        half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
        low, high = mean - half, mean + half
    return PairedSummary(n, mean, sd, p, low, high, positive, diffs)


def holm(pvalues):
    """Holm-adjusted p-values, in the order given: with the m finite p-values sorted ascending,
    p_(i) becomes max over j <= i of min(1, (m - j + 1) p_(j)). NaN stays NaN and does not count in m."""
    pvalues = [float(p) for p in pvalues]
    finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(finite)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
