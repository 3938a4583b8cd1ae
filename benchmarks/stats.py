"""Statistics of every experiment command: seed-paired differences, Δm% with the baseline's noise,
Holm's correction, bootstrap ranks.

Every run of a grid is identified by its seed, and a seed fixes the initialisation and the
batches of every method (and of the single-task baselines) alike. So two methods are compared
*paired by seed*: the differences seed by seed, their Student-t interval, the count of seeds on
each side of 0 and a two-sided paired t-test. A table that tests many pairs reports
Holm-corrected p-values (family-wise error at 5%) and says so in its caption.

Δm% (LibMTL) divides by the single-task baselines' metrics, which are seed-noisy runs too. Its
interval here carries that noise by the *delta method*: each seed contributes the first-order
(linearised) value of Δm% in its method run and its baseline runs, and the interval is the
Student-t interval of those per-seed values. That choice over a bootstrap: with 5 to 10 seeds a
percentile bootstrap interval is too narrow (it lacks the t tail and the (n - 1) / n variance
factor), while the delta method keeps the t correction and the pairing by seed; Δm% is nearly
linear in the seed noise, which is a few percent of each baseline metric. Ranks of methods, a
discrete and non-linear statistic, get percentile-bootstrap intervals over seeds (resampled
jointly for all methods and baselines, fixed RNG seed).

Holm's step-down adjustment is written out here (six lines) because ``scipy.stats`` offers only
false-discovery-rate control (``false_discovery_control``), not family-wise control.

References:
  Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 1979.
  Lin et al., LibMTL (``count_improvement``), JMLR 2023.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

LEVEL = 0.95  # two-sided confidence level of every interval
ALPHA = 0.05  # family-wise error rate of the Holm-corrected verdicts
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


class Interval(NamedTuple):
  """Mean over seeds and the half-width of its two-sided Student-t interval.

  Attributes:
    mean: sample mean (nan for no values).
    half: half-width (nan for fewer than two values: no interval from one seed).
    n: number of values.
  """

  mean: float
  half: float
  n: int


class Paired(NamedTuple):
  """A difference ``a - b`` paired by seed.

  Attributes:
    mean: mean of the per-seed differences.
    half: half-width of their two-sided Student-t interval (nan for n < 2).
    n: seeds present in both.
    positive: seeds with ``a > b``.
    negative: seeds with ``a < b``.
    p: two-sided p-value of the paired t-test of a zero mean difference (nan for n < 2, 1 when
      every difference is 0).
  """

  mean: float
  half: float
  n: int
  positive: int
  negative: int
  p: float


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
  """Mean and half-width of the two-sided Student-t interval of the mean.

  Args:
    values: one value per seed.
    level: confidence level.

  Returns:
    `Interval`; half-width nan when fewer than two values.

  >>> round(t_interval([1.0, 2.0, 3.0]).half, 6)  # t_{0.975, 2} * 1 / sqrt(3)
  2.484138
  """
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return Interval(math.nan, math.nan, 0)
  if x.size < 2:
    return Interval(float(x.mean()), math.nan, 1)
  half = stats.t.ppf(0.5 + level / 2, x.size - 1) * stats.sem(x)
  return Interval(float(x.mean()), float(half), int(x.size))


def _t_test_p(d: np.ndarray) -> float:
  """Two-sided p of a one-sample t-test of mean 0 (1 for all-zero, nan for n < 2)."""
  if d.size < 2:
    return math.nan
  if not np.any(d):
    return 1.0
  if np.ptp(d) == 0:  # constant, non-zero differences: the mean is exactly non-zero
    return 0.0
  return float(stats.ttest_1samp(d, 0.0).pvalue)


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Paired:
  """The seed-paired difference ``a - b`` over the seeds present in both.

  Args:
    a: ``{seed: value}``.
    b: ``{seed: value}``.
    level: confidence level.

  Returns:
    `Paired`.

  >>> p = paired({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.0})
  >>> round(p.mean, 4), p.positive, p.negative
  (2.3333, 3, 0)
  """
  seeds = sorted(set(a) & set(b))
  d = np.array([a[s] - b[s] for s in seeds], np.float64)
  iv = t_interval(d, level)
  return Paired(iv.mean, iv.half, iv.n, int(np.sum(d > 0)), int(np.sum(d < 0)), _t_test_p(d))


def sign_test(positive: int, negative: int) -> float:
  """Two-sided exact sign test (binomial, p = 1/2) of ``positive`` against ``negative`` seeds.

  With n seeds all on one side the p-value is ``2 ** (1 - n)``: 0.25 for 3 seeds, so "better in
  every one of 3 seeds" is what a zero effect gives one comparison in four.

  >>> sign_test(3, 0)
  0.25
  """
  n = positive + negative
  if n == 0:
    return 1.0
  return float(stats.binomtest(positive, n, 0.5).pvalue)


def all_same_sign_expected(comparisons: int, seeds: int) -> float:
  """Expected count of all-same-sign comparisons among ``comparisons`` null ones of ``seeds``
  seeds each (continuous, symmetric noise: probability ``2 ** (1 - seeds)`` each)."""
  return comparisons * 2.0 ** (1 - seeds)


def holm(pvalues: Sequence[float]) -> np.ndarray:
  """Holm's step-down adjusted p-values (family-wise error control); nan entries stay nan and
  do not count in the family.

  Args:
    pvalues: raw p-values of one family of tests.

  Returns:
    f64 array of adjusted p-values, in the input order.

  >>> holm([0.01, 0.04, 0.03]).round(4).tolist()
  [0.03, 0.06, 0.06]
  """
  p = np.asarray(pvalues, np.float64)
  out = np.full(p.shape, np.nan)
  ok = np.flatnonzero(~np.isnan(p))
  order = ok[np.argsort(p[ok], kind="stable")]
  m = len(order)
  adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else np.zeros(0)
  out[order] = np.minimum(adjusted, 1.0)
  return out


# ------------------------------------------------------------------ Δm%
def delta_m(metrics: Mapping[str, float], baseline: Mapping[str, float],
            higher_better: Mapping[str, bool]) -> float:
  """LibMTL's Δm%: the mean over tasks of the signed relative change, in percent.

  Args:
    metrics: ``{task: metric}`` of a multi-task model.
    baseline: ``{task: metric}`` of the single-task models.
    higher_better: ``{task: whether higher is better}``.

  Returns:
    ``100 / T sum_t (+-1) (M_t - B_t) / B_t``, sign + where higher is better.

  >>> delta_m({"a": 2.0}, {"a": 1.0}, {"a": False})
  -100.0
  """
  terms = [(1.0 if higher_better[t] else -1.0) * (metrics[t] - baseline[t]) / baseline[t]
           for t in baseline]
  return 100.0 * float(np.mean(terms))


def _arrays(method: Mapping[int, Mapping[str, float]],
            single: Mapping[str, Mapping[int, float]], higher_better: Mapping[str, bool]):
  """(M f64[n, T], B f64[n, T], signs f64[T], seeds) over the seeds the method and every
  single-task baseline share."""
  tasks = list(higher_better)
  seeds = sorted(set(method).intersection(*(set(single[t]) for t in tasks)))
  m = np.array([[method[s][t] for t in tasks] for s in seeds], np.float64).reshape(-1, len(tasks))
  b = np.array([[single[t][s] for t in tasks] for s in seeds], np.float64).reshape(-1, len(tasks))
  sign = np.array([1.0 if higher_better[t] else -1.0 for t in tasks])
  return m, b, sign, seeds


def delta_m_values(method: Mapping[int, Mapping[str, float]],
                   single: Mapping[str, Mapping[int, float]],
                   higher_better: Mapping[str, bool]) -> dict[int, float]:
  """Per seed, the delta-method (linearised) value of Δm% with the baseline's noise.

  With ``f(m, b) = 100 / T sum_t s_t (m_t / b_t - 1)`` at the seed means ``(m̄, b̄)``, seed i
  contributes ``f + 100 / T sum_t s_t ((m_it - m̄_t) / b̄_t - m̄_t (b_it - b̄_t) / b̄_t^2)``.
  Their mean is Δm% of the means; their spread holds the method's and the baselines' seed
  noise, paired by seed.

  Args:
    method: ``{seed: {task: metric}}`` of the method's runs.
    single: ``{task: {seed: metric}}`` of the single-task runs.
    higher_better: ``{task: whether higher is better}``.

  Returns:
    ``{seed: value}`` over the seeds the method and every baseline share.
  """
  m, b, sign, seeds = _arrays(method, single, higher_better)
  if not seeds:
    return {}
  mbar, bbar = m.mean(0), b.mean(0)
  f = 100.0 * np.mean(sign * (mbar / bbar - 1.0))
  lin = 100.0 * np.mean(sign * ((m - mbar) / bbar - mbar * (b - bbar) / bbar ** 2), axis=1)
  return {s: float(f + v) for s, v in zip(seeds, lin, strict=True)}


class DeltaM(NamedTuple):
  """Δm% of a method over seeds, the baselines' seed noise included (delta method).

  Attributes:
    mean: Δm% of the seed-mean metrics against the seed-mean baselines.
    half: half-width of the two-sided Student-t interval (nan for n < 2).
    n: seeds shared by the method and every baseline.
    p: two-sided p-value of the t-test of Δm% = 0 (nan for n < 2).
  """

  mean: float
  half: float
  n: int
  p: float


def delta_m_interval(method: Mapping[int, Mapping[str, float]],
                     single: Mapping[str, Mapping[int, float]],
                     higher_better: Mapping[str, bool], level: float = LEVEL) -> DeltaM:
  """Δm% with its interval and test, the single-task baselines' seed noise propagated.

  Args:
    method: ``{seed: {task: metric}}``.
    single: ``{task: {seed: metric}}``.
    higher_better: ``{task: whether higher is better}``.
    level: confidence level.

  Returns:
    `DeltaM` (a method identical to its baselines gets ``0 ± 0``).
  """
  z = np.array(list(delta_m_values(method, single, higher_better).values()))
  iv = t_interval(z, level)
  p = math.nan if z.size < 2 else _t_test_p(z)
  return DeltaM(iv.mean, iv.half, iv.n, p)


class Rank(NamedTuple):
  """A method's rank by Δm% (1 = best) and its percentile-bootstrap interval over seeds."""

  rank: float
  low: float
  high: float


