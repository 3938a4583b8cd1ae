"""per_task_value_and_grad: equal to separate gradients; sequential mode saves real memory."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tbgc_jax


def _loss(p, x, scale):
  return scale * jnp.sum(jnp.tanh(x @ p["w"]) @ p["h"]), {"mean": jnp.mean(x), "n": x.shape[0]}


@pytest.mark.parametrize("sequential", [False, True])
def test_matches_separate_value_and_grad(sequential):
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "h": jnp.ones((3,))}
  # Different batch shapes per task, as the three vision tasks have.
  batches = {"a": jnp.ones((2, 4)), "b": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
  fn = tbgc_jax.per_task_value_and_grad({"a": _loss, "b": _loss}, has_aux=True,
                                        sequential=sequential)
  (losses, aux), grads = jax.jit(fn)(params, batches, 3.0)
  for t in "ab":
    (want_loss, want_aux), want_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True))(
        params, batches[t], 3.0)
    np.testing.assert_allclose(losses[t], want_loss, rtol=1e-6)
    chex.assert_trees_all_close(aux[t], want_aux, rtol=1e-6)
    chex.assert_trees_all_close(grads[t], want_grad, rtol=1e-6)
  with pytest.raises(ValueError, match="expected exactly"):
    fn(params, {"a": batches["a"]}, 3.0)


def _mlp_setup(tasks="abc", width=128, rows=1024, depth=4):
  keys = iter(jax.random.split(jax.random.key(0), 16))
  params = {"trunk": [jax.random.normal(next(keys), (width, width)) * 0.05 for _ in range(depth)],
            "heads": {t: jax.random.normal(next(keys), (width, 1)) for t in tasks}}

  def make_loss(task):
    def loss(p, x):
      h = x
      for w in p["trunk"]:
        h = jnp.tanh(h @ w)
      return jnp.mean((h @ p["heads"][task]) ** 2)
    return loss

  batches = {t: jax.random.normal(next(keys), (rows, width)) for t in tasks}
  return params, {t: make_loss(t) for t in tasks}, batches


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_sequential_mode_holds_one_task_of_activations():
  """Algorithm 1 in XLA: peak temp memory ~ one task's step plus the per-task gradients."""
  params, losses, batches = _mlp_setup()
  # Baseline: one task's value_and_grad step (what a training step runs per task).
  one = _temp_bytes(lambda p, x: jax.value_and_grad(losses["a"])(p, x["a"]), params, batches)
  together = _temp_bytes(tbgc_jax.per_task_value_and_grad(losses), params, batches)
  sequential = _temp_bytes(tbgc_jax.per_task_value_and_grad(losses, sequential=True),
                           params, batches)
  grads_bytes = 3 * sum(x.nbytes for x in jax.tree.leaves(params))
  assert sequential <= 1.1 * one + grads_bytes, (one, sequential, grads_bytes)
  assert together > 2 * one  # what the plain form costs on this backend
  # Same gradients either way.
  a = jax.jit(tbgc_jax.per_task_value_and_grad(losses))(params, batches)
  b = jax.jit(tbgc_jax.per_task_value_and_grad(losses, sequential=True))(params, batches)
  chex.assert_trees_all_close(a, b, rtol=1e-6)
