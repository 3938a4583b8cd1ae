"""Multi-scale deformable attention (Deformable DETR), shared by the DINO and Mask2Former heads.

Each query attends to a few points per head and per feature level, placed around a
reference point by learned offsets, with learned softmax weights; values are read with
bilinear sampling (`tbgc_jax.ops.ms_deform_attn`).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tbgc_jax.ops import ms_deform_attn


def _offset_bias_init(num_heads: int, num_levels: int, num_points: int):
  """Deformable DETR's start: head h looks along direction 2*pi*h/heads, point p at radius p+1."""

  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(num_heads) * (2.0 * np.pi / num_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
    grid = grid * np.arange(1, num_points + 1)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nnx.Module):
  """Multi-scale deformable attention over NHWC feature levels.

  Args:
    dim: model width ``C`` (queries and values).
    num_levels: number of feature levels ``L``.
    num_heads: attention heads ``M``; ``dim`` must be divisible by it.
    num_points: sampling points ``P`` per head and level.
    rngs: NNX rngs for parameter initialisation.
  """

  def __init__(self, dim: int, num_levels: int = 4, num_heads: int = 8, num_points: int = 4,
               *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"MSDeformAttn: dim={dim} is not divisible by num_heads={num_heads}")
    self.num_levels = num_levels
    self.num_heads = num_heads
    self.num_points = num_points
    lpm = num_heads * num_levels * num_points
    self.sampling_offsets = nnx.Linear(
        dim, lpm * 2, kernel_init=nnx.initializers.zeros,
        bias_init=_offset_bias_init(num_heads, num_levels, num_points), rngs=rngs)
    self.attention_weights = nnx.Linear(
        dim, lpm, kernel_init=nnx.initializers.zeros, rngs=rngs)
    xavier = nnx.initializers.xavier_uniform()
    self.value_proj = nnx.Linear(dim, dim, kernel_init=xavier, rngs=rngs)
    self.output_proj = nnx.Linear(dim, dim, kernel_init=xavier, rngs=rngs)

  def __call__(
      self,
      query: jax.Array,
      reference_points: jax.Array,
      values: Sequence[jax.Array],
      value_masks: Sequence[jax.Array] | None = None,
  ) -> jax.Array:
    """Attends from queries to the feature levels.

    Args:
      query: ``[B, Q, C]`` queries (positional embedding already added).
      reference_points: ``[B, Q, L, 2]`` points ``(x, y)`` normalised to [0, 1] over each
        level's whole (padded) map, or ``[B, Q, L, 4]`` boxes ``(cx, cy, w, h)``, in which
        case offsets scale with the box size. No valid-ratio scaling happens here: for
        padded inputs, multiply coordinates normalised to the valid region by the valid
        ratio first (Deformable DETR's ``reference_points * valid_ratios``).
      values: ``L`` feature maps ``[B, H_l, W_l, C]``.
      value_masks: optional ``L`` bool maps ``[B, H_l, W_l]``, True on valid pixels; padded
        pixels are zeroed before sampling.

    Returns:
      ``[B, Q, C]``.
    """
    if len(values) != self.num_levels:
      raise ValueError(f"MSDeformAttn expects {self.num_levels} levels, got {len(values)}")
    b, q, _ = query.shape
    m, lv, p = self.num_heads, self.num_levels, self.num_points
    heads = []
    for i, v in enumerate(values):
      v = self.value_proj(v)
      if value_masks is not None:
        v = jnp.where(value_masks[i][..., None], v, 0.0)
      heads.append(v.reshape(*v.shape[:3], m, -1))
    offsets = self.sampling_offsets(query).reshape(b, q, m, lv, p, 2)
    weights = self.attention_weights(query).reshape(b, q, m, lv * p)
    weights = jax.nn.softmax(weights, axis=-1).reshape(b, q, m, lv, p)
    ref = reference_points[:, :, None, :, None, :]
    if reference_points.shape[-1] == 2:
      # Offsets are in pixels of each level.
      sizes = jnp.asarray([[v.shape[2], v.shape[1]] for v in values], offsets.dtype)
      locations = ref + offsets / sizes[None, None, None, :, None, :]
    elif reference_points.shape[-1] == 4:
      locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    else:
      raise ValueError(
          f"reference_points must end in 2 or 4 coordinates, got shape {reference_points.shape}")
    out = ms_deform_attn(heads, locations, weights)
    return self.output_proj(out)
