"""Bilinear sampling with zero padding, and the multi-scale deformable attention core.

Both InternImage's DCNv3 and the deformable-attention layers of DINO and Mask2Former read
feature maps at fractional locations. They share `bilinear_sample`, written once here in pure
JAX (gathers, no custom kernels), so it runs and differentiates on CPU, GPU and TPU alike.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def bilinear_sample(value: jax.Array, xy: jax.Array) -> jax.Array:
  """Samples feature maps at fractional pixel locations, with zeros outside the map.

  Pixel ``(row i, column j)`` has its centre at ``x = j, y = i``; a point between centres
  mixes its four neighbours, and neighbours outside the map count as zeros. This is
  ``torch.nn.functional.grid_sample(..., mode='bilinear', padding_mode='zeros',
  align_corners=False)`` after converting normalised coordinates ``u`` in [0, 1] to pixels
  with ``x = u * W - 0.5``.

  Args:
    value: ``[N, H, W, C]`` feature maps.
    xy: ``[N, K, 2]`` sampling points, ``(x, y)`` in pixel units.

  Returns:
    ``[N, K, C]`` sampled features, in the dtype of ``value``.
  """
  n, h, w, c = value.shape
  flat = value.reshape(n, h * w, c)
  x, y = xy[..., 0], xy[..., 1]
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  out = jnp.zeros((n, xy.shape[1], c), value.dtype)
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      corner = jnp.take_along_axis(flat, idx[..., None], axis=1)
      weight = jnp.where(inside, wx * wy, 0.0).astype(value.dtype)
      out = out + corner * weight[..., None]
  return out


def ms_deform_attn(
    values: Sequence[jax.Array],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
  """Multi-scale deformable attention: weighted sums of bilinearly sampled values.

  The core of Deformable DETR's attention (used by DINO's encoder/decoder and by
  Mask2Former's pixel decoder), without the projections around it.

  Args:
    values: one ``[B, H_l, W_l, M, D]`` array per level ``l`` (``M`` heads of ``D``
      channels).
    sampling_locations: ``[B, Q, M, L, P, 2]`` points ``(x, y)`` normalised to [0, 1]
      over each level's map (``L`` levels, ``P`` points per level).
    attention_weights: ``[B, Q, M, L, P]``, normally a softmax over ``L * P``.

  Returns:
    ``[B, Q, M * D]`` attended values.
  """
  b, q, m, num_levels, p, _ = sampling_locations.shape
  if len(values) != num_levels:
    raise ValueError(f"got {len(values)} value levels but sampling locations for {num_levels}")
  out = None
  for level, value in enumerate(values):
    _, h, w, _, d = value.shape
    v = value.transpose(0, 3, 1, 2, 4).reshape(b * m, h, w, d)
    loc = sampling_locations[:, :, :, level].transpose(0, 2, 1, 3, 4).reshape(b * m, q * p, 2)
    pix = loc * jnp.asarray([w, h], loc.dtype) - 0.5
    sampled = bilinear_sample(v, pix).reshape(b, m, q, p, d)
    weights = attention_weights[:, :, :, level].astype(sampled.dtype)
    term = jnp.einsum("bmqpd,bqmp->bqmd", sampled, weights)
    out = term if out is None else out + term
  return out.reshape(b, q, m * out.shape[-1])
