"""Paired statistics over training seeds: the one copy of the arithmetic behind every seed comparison
of the tables (KS gain, gain from the mask, dual modes vs. the baseline, teacher minus student).

    paired_summary(a, b)   # a[i] - b[i] per seed: n, mean, sample sd, two-sided paired t-test p,
                           # 95% confidence interval of the mean difference (t distribution),
                           # how many differences are positive
    holm(pvalues)          # Holm's step-down adjustment across the comparisons of one table
    welch_summary(a, b)    # two independent samples: mean(a) - mean(b), two-sided Welch t-test p and
                           # 95% confidence interval with the Welch-Satterthwaite degrees of freedom

Values go in at full precision (the records' fractions, or percent); nothing is rounded here. A pair
with a NaN on either side is left out. With one pair there is no spread, so sd, p and the interval are
NaN ("n/a" when printed), not an error; with two or more equal differences the sd is 0 and the t
statistic undefined: p is 1 when the differences are 0 and 0 otherwise, and the interval is the point.
The same holds for welch_summary, with fewer than two values in either sample or both without spread.
"""
import math
import statistics
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


@dataclass(frozen=True)
class WelchSummary:
    """Two independent samples a and b (NaN values left out): their sizes, means and sample sds, the
    difference of means mean_a - mean_b, its standard error, the Welch-Satterthwaite degrees of freedom,
    the two-sided Welch t-test p and the confidence interval of the difference."""
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    diff: float
    se: float
    dof: float
    p: float
    ci_low: float
    ci_high: float


def mean_and_sd(values):
    """(mean, sample sd) of the values that are numbers (NaN left out); NaN where there are too few."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def welch_summary(a, b, confidence=CONFIDENCE):
    """WelchSummary of mean(a) - mean(b) for two independent samples (no pairing, unequal variances):
    t = (mean_a - mean_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b) on the Welch-Satterthwaite degrees of
    freedom (s_a^2 / n_a + s_b^2 / n_b)^2 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1)).
    Fewer than two numbers in either sample: the means (and the difference when both have one), NaN
    for the rest."""
    a = [float(v) for v in a if not math.isnan(float(v))]
    b = [float(v) for v in b if not math.isnan(float(v))]
    (mean_a, sd_a), (mean_b, sd_b) = mean_and_sd(a), mean_and_sd(b)
    diff = mean_a - mean_b
    nan = math.nan
    if len(a) < 2 or len(b) < 2:
        return WelchSummary(len(a), len(b), mean_a, mean_b, sd_a, sd_b, diff, nan, nan, nan, nan, nan)
    va, vb = sd_a ** 2 / len(a), sd_b ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
        return WelchSummary(len(a), len(b), mean_a, mean_b, sd_a, sd_b, diff, se, nan, p, diff, diff)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    p = float(2 * stats.t.sf(abs(diff / se), dof))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    return WelchSummary(len(a), len(b), mean_a, mean_b, sd_a, sd_b, diff, se, dof, p, diff - half, diff + half)
