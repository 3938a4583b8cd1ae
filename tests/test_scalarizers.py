"""Scalarizers (geometric mean, STCH, PBI), IMTL-L, IMTL, GradNorm, MoCo and DB-MTL against
float64 references of their papers' equations (``mtl_reference.py``), and their properties."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import mtl_reference as ref
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tbgc_jax

TASKS = ("a", "b", "c")
MASK = {"backbone": True, "heads": False}
PARAMS = {"backbone": jnp.zeros((3, 2)), "heads": jnp.zeros(4)}
PREFERENCE = {"a": 0.5, "b": 0.2, "c": 0.3}
IDEAL = {"a": 0.01, "b": 0.02, "c": 0.0}
SCALARIZATIONS = {
    "geometric_mean": ({}, lambda L: ref.geometric_mean(L)),
    "stch": ({"mu": 0.5, "preference": PREFERENCE, "ideal": IDEAL},
             lambda L: ref.stch(L, 0.5, np.array([0.5, 0.2, 0.3]), np.array([0.01, 0.02, 0.0]))),
    "pbi": ({"theta": 2.0, "preference": PREFERENCE, "ideal": IDEAL},
            lambda L: ref.pbi(L, 2.0, np.array([0.5, 0.2, 0.3]), np.array([0.01, 0.02, 0.0]))),
}
STATEFUL = {
    "imtl_l": (ref.imtl_l_updates, 1e-5),
    "imtl": (functools.partial(ref.imtl_l_updates, hybrid=True), 2e-3),
    "gradnorm": (ref.gradnorm_updates, 1e-5),
    "moco": (ref.moco_updates, 1e-5),
    "db_mtl": (ref.db_mtl_updates, 1e-5),
}
NEW = tuple(SCALARIZATIONS) + tuple(STATEFUL)


@functools.cache
def _method(name, **hparams):
  hparams = {k: dict(v) if isinstance(v, tuple) else v for k, v in hparams.items()}
  tx = tbgc_jax.make_method(name, MASK, tasks=TASKS, **hparams)
  return tx, jax.jit(tx.update)


def _problem(seed, steps, scale=1.0):
  rng = np.random.default_rng(seed)
  Js = [(rng.normal(size=(3, 6)) * scale).astype(np.float32) for _ in range(steps)]
  heads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(steps)]
  losses = [rng.uniform(0.05, 5.0, size=3).astype(np.float32) for _ in range(steps)]
  return Js, heads, losses


def _grads(J, heads):
  return {t: {"backbone": jnp.asarray(J[k].reshape(3, 2)), "heads": jnp.asarray(heads[k])}
          for k, t in enumerate(TASKS)}


def _run(name, Js, heads, losses, **hparams):
  """The method's outputs and states over the steps, with hashable hyperparameters."""
  hashable = {k: tuple(sorted(v.items())) if isinstance(v, dict) else v
              for k, v in hparams.items()}
  tx, update = _method(name, **hashable)
  state, outs = tx.init(PARAMS), []
  for J, h, L in zip(Js, heads, losses, strict=True):
    out, state = update(_grads(J, h), state, losses=dict(zip(TASKS, L, strict=True)))
    outs.append((out, state))
  return outs


def _rel_err(got, want):
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


# ---------------------------------------------------------------- float64 references
@pytest.mark.parametrize("name", sorted(SCALARIZATIONS))
def test_weights_are_the_gradient_of_the_scalarization(name):
  hparams, fn = SCALARIZATIONS[name]
  Js, heads, losses = _problem(0, 3)
  for (out, state), J, h, L in zip(_run(name, Js, heads, losses, **hparams), Js, heads, losses,
                                   strict=True):
    w = ref.numeric_grad(fn, L)
    got_w = np.array([state.diagnostics.weights[t] for t in TASKS])
    np.testing.assert_allclose(got_w, w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["backbone"]).ravel(), w @ J, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["heads"], h.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_methods_match_float64_over_steps(name):
  reference, tol = STATEFUL[name]
  Js, heads, losses = _problem(1, 6)
  want = reference([(J.astype(np.float64), L.astype(np.float64))
                    for J, L in zip(Js, losses, strict=True)])
  for (out, _), w, h in zip(_run(name, Js, heads, losses), want, heads, strict=True):
    assert _rel_err(np.asarray(out["backbone"], np.float64).ravel(), w) < tol
    np.testing.assert_allclose(out["heads"], h.sum(0), rtol=1e-6, atol=1e-6)


