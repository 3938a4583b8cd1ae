"""A gradient method written outside the package, with the public API only: a weighting of the
Gramian, registered and built by name (as a user's own module would)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tbgc_jax

TASKS = ("a", "b", "c")


def softmax_of_inverse_norms(backbone_mask=None, *, tasks, temperature=1.0):
  """Weights softmax(-||g_t|| / temperature): the smaller a task's gradient, the larger its
  weight; a running count of updates as state, to show a stateful weighting."""
  def weighting(step, count):
    norms = jnp.sqrt(jnp.maximum(jnp.diag(step.gram), 0.0))
    logits = jnp.where(step.active, -norms / temperature, -jnp.inf)
    return jax.nn.softmax(logits), count + 1

  return tbgc_jax.from_weighting(weighting, backbone_mask, tasks=tasks,
                                 init_state=lambda: jnp.zeros([], jnp.int32),
                                 name="softmax_of_inverse_norms")


def test_a_method_defined_outside_the_package_registers_and_runs_by_name():
  tbgc_jax.register("softmax_of_inverse_norms", softmax_of_inverse_norms,
                    checks={"temperature": (lambda x: x > 0, "> 0")})
  try:
    with pytest.raises(ValueError, match="temperature must be > 0"):
      tbgc_jax.make_method("softmax_of_inverse_norms", tasks=TASKS, temperature=0.0)
    mask = {"backbone": True, "head": False}
    tx = tbgc_jax.make_method("softmax_of_inverse_norms", mask, tasks=TASKS, temperature=2.0)
    rng = np.random.default_rng(0)
    J = rng.normal(size=(3, 4)).astype(np.float32)
    heads = rng.normal(size=(3, 2)).astype(np.float32)
    grads = {t: {"backbone": jnp.asarray(J[k]), "head": jnp.asarray(heads[k])}
             for k, t in enumerate(TASKS)}
    update = jax.jit(tx.update)
    state = tx.init(grads["a"])
    for _ in range(2):
      out, state = update(grads, state, losses={t: 1.0 for t in TASKS})
    w = np.exp(-np.linalg.norm(J, axis=1) / 2.0)
    w /= w.sum()
    np.testing.assert_allclose(out["backbone"], w @ J, rtol=1e-5)
    np.testing.assert_allclose(out["head"], heads.sum(0), rtol=1e-6)
    assert int(state.inner) == 2
    diag = tbgc_jax.gradient_diagnostics(state)
    np.testing.assert_allclose([diag[f"weight/{t}"] for t in TASKS], w, rtol=1e-5)
  finally:
    tbgc_jax.unregister("softmax_of_inverse_norms")


def test_a_weighting_of_the_wrong_shape_fails_clearly():
  tx = tbgc_jax.from_weighting(lambda step: jnp.ones(2), tasks=TASKS, name="mine")
  grads = {t: jnp.ones(3) for t in TASKS}
  with pytest.raises(ValueError, match=r"mine: the weighting must return one weight per task, "
                                       r"shape \(3,\), got shape \(2,\)"):
    tx.update(grads, tx.init(grads["a"]))
