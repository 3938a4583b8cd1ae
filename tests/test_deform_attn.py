"""MSDeformAttn module: shapes, reference-point forms, masking, and its starting sampling grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.models.deform_attn import MSDeformAttn


def _levels(rng, b=2, c=16, sizes=((8, 8), (4, 4))):
  return [jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32) for h, w in sizes]


def test_shapes_for_point_and_box_references():
  rng = np.random.default_rng(0)
  attn = MSDeformAttn(16, num_levels=2, num_heads=4, num_points=2, rngs=nnx.Rngs(0))
  query = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  values = _levels(rng)
  points = jnp.asarray(rng.uniform(size=(2, 5, 2, 2)), jnp.float32)
  boxes = jnp.asarray(rng.uniform(0.1, 0.5, size=(2, 5, 2, 4)), jnp.float32)
  assert attn(query, points, values).shape == (2, 5, 16)
  assert attn(query, boxes, values).shape == (2, 5, 16)
  with pytest.raises(ValueError, match="2 or 4"):
    attn(query, jnp.zeros((2, 5, 2, 3)), values)
  with pytest.raises(ValueError, match="expects 2 levels"):
    attn(query, points, values[:1])


def test_padded_values_do_not_leak():
  rng = np.random.default_rng(1)
  attn = MSDeformAttn(16, num_levels=2, num_heads=4, num_points=2, rngs=nnx.Rngs(0))
  query = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  values = _levels(rng)
  masks = [jnp.ones(v.shape[:3], bool).at[:, :, v.shape[2] // 2:].set(False) for v in values]
  points = jnp.asarray(rng.uniform(size=(2, 5, 2, 2)), jnp.float32)
  base = attn(query, points, values, masks)
  # Changing what sits in the padded half changes nothing.
  noisy = [jnp.where(m[..., None], v, 1e3) for v, m in zip(values, masks, strict=True)]
  np.testing.assert_allclose(attn(query, points, noisy, masks), base, atol=1e-5)


def test_initial_offsets_form_directional_grid():
  attn = MSDeformAttn(16, num_levels=1, num_heads=4, num_points=2, rngs=nnx.Rngs(0))
  bias = np.asarray(attn.sampling_offsets.bias[...]).reshape(4, 1, 2, 2)
  # Head 0 looks right (+x), head 1 down (+y); point p sits at radius p + 1.
  np.testing.assert_allclose(bias[0, 0], [[1, 0], [2, 0]], atol=1e-6)
  np.testing.assert_allclose(bias[1, 0], [[0, 1], [0, 2]], atol=1e-6)


def test_gradients_are_finite_under_jit():
  rng = np.random.default_rng(2)
  attn = MSDeformAttn(16, num_levels=2, num_heads=4, num_points=2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(attn)
  query = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  values = _levels(rng)
  points = jnp.asarray(rng.uniform(size=(2, 5, 2, 2)), jnp.float32)

  @jax.jit
  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(query, points, values) ** 2)

  grads = jax.grad(loss)(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  # The offsets receive gradient: sampling locations are differentiable.
  assert float(jnp.abs(grads["sampling_offsets"]["kernel"][...]).sum()) > 0
