"""The experiments' statistics (`benchmarks.stats`) against hand-computed cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import stats

T975_1 = 12.706204736174698  # t_{0.975} with 1 degree of freedom
T975_2 = 4.302652729749464  # t_{0.975} with 2 degrees of freedom


def test_t_interval_by_hand_and_edge_cases():
  iv = stats.t_interval([1.0, 2.0, 3.0])  # sd 1
  assert iv.mean == 2.0 and iv.n == 3
  assert iv.half == pytest.approx(T975_2 / math.sqrt(3), rel=1e-10)
  assert stats.t_interval([1.0, 3.0]).half == pytest.approx(T975_1 * math.sqrt(2) / math.sqrt(2))
  one = stats.t_interval([5.0])
  assert one.mean == 5.0 and math.isnan(one.half) and one.n == 1  # no interval from one seed
  assert math.isnan(stats.t_interval([]).mean) and stats.t_interval([]).n == 0


def test_t_interval_coverage():
  """About 95% of intervals from normal samples of 5 contain the true mean."""
  rng = np.random.default_rng(0)
  hits = sum(abs(iv.mean - 1.0) <= iv.half
             for iv in (stats.t_interval(rng.normal(1.0, 2.0, 5)) for _ in range(200)))
  assert 0.9 <= hits / 200 <= 0.99


def test_paired_by_hand():
  # d = (2, 3, 2): mean 7/3, sd sqrt(1/3), t = 7 with 2 df; seed 9 is only in a: ignored.
  d = stats.paired({0: 3.0, 1: 5.0, 2: 4.0, 9: 100.0}, {0: 1.0, 1: 2.0, 2: 2.0})
  assert d.n == 3 and (d.positive, d.negative) == (3, 0)
  assert d.mean == pytest.approx(7 / 3)
  assert d.half == pytest.approx(T975_2 / 3, rel=1e-10)
  # P(|T_2| > t) = 1 - t / sqrt(t^2 + 2).
  assert d.p == pytest.approx(1 - 7 / math.sqrt(51), rel=1e-9)
  # Seed-shared noise cancels: the unpaired spread is large, the paired one is 0.
  a = {s: 10.0 * s + 1.0 for s in range(4)}
  b = {s: 10.0 * s for s in range(4)}
  same = stats.paired(a, b)
  assert same.mean == pytest.approx(1.0) and same.half == pytest.approx(0.0, abs=1e-12)
  assert same.p == 0.0 and stats.t_interval(list(a.values())).half > 10
  zero = stats.paired(b, b)
  assert zero.p == 1.0 and (zero.positive, zero.negative) == (0, 0)
  assert math.isnan(stats.paired({0: 1.0}, {0: 0.0}).p)


def test_sign_test_and_chance_of_same_signs():
  assert stats.sign_test(3, 0) == 0.25 == stats.sign_test(0, 3)
  assert stats.sign_test(5, 0) == 0.0625
  assert stats.sign_test(2, 1) == 1.0 and stats.sign_test(0, 0) == 1.0
  assert stats.all_same_sign_expected(16, 3) == 4.0


def test_holm_by_hand():
  # Sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06.
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
  out = stats.holm([0.02, math.nan, 0.5])  # nan is not a test: a family of two
  np.testing.assert_allclose(out[[0, 2]], [0.04, 0.5])
  assert math.isnan(out[1])
  assert stats.holm([0.6, 0.7]).tolist() == [1.0, 1.0]  # capped at 1
  assert stats.holm([]).size == 0


@settings(max_examples=40, deadline=None)
@given(p=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_properties(p):
  adj = stats.holm(p)
  assert np.all(adj >= np.asarray(p) - 1e-15) and np.all(adj <= 1.0)
  assert np.all(adj <= np.minimum(1.0, len(p) * np.asarray(p)) + 1e-12)  # never above Bonferroni
  order = np.argsort(p, kind="stable")
  assert np.all(np.diff(adj[order]) >= -1e-15)  # monotone in the raw p-values


@settings(max_examples=50, deadline=None)
@given(data=st.data(), n=st.integers(1, 5))
def test_delta_m_matches_libmtl_definition(data, n):
  """LibMTL's count_improvement: mean of (-1)^w (M_m - M_b) / M_b, in percent; unit-free."""
  pos = st.floats(0.01, 100.0)
  tasks = [f"t{i}" for i in range(n)]
  base = {t: data.draw(pos) for t in tasks}
  metrics = {t: data.draw(pos) for t in tasks}
  lower = {t: int(data.draw(st.booleans())) for t in tasks}
  ref = 100.0 * sum((-1.0) ** lower[t] * (metrics[t] - base[t]) / base[t] for t in tasks) / n
  hb = {t: not lower[t] for t in tasks}
  np.testing.assert_allclose(stats.delta_m(metrics, base, hb), ref, rtol=1e-12, atol=1e-12)
  assert stats.delta_m(base, base, hb) == 0.0
  scaled = stats.delta_m({**metrics, "t0": 27.2 * metrics["t0"]},
                         {**base, "t0": 27.2 * base["t0"]}, hb)
  np.testing.assert_allclose(scaled, stats.delta_m(metrics, base, hb), rtol=1e-9, atol=1e-9)


