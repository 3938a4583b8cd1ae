"""Loss-based weightings (FAMO, DWA, RLW, uncertainty) against float64 numpy references."""

import chex
import jax
import jax.numpy as jnp
import mtl_reference as ref
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import tbgc_jax

TASKS = ("a", "b", "c")
MASK = {"backbone": True, "heads": False}
METHODS = ("famo", "dwa", "rlw", "uncertainty", "geometric_mean", "stch", "pbi", "imtl_l", "imtl",
           "gradnorm", "db_mtl")
# Methods whose update is sum_t w_t g_t with the weights in the diagnostics (DB-MTL combines
# running averages of the gradients instead); PBI's and IMTL's (IMTL-G's) can be negative.
WEIGHTED = tuple(m for m in METHODS if m != "db_mtl")
POSITIVE_WEIGHTS = tuple(m for m in WEIGHTED if m not in ("pbi", "imtl"))


def make(method, mask=MASK, tasks=TASKS, **kw):
  return getattr(tbgc_jax, method)(mask, tasks=tasks, **kw)


# ---------------------------------------------------------------- float64 references
def _softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def reference_weights(method, loss_seq, *, beta=0.025, gamma=0.01, temperature=2.0,
                      steps_per_epoch=1, lr=1e-3, eps=1e-8):
  """Weights of each update from each paper's equations, in float64 (RLW: not here)."""
  loss_seq = [np.asarray(x, np.float64) for x in loss_seq]
  k = len(loss_seq[0])
  out = []
  if method == "famo":  # Liu et al. 2023, Eqs. 6, 8, 9
    xi, adam, prev = np.zeros(k), ref.Adam(beta, gamma), None
    for ell in loss_seq:
      if prev is not None:
        delta = np.log(prev + eps) - np.log(ell + eps)
        z = _softmax(xi)
        jac = np.diag(z) - np.outer(z, z)  # dz/dxi
        xi = adam.step(xi, jac.T @ delta)
      z = _softmax(xi)
      w = (z / (ell + eps)) / np.sum(z / (ell + eps))
      out.append(w)
      prev = ell
  elif method == "dwa":  # Liu et al. 2019, Eq. 7, losses averaged per epoch
    epochs = [np.mean(loss_seq[i:i + steps_per_epoch], axis=0)
              for i in range(0, len(loss_seq), steps_per_epoch)]
    for n in range(len(loss_seq)):
      e = n // steps_per_epoch
      if e < 2:
        out.append(np.ones(k))
      else:
        r = epochs[e - 1] / epochs[e - 2]
        out.append(k * np.exp(r / temperature) / np.sum(np.exp(r / temperature)))
  elif method == "uncertainty":  # Kendall et al. 2018, Eq. 7 with s = log sigma^2
    s, adam = np.zeros(k), ref.Adam(lr)
    for ell in loss_seq:
      out.append(0.5 * np.exp(-s))
      s = adam.step(s, 0.5 - 0.5 * np.exp(-s) * ell)
  else:
    raise ValueError(method)
  return out


def reference_update(grads, weights, tasks, backbone):
  """sum_t w_t g_t on backbone leaves, sum_t g_t on heads (float64)."""
  out = {}
  for name in ("backbone", "heads"):
    w = weights if (backbone is None or name == "backbone") else np.ones(len(tasks))
    out[name] = sum(w[k] * np.asarray(grads[t][name], np.float64) for k, t in enumerate(tasks))
  return out


def random_problem(seed, steps, tasks=TASKS):
  rng = np.random.default_rng(seed)
  grads = [{t: {"backbone": rng.normal(size=(3, 2)).astype(np.float32),
                "heads": rng.normal(size=(4,)).astype(np.float32)} for t in tasks}
           for _ in range(steps)]
  losses = [{t: np.float32(rng.uniform(0.05, 5.0)) for t in tasks} for _ in range(steps)]
  return grads, losses


PARAMS = {"backbone": jnp.zeros((3, 2)), "heads": jnp.zeros(4)}


class WeightingReferenceTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(method=("famo", "dwa", "uncertainty"), masked=(True, False))
  def test_matches_reference_over_steps(self, method, masked):
    kw = {"steps_per_epoch": 2} if method == "dwa" else {}
    tx = make(method, MASK if masked else None, **kw)
    grads, losses = random_problem(0, 7)
    update = self.variant(tx.update)
    state = tx.init(PARAMS)
    ref_w = reference_weights(method, [[l_[t] for t in TASKS] for l_ in losses], **kw)
    for g, l_, w in zip(grads, losses, ref_w, strict=True):
      out, state = update(g, state, PARAMS, losses=l_)
      ref = reference_update(g, w, TASKS, "backbone" if masked else None)
      np.testing.assert_allclose(out["backbone"], ref["backbone"], rtol=2e-5, atol=1e-6)
      np.testing.assert_allclose(out["heads"], ref["heads"], rtol=2e-5, atol=1e-6)
      np.testing.assert_allclose([state.diagnostics.weights[t] for t in TASKS], w, rtol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rlw_softmax_of_normal_draws(self):
    tx = make("rlw", seed=3)
    grads, losses = random_problem(1, 4)
    update = self.variant(tx.update)
    state = tx.init(PARAMS)
    key = jax.random.key(3)
    for g, l_ in zip(grads, losses, strict=True):
      out, state = update(g, state, PARAMS, losses=l_)
      key, draw = jax.random.split(key)
      eps = np.asarray(jax.random.normal(draw, (3,)), np.float64)
      ref = reference_update(g, _softmax(eps), TASKS, "backbone")
      np.testing.assert_allclose(out["backbone"], ref["backbone"], rtol=2e-5, atol=1e-6)
      np.testing.assert_allclose(out["heads"], ref["heads"], rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 6),
       method=st.sampled_from(POSITIVE_WEIGHTS))
def test_weight_ranges(seed, steps, method):
  """FAMO and RLW weights are a distribution, DWA's and GradNorm's sum to K; all positive."""
  tx = make(method)
  grads, losses = random_problem(seed, steps)
  state = tx.init(PARAMS)
  for g, l_ in zip(grads, losses, strict=True):
    _, state = tx.update(g, state, PARAMS, losses=l_)
    w = np.array([state.diagnostics.weights[t] for t in TASKS])
    assert np.all(w > 0)
    if method in ("famo", "rlw"):
      np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    if method == "dwa":
      np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-5)
    if method == "gradnorm":
      np.testing.assert_allclose(np.asarray(state.inner.weights).sum(), 3.0, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), method=st.sampled_from(WEIGHTED))
def test_unmasked_is_gradient_of_weighted_loss(seed, method):
  """backbone_mask=None: the update is jax.grad of sum_t w_t L_t (weights on the losses)."""
  rng = np.random.default_rng(seed)
  params = {"backbone": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  targets = {t: rng.normal(size=(3,)).astype(np.float32) for t in TASKS}

  def loss_fn(p, t):
    return jnp.mean((jnp.tanh(p["backbone"].sum(0)) * p["heads"] - targets[t]) ** 2)

  tx = make(method, None)
  state = tx.init(params)
  for _ in range(3):
    losses = {t: loss_fn(params, t) for t in TASKS}
    grads = {t: jax.grad(loss_fn)(params, t) for t in TASKS}
    out, new_state = tx.update(grads, state, params, losses=losses)
    w = new_state.diagnostics.weights
    expected = jax.grad(lambda p, w=w: sum(w[t] * loss_fn(p, t) for t in TASKS))(params)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    state = new_state
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, out)


@pytest.mark.parametrize("method", METHODS)
def test_task_order_does_not_matter(method):
  grads, losses = random_problem(2, 4)
  outs = []
  for tasks in (TASKS, TASKS[::-1]):
    tx = make(method, tasks=tasks)
    state = tx.init(PARAMS)
    for g, l_ in zip(grads, losses, strict=True):
      out, state = tx.update(g, state, PARAMS, losses=l_)
    outs.append(out)
  chex.assert_trees_all_equal(*outs)


@pytest.mark.parametrize("method", METHODS)
def test_in_chain_with_adam_and_no_retrace(method):
  """A chain forwards losses=; the second jitted step does not retrace."""
  chex.clear_trace_counter()
  tx = optax.chain(make(method), optax.adam(1e-2))
  grads, losses = random_problem(3, 3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g, l_):
    upd, state = tx.update(g, state, params, losses=l_)
    return optax.apply_updates(params, upd), state

  params, state = PARAMS, tx.init(PARAMS)
  for g, l_ in zip(grads, losses, strict=True):
    params, state = step(params, state, g, l_)
  assert all(np.all(np.isfinite(x)) and np.any(x != 0) for x in jax.tree.leaves(params))


def test_bf16_gradients_keep_dtype():
  tx = make("famo")
  grads, losses = random_problem(4, 1)
  g = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), grads[0])
  out, _ = tx.update(g, tx.init(PARAMS), PARAMS, losses=losses[0])
  assert {x.dtype for x in jax.tree.leaves(out)} == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------- RLW randomness
def _run_rlw(key, steps, state=None):
  tx = make("rlw", seed=key)
  grads, losses = random_problem(5, steps)
  state = tx.init(PARAMS) if state is None else state
  outs = []
  for g, l_ in zip(grads, losses, strict=True):
    out, state = jax.jit(tx.update)(g, state, PARAMS, losses=l_)
    outs.append([state.diagnostics.weights[t] for t in TASKS])
  return np.array(outs), state


