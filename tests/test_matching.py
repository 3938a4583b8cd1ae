"""Hungarian matching inside jit against scipy, with padded targets."""

import jax
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from tbgc_jax.ops import hungarian_match

_match = jax.jit(jax.vmap(hungarian_match))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_valid=st.integers(0, 5))
def test_matches_scipy_on_valid_targets(seed, num_valid):
  rng = np.random.default_rng(seed)
  num_queries, num_targets = 7, 5
  cost = rng.normal(size=(2, num_queries, num_targets)).astype(np.float32)
  valid = np.zeros((2, num_targets), bool)
  valid[:, :num_valid] = True
  # Padding columns hold junk that must not influence the valid assignment.
  junk_shape = (2, num_queries, num_targets - num_valid)
  cost[:, :, num_valid:] = rng.uniform(-100.0, 100.0, size=junk_shape)
  query_of_target, target_of_query = map(np.asarray, _match(cost, valid))
  for b in range(2):
    rows, cols = scipy.optimize.linear_sum_assignment(cost[b, :, :num_valid])
    want_total = cost[b, rows, cols].sum()
    got_total = cost[b, query_of_target[b, :num_valid], np.arange(num_valid)].sum()
    np.testing.assert_allclose(got_total, want_total, rtol=1e-5, atol=1e-5)
    assert len(set(query_of_target[b, :num_valid].tolist())) == num_valid
    # The per-query view agrees with the per-target view and ignores padding.
    for t in range(num_valid):
      assert target_of_query[b, query_of_target[b, t]] == t
    assert (target_of_query[b] >= 0).sum() == num_valid


def test_non_finite_costs_are_avoided():
  cost = np.array([[np.inf, 1.0], [0.0, np.nan], [5.0, 5.0]], np.float32)
  query_of_target, _ = hungarian_match(cost, np.array([True, True]))
  assert query_of_target.tolist() == [1, 0]


def test_rejects_more_targets_than_queries():
  with pytest.raises(ValueError, match="at least as many queries"):
    hungarian_match(np.zeros((2, 3), np.float32), np.ones(3, bool))