def test_imtl_without_scales_is_imtl_g():
  Js, heads, losses = _problem(2, 1)
  (out, _), = _run("imtl", Js, heads, losses)
  tx = tbgc_jax.imtl_g(MASK, tasks=TASKS)
  want, _ = jax.jit(tx.update)(_grads(Js[0], heads[0]), tx.init(PARAMS))
  chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- properties
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-2.0, 2.0))
def test_properties_over_steps(seed, log_scale):
  Js, heads, losses = _problem(seed, 3, scale=10.0 ** log_scale)
  runs = {name: _run(name, Js, heads, losses) for name in ("imtl", "gradnorm", "moco",
                                                            "db_mtl")}
  for step, J in enumerate(Js):
    units = J / np.linalg.norm(J, axis=1, keepdims=True)
    # IMTL: equal projections of the update on every task's unit gradient.
    proj = units @ np.asarray(runs["imtl"][step][0]["backbone"]).ravel()
    np.testing.assert_allclose(proj, proj[0], rtol=1e-3, atol=1e-6 * np.abs(proj).max())
    # GradNorm: positive weights summing to T.
    w = np.asarray(runs["gradnorm"][step][1].inner.weights)
    assert np.all(w >= 0) and abs(w.sum() - 3.0) < 1e-5
    # MoCo: lambda on the simplex.
    lam = np.asarray(runs["moco"][step][1].inner.lambdas)
    assert np.all(lam >= 0) and abs(lam.sum() - 1.0) < 1e-5
    # DB-MTL: every task contributes a backbone gradient of the same norm, up to the eps 1e-8
    # added to norms >= ~1e-4 here.
    after = runs["db_mtl"][step][1].diagnostics.norm_after
    norms = np.array([after[t] for t in TASKS])
    np.testing.assert_allclose(norms, norms.max(), rtol=2e-4)


def test_stch_tends_to_the_worst_task_and_geometric_mean_equalises_w_times_loss():
  Js, heads, losses = _problem(3, 1)
  (_, state), = _run("stch", Js, heads, losses, mu=1e-3)
  w = np.array([state.diagnostics.weights[t] for t in TASKS])
  worst = int(np.argmax(losses[0]))
  np.testing.assert_allclose(w, np.eye(3)[worst] / 3, atol=1e-6)
  (_, state), = _run("geometric_mean", Js, heads, losses)
  wl = np.array([state.diagnostics.weights[t] for t in TASKS]) * losses[0]
  np.testing.assert_allclose(wl, ref.geometric_mean(losses[0].astype(np.float64)) / 3,
                             rtol=1e-5)


def test_moco_is_order_invariant_and_drops_nonfinite_tasks():
  Js, heads, losses = _problem(4, 3)
  outs = []
  for tasks in (TASKS, TASKS[::-1]):
    tx = tbgc_jax.moco(MASK, tasks=tasks)
    state = tx.init(PARAMS)
    for J, h in zip(Js, heads, strict=True):
      out, state = jax.jit(tx.update)(_grads(J, h), state)
    outs.append(out)
  chex.assert_trees_all_equal(*outs)
  # A NaN task is the same as a zero task, and counted.
  tx = tbgc_jax.moco(MASK, tasks=TASKS)
  bad = _grads(Js[0], heads[0])
  zero = _grads(Js[0], heads[0])
  bad["b"] = jax.tree.map(lambda x: x.at[0].set(np.nan), bad["b"])
  zero["b"] = jax.tree.map(jnp.zeros_like, zero["b"])
  update = jax.jit(tx.update)
  got, state = update(bad, tx.init(PARAMS))
  want, _ = update(zero, tx.init(PARAMS))
  chex.assert_trees_all_equal(got, want)
  assert int(state.diagnostics.num_nonfinite["b"]) == 1
  # TorchJD's test matrix, first step (docs/methods.md): y = J / 2, lambda = P(0.55, 0.3).
  tx = tbgc_jax.moco(tasks=("a", "b"))
  J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
  np.testing.assert_allclose(tx.update(J, tx.init(J["a"]))[0], [-0.125, 0.5, 0.5], rtol=1e-6)