def test_rlw_reproducible_and_key_advances():
  w1, _ = _run_rlw(7, 4)
  w2, _ = _run_rlw(7, 4)
  w3, _ = _run_rlw(8, 4)
  np.testing.assert_array_equal(w1, w2)
  assert not np.allclose(w1, w3)
  assert len({tuple(np.round(r, 6)) for r in w1}) == 4  # a fresh draw every update


def test_rlw_resumes_from_state():
  """A restored state continues the same sequence of draws (the key is in the state)."""
  full, _ = _run_rlw(11, 6)
  first, state = _run_rlw(11, 3)
  restored = np.asarray(jax.random.key_data(state.inner))  # as a checkpoint stores it
  state = state._replace(inner=jax.random.wrap_key_data(jnp.asarray(restored)))
  tx = make("rlw", seed=11)
  grads, losses = random_problem(5, 6)
  rest = []
  for g, l_ in zip(grads[3:], losses[3:], strict=True):
    _, state = jax.jit(tx.update)(g, state, PARAMS, losses=l_)
    rest.append([state.diagnostics.weights[t] for t in TASKS])
  np.testing.assert_array_equal(np.concatenate([first, np.array(rest)]), full)


# ---------------------------------------------------------------- edge cases and errors
def test_dwa_constant_losses_give_unit_weights():
  tx = make("dwa", steps_per_epoch=3)
  state = tx.init(PARAMS)
  grads, _ = random_problem(6, 1)
  for _ in range(10):
    _, state = tx.update(grads[0], state, PARAMS, losses={t: 2.0 for t in TASKS})
  np.testing.assert_allclose([state.diagnostics.weights[t] for t in TASKS], 1.0, rtol=1e-6)


def test_uncertainty_log_vars_approach_the_loss():
  """Fixed point of the s-gradient: exp(s_t) = L_t."""
  tx = make("uncertainty", learning_rate=0.05)
  state = tx.init(PARAMS)
  grads, _ = random_problem(7, 1)
  losses = {"a": 0.2, "b": 1.0, "c": 6.0}
  for _ in range(400):
    _, state = jax.jit(tx.update)(grads[0], state, PARAMS, losses=losses)
  np.testing.assert_allclose(np.exp(state.inner.log_vars), [0.2, 1.0, 6.0], rtol=0.05)


def test_famo_upweights_the_task_that_stalls():
  tx = make("famo", learning_rate=0.1)
  state = tx.init(PARAMS)
  grads, _ = random_problem(8, 1)
  for n in range(30):
    losses = {"a": 1.0 * 0.9 ** n, "b": 1.0, "c": 1.0 * 0.9 ** n}  # b does not improve
    _, state = tx.update(grads[0], state, PARAMS, losses=losses)
  logits = state.inner.logits
  assert logits[1] > logits[0] and logits[1] > logits[2]


@pytest.mark.parametrize("method", METHODS)
def test_errors(method):
  tx = make(method)
  grads, losses = random_problem(9, 1)
  state = tx.init(PARAMS)
  with pytest.raises(TypeError, match="losses"):
    tx.update(grads[0], state, PARAMS)
  with pytest.raises(ValueError, match="losses for tasks"):
    tx.update(grads[0], state, PARAMS, losses={"a": 1.0})
  with pytest.raises(ValueError, match="expected exactly"):
    tx.update({"a": grads[0]["a"]}, state, PARAMS, losses=losses[0])
  with pytest.raises(ValueError, match="selects no parameter"):
    make(method, {"backbone": False, "heads": False}).init(PARAMS)
  with pytest.raises(ValueError, match="distinct"):
    make(method, tasks=("a", "a"))


@pytest.mark.parametrize("method", METHODS)
def test_registered_and_built_by_name(method):
  assert tbgc_jax.get_method(method).uses_losses
  tx = tbgc_jax.make_method(method, MASK, tasks=TASKS)
  grads, losses = random_problem(10, 1)
  direct = make(method)
  out, _ = tx.update(grads[0], tx.init(PARAMS), PARAMS, losses=losses[0])
  ref, _ = direct.update(grads[0], direct.init(PARAMS), PARAMS, losses=losses[0])
  chex.assert_trees_all_equal(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_task_dropped_and_state_stays_finite(method):
  tx = make(method)
  grads, losses = random_problem(11, 3)
  state = tx.init(PARAMS)
  for g, l_ in zip(grads, losses, strict=True):
    g = {**g, "b": jax.tree.map(lambda x: np.full_like(x, np.nan), g["b"])}
    out, state = tx.update(g, state, PARAMS, losses={**l_, "b": np.float32(np.nan)})
    arrays = [x for x in jax.tree.leaves((out, state))
              if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert all(np.all(np.isfinite(x)) for x in arrays)
  assert int(state.diagnostics.num_nonfinite["b"]) == 3