def test_delta_m_interval_by_hand():
  hb = {"a": True}
  # m = (2, 4), b = (1, 3): f = 100 (3 / 2 - 1) = 50; linearised per seed
  # 50 + 100 ((m - 3) / 2 - 3 (b - 2) / 4) = 75, 25.
  method = {0: {"a": 2.0}, 1: {"a": 4.0}}
  single = {"a": {0: 1.0, 1: 3.0}}
  assert stats.delta_m_values(method, single, hb) == {0: 75.0, 1: 25.0}
  dm = stats.delta_m_interval(method, single, hb)
  assert dm.mean == 50.0 and dm.n == 2
  assert dm.half == pytest.approx(T975_1 * 25.0, rel=1e-10)  # sd 25 sqrt(2) / sqrt(2)
  # A noiseless baseline: the interval of the per-seed Δm%.
  exact = {"a": {0: 2.0, 1: 2.0, 2: 2.0}}
  runs = {0: {"a": 2.0}, 1: {"a": 3.0}, 2: {"a": 2.5}}
  per_seed = [stats.delta_m(runs[s], {"a": 2.0}, hb) for s in range(3)]
  got = stats.delta_m_interval(runs, exact, hb)
  ref = stats.t_interval(per_seed)
  assert got.mean == pytest.approx(ref.mean) and got.half == pytest.approx(ref.half)
  # The baselines against themselves: exactly 0, whatever their noise.
  base = stats.delta_m_interval({s: {"a": v} for s, v in single["a"].items()}, single, hb)
  assert base.mean == 0.0 and base.half == 0.0 and base.p == 1.0
  # Only seeds every baseline has count.
  assert stats.delta_m_interval({**method, 7: {"a": 9.0}}, single, hb).n == 2


def test_delta_m_interval_carries_the_baseline_noise():
  """Gaussian method and baseline metrics with true Δm% = +10: the intervals cover it about
  95% of the time, and are wider than those that treat the baseline mean as exact."""
  rng = np.random.default_rng(1)
  hb = {"a": True, "b": False}
  hits, wider = 0, 0
  for _ in range(200):
    b = {"a": rng.normal(1.0, 0.05, 8), "b": rng.normal(2.0, 0.1, 8)}
    m = {"a": rng.normal(1.2, 0.05, 8), "b": rng.normal(2.0, 0.1, 8)}  # +20% on a, 0 on b
    method = {s: {t: m[t][s] for t in hb} for s in range(8)}
    single = {t: dict(enumerate(b[t])) for t in hb}
    dm = stats.delta_m_interval(method, single, hb)
    hits += abs(dm.mean - 10.0) <= dm.half
    naive = stats.t_interval([stats.delta_m(method[s], {t: b[t].mean() for t in hb}, hb)
                              for s in range(8)])
    wider += dm.half > naive.half
  assert 0.9 <= hits / 200 <= 0.99
  assert wider / 200 > 0.8


def test_bootstrap_ranks():
  hb = {"a": True}
  single = {"a": {s: 1.0 + 0.01 * s for s in range(5)}}
  methods = {m: {s: {"a": base + 0.001 * s} for s in range(5)}
             for m, base in (("low", 0.5), ("high", 2.0), ("mid", 1.0))}
  ranks = stats.bootstrap_ranks(methods, single, hb)
  assert ranks == {"high": stats.Rank(1, 1, 1), "mid": stats.Rank(2, 2, 2),
                   "low": stats.Rank(3, 3, 3)}
  # Two methods that trade places seed by seed: each ranks 1.5 and its interval spans 1 to 2.
  swap = {"x": {s: {"a": 1.0 + (-1) ** s} for s in range(6)},
          "y": {s: {"a": 1.0 - (-1) ** s + 1e-3} for s in range(6)}}
  single6 = {"a": dict.fromkeys(range(6), 1.0)}
  r = stats.bootstrap_ranks(swap, single6, hb)
  assert r["x"].low == 1 and r["x"].high == 2 and r["y"].low == 1 and r["y"].high == 2
  assert stats.bootstrap_ranks(swap, single6, hb) == r  # fixed RNG seed
  with pytest.raises(ValueError, match="no seed shared"):
    stats.bootstrap_ranks({"x": {0: {"a": 1.0}}}, {"a": {1: 1.0}}, hb)


def test_formatting():
  assert stats.fmt_interval(1.234, 0.5, signed=True) == "+1.23 ± 0.50"
  assert stats.fmt_interval(1.234, math.nan) == "1.23"
  assert stats.fmt_interval(math.nan, math.nan) == "-"
  assert stats.fmt_p(0.0004) == "<0.001" and stats.fmt_p(0.04) == "0.040"
  assert stats.fmt_p(math.nan) == "-"