def test_moco_in_chain_without_retrace_and_low_precision():
  chex.clear_trace_counter()
  tx = optax.chain(tbgc_jax.moco(MASK, tasks=TASKS), optax.adam(1e-2))
  Js, heads, _ = _problem(5, 3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, g):
    upd, state = tx.update(g, state, params)
    return optax.apply_updates(params, upd), state

  params, state = PARAMS, tx.init(PARAMS)
  for J, h in zip(Js, heads, strict=True):
    params, state = step(params, state, _grads(J, h))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(Js[0], heads[0]))
  out, _ = jax.jit(tbgc_jax.moco(MASK, tasks=TASKS).update)(low, tx.init(PARAMS)[0])
  chex.assert_trees_all_equal_dtypes(out, low["a"])


def test_registered_with_their_factories_and_bad_hyperparameters():
  for name in NEW:
    assert name in tbgc_jax.method_names()
    assert tbgc_jax.get_method(name).factory is getattr(tbgc_jax, name)
    assert tbgc_jax.get_method(name).uses_losses == (name != "moco")
  with pytest.raises(ValueError, match="mu must be > 0"):
    tbgc_jax.make_method("stch", tasks=TASKS, mu=0.0)
  with pytest.raises(ValueError, match="preference must map each task"):
    tbgc_jax.stch(tasks=TASKS, preference={"a": 1.0})
  with pytest.raises(ValueError, match="non-negative"):
    tbgc_jax.pbi(tasks=TASKS, preference={"a": -1.0, "b": 1.0, "c": 1.0})
  # Preference and ideal point from a config (as config.grad.hparams gives them).
  config = ml_collections.ConfigDict(SCALARIZATIONS["stch"][0])
  tx = tbgc_jax.make_method("stch", MASK, tasks=TASKS, **config)
  Js, heads, losses = _problem(7, 1)
  got, _ = jax.jit(tx.update)(_grads(Js[0], heads[0]), tx.init(PARAMS),
                              losses=dict(zip(TASKS, losses[0], strict=True)))
  (want, _), = _run("stch", Js, heads, losses, **SCALARIZATIONS["stch"][0])
  chex.assert_trees_all_equal(got, want)
  with pytest.raises(ValueError, match="beta must be in"):
    tbgc_jax.make_method("db_mtl", tasks=TASKS, beta=1.5)


# ---------------------------------------------------------------- optional: TorchJD itself
TORCHJD = {"geometric_mean": ("GeometricMean", {}),
           "stch": ("STCH", {"mu": 0.5, "weights": [0.5, 0.2, 0.3],
                             "reference": [0.01, 0.02, 0.0]}),
           "pbi": ("PBI", {"theta": 2.0, "weights": [0.5, 0.2, 0.3],
                           "reference": [0.01, 0.02, 0.0]}),
           "imtl_l": ("IMTLL", {"shape": 3})}


@pytest.mark.parametrize("name", sorted(TORCHJD))
def test_weights_agree_with_torchjd_scalarizers(name):
  """TorchJD's scalarizer differentiated by torch autograd at the same losses."""
  torch = pytest.importorskip("torch")
  scalarization = pytest.importorskip("torchjd.scalarization")
  cls, kw = TORCHJD[name]
  kw = {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v
        for k, v in kw.items()}
  scalarizer = getattr(scalarization, cls)(**kw).double()
  hparams = SCALARIZATIONS[name][0] if name in SCALARIZATIONS else {}
  Js, heads, losses = _problem(6, 3)
  for (_, state), L in zip(_run(name, Js, heads, losses, **hparams), losses, strict=True):
    values = torch.tensor(L, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(scalarizer(values), values)
    got = np.array([state.diagnostics.weights[t] for t in TASKS])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)
    if name == "imtl_l":  # TorchJD's scales stay at their initial value here.
      break