def bootstrap_ranks(methods: Mapping[str, Mapping[int, Mapping[str, float]]],
                    single: Mapping[str, Mapping[int, float]],
                    higher_better: Mapping[str, bool], level: float = LEVEL,
                    resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> dict[str, Rank]:
  """Ranks of methods by Δm% (1 = best; ties share the mean rank), with bootstrap intervals.

  Each resample draws seeds with replacement from those every method and every baseline share,
  and recomputes every method's Δm% against the resampled baselines; the interval is the
  percentile interval of each method's rank over the resamples.

  Args:
    methods: ``{method: {seed: {task: metric}}}``.
    single: ``{task: {seed: metric}}``.
    higher_better: ``{task: whether higher is better}``.
    level: confidence level.
    resamples: bootstrap resamples.
    seed: RNG seed of the resampling.

  Returns:
    ``{method: Rank}``.

  Raises:
    ValueError: when no seed is shared by every method and baseline.
  """
  names = list(methods)
  tasks = list(higher_better)
  seeds = sorted(set.intersection(*(set(methods[k]) for k in names),
                                  *(set(single[t]) for t in tasks)))
  if not seeds:
    raise ValueError(f"no seed shared by all of {names} and the single-task baselines")
  m = np.array([[[methods[k][s][t] for t in tasks] for s in seeds] for k in names])
  b = np.array([[single[t][s] for t in tasks] for s in seeds])
  sign = np.array([1.0 if higher_better[t] else -1.0 for t in tasks])

  def dm(mm, bb):  # mm [..., K, n, T], bb [..., n, T] -> [..., K]
    bbar = bb.mean(-2)[..., None, :]
    return 100.0 * np.mean(sign * (mm.mean(-2) / bbar - 1.0), axis=-1)

  observed = stats.rankdata(-dm(m, b))
  idx = np.random.default_rng(seed).integers(0, len(seeds), (resamples, len(seeds)))
  boot = stats.rankdata(-dm(m[:, idx].transpose(1, 0, 2, 3), b[idx]), axis=-1)
  low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=0,
                            method="inverted_cdf")
  return {k: Rank(float(observed[i]), float(low[i]), float(high[i]))
          for i, k in enumerate(names)}


# ------------------------------------------------------------------ formatting
def fmt_interval(mean: float, half: float, digits: int = 2, signed: bool = False) -> str:
  """``mean ± half`` (``mean`` alone without an interval, ``-`` for no value)."""
  if math.isnan(mean):
    return "-"
  m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
  return m if math.isnan(half) else f"{m} ± {half:.{digits}f}"


def fmt_p(p: float) -> str:
  """A p-value for a table: ``-`` (none), ``<0.001`` or three decimals."""
  if math.isnan(p):
    return "-"
  return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_signs(d: Paired) -> str:
  """Seeds above / below 0, e.g. ``5/0``."""
  return f"{d.positive}/{d.negative}"
