"""Box conversions, IoU and generalised IoU (pairwise and elementwise), in pure JAX; the
rescaling of predicted boxes to the original image (numpy or JAX).

Boxes are ``(cx, cy, w, h)`` ("cxcywh") or ``(x0, y0, x1, y1)`` ("xyxy") in the last axis.
"""

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """Converts ``(cx, cy, w, h)`` boxes to ``(x0, y0, x1, y1)``."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """Converts ``(x0, y0, x1, y1)`` boxes to ``(cx, cy, w, h)``."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0], -1)


def box_area(boxes: jax.Array) -> jax.Array:
  """Area of ``xyxy`` boxes (negative extents count as zero)."""
  return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
          * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def _iou_and_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IoU and union of broadcast-compatible ``xyxy`` boxes ``a`` and ``b``."""
  lt = jnp.maximum(a[..., :2], b[..., :2])
  rb = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a) + box_area(b) - inter
  return inter / jnp.maximum(union, _EPS), union


def _giou(a: jax.Array, b: jax.Array) -> jax.Array:
  iou, union = _iou_and_union(a, b)
  lt = jnp.minimum(a[..., :2], b[..., :2])
  rb = jnp.maximum(a[..., 2:], b[..., 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  hull = wh[..., 0] * wh[..., 1]
  return iou - (hull - union) / jnp.maximum(hull, _EPS)


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise IoU of ``xyxy`` boxes ``[..., 4]`` and ``[..., 4]`` (broadcasting)."""
  return _iou_and_union(a, b)[0]


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise generalised IoU (Rezatofighi et al. 2019) of ``xyxy`` boxes, in [-1, 1]."""
  return _giou(a, b)


def pairwise_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of every box in ``a [..., N, 4]`` with every one in ``b [..., M, 4]``: ``[..., N, M]``."""
  return _iou_and_union(a[..., :, None, :], b[..., None, :, :])[0]


def pairwise_generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Generalised IoU of all pairs of ``xyxy`` boxes ``a [..., N, 4]``, ``b [..., M, 4]``."""
  return _giou(a[..., :, None, :], b[..., None, :, :])


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """``logit(x)`` with ``x`` clipped to [0, 1] and both terms floored at ``eps``."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps)) - jnp.log(jnp.maximum(1.0 - x, eps))


def rescale_boxes(boxes, image_hw, orig_hw):
  """Maps xyxy boxes from network-input pixels to original-image pixels (clipped).

  Undoes the pipeline's resize (padding is bottom/right, so it needs no shift). Works on
  numpy arrays (host) or JAX arrays (device).

  Args:
    boxes: ``[B, K, 4]`` xyxy in pixels of the network input.
    image_hw: ``[B, 2]`` valid (h, w) after resizing.
    orig_hw: ``[B, 2]`` original (h, w).

  Returns:
    ``[B, K, 4]`` xyxy in original pixels, float32.
  """
  xp = np if isinstance(boxes, np.ndarray) else jnp
  image_hw = xp.maximum(xp.asarray(image_hw, xp.float32), 1.0)
  orig_hw = xp.asarray(orig_hw, xp.float32)
  scale = (orig_hw / image_hw)[:, None, ::-1]  # (sx, sy)
  xy = xp.asarray(boxes, xp.float32).reshape(*boxes.shape[:-1], 2, 2) * scale[:, :, None, :]
  xy = xp.clip(xy, 0.0, orig_hw[:, None, None, ::-1])
  return xy.reshape(boxes.shape).astype(xp.float32)
