"""Mask2Former's mask-classification losses for semantic segmentation, with fixed shapes.

Semantic targets: one target per class present in the label map (slot ``t`` is class ``t``,
``valid`` says whether it is present), so an image has at most ``num_classes`` targets and no
host-side preprocessing. Matching (per image and per decoder layer, Hungarian on
``2 * class + 5 * mask BCE + 5 * dice`` over ``K`` uniformly sampled points) then losses on
``K`` points per matched mask chosen by importance sampling (``3K`` random candidates, the
``0.75K`` most uncertain kept, the rest uniform): cross-entropy (no-object weight 0.1), sigmoid
BCE and dice.

Ignore pixels (255) are no target's foreground and never contribute: every sampled point
carries a validity weight (its label pixel is not 255), weighted out of both costs and losses,
and invalid candidates are never preferred as "uncertain" points. Targets at points are read
from the label pixel containing the point (nearest); the original bilinearly samples binary
target masks, which differs only on the one-pixel boundary ring at full resolution and would
blend ignore pixels into the targets.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from tbgc_jax.ops import bilinear_sample, hungarian_match
from tbgc_jax.schema import IGNORE_LABEL


def semantic_targets(label: jax.Array, num_classes: int, valid: jax.Array | None = None,
                     ignore_index: int = IGNORE_LABEL):
  """Per-class binary targets of a semantic label map, padded to ``num_classes`` slots.

  Args:
    label: ``[B, H, W]`` class ids, ``ignore_index`` ignored.
    num_classes: number of classes ``C`` (= target slots).
    valid: optional ``[B]`` bool; padding examples get no valid target.
    ignore_index: ignored label id.

  Returns:
    ``(classes [B, C] int32, masks [B, C, H, W] bool, target_valid [B, C] bool)``: slot ``t``
    is class ``t``, valid where the class has at least one pixel.
  """
  label = label.astype(jnp.int32)
  ids = jnp.arange(num_classes, dtype=jnp.int32)
  masks = label[:, None] == ids[None, :, None, None]
  target_valid = masks.any(axis=(2, 3))
  del ignore_index  # 255 equals no class id, so it is nobody's foreground.
  if valid is not None:
    target_valid &= valid.astype(bool)[:, None]
  classes = jnp.broadcast_to(ids, target_valid.shape)
  return classes, masks, target_valid


def _class_presence(label: jax.Array, num_classes: int) -> jax.Array:
  """``[B, C]`` bool: class present in the label map (without materialising masks)."""
  label = label.astype(jnp.int32).reshape(label.shape[0], -1)
  onehot_counts = jax.vmap(lambda x: jnp.bincount(x, length=num_classes + 1))(
      jnp.where((label >= 0) & (label < num_classes), label, num_classes))
  return onehot_counts[:, :num_classes] > 0


def sample_logits(mask_logits: jax.Array, points: jax.Array) -> jax.Array:
  """Bilinear reading of mask logits at normalised points (``grid_sample``, zero padding).

  Args:
    mask_logits: ``[N, h, w]``.
    points: ``[N, K, 2]`` ``(x, y)`` in [0, 1] of the image.

  Returns:
    ``[N, K]``.
  """
  h, w = mask_logits.shape[1:]
  pix = points * jnp.asarray([w, h], points.dtype) - 0.5
  return bilinear_sample(mask_logits[..., None], pix)[..., 0]


def sample_labels(label: jax.Array, points: jax.Array) -> jax.Array:
  """Label id of the pixel containing each normalised point.

  Args:
    label: ``[B, H, W]``.
    points: ``[B, ..., 2]`` ``(x, y)`` in [0, 1].

  Returns:
    ``[B, ...]`` int32 ids.
  """
  b, h, w = label.shape
  col = jnp.clip(jnp.floor(points[..., 0] * w), 0, w - 1).astype(jnp.int32)
  row = jnp.clip(jnp.floor(points[..., 1] * h), 0, h - 1).astype(jnp.int32)
  flat = (row * w + col).reshape(b, -1)
  out = jnp.take_along_axis(label.reshape(b, -1).astype(jnp.int32), flat, axis=1)
  return out.reshape(points.shape[:-1])


def match_cost(class_logits, point_logits, point_targets, point_weights, target_classes,
               cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0):
  """Matching cost of one image: ``[Q, T]``.

  Args:
    class_logits: ``[Q, C + 1]`` (last = no object).
    point_logits: ``[Q, K]`` mask logits at the K points.
    point_targets: ``[T, K]`` float targets at the points.
    point_weights: ``[K]`` 1 for valid points, 0 for ignore.
    target_classes: ``[T]`` int class ids.
    cost_class, cost_mask, cost_dice: cost weights.

  Returns:
    ``[Q, T]`` cost: ``-cost_class * p(class) + cost_mask * mean BCE + cost_dice * dice``.
  """
  prob = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  c_class = -prob[:, target_classes]
  x = point_logits.astype(jnp.float32)
  t = point_targets.astype(jnp.float32)
  w = point_weights.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  # BCE(x, t) = softplus(x) - x * t, summed over points with weights.
  c_mask = ((jax.nn.softplus(x) * w).sum(-1)[:, None] - (x * w) @ t.T) / n
  s = jax.nn.sigmoid(x) * w
  c_dice = 1.0 - (2.0 * s @ t.T + 1.0) / (s.sum(-1)[:, None] + (t * w).sum(-1)[None, :] + 1.0)
  return cost_class * c_class + cost_mask * c_mask + cost_dice * c_dice


def importance_points(uniform: jax.Array, mask_logits: jax.Array, label: jax.Array,
                      num_points: int, oversample_ratio: float = 3.0,
                      importance_ratio: float = 0.75) -> jax.Array:
  """Chooses loss points: the most uncertain of random candidates, plus uniform ones.

  Args:
    uniform: ``[B, T, num_uniform(num_points, oversample_ratio, importance_ratio), 2]``
      uniform draws in [0, 1): the candidates first, then the uniform points. (Drawn by the
      caller in one `jax.random.uniform`: each call site costs seconds of CPU compile.)
    mask_logits: ``[B, T, h, w]`` logits of the mask matched to each target (no gradient
      flows through the choice).
    label: ``[B, H, W]`` label map; candidates on ignore pixels rank last.
    num_points: ``K``.
    oversample_ratio: candidates per point.
    importance_ratio: fraction of the ``K`` points taken by uncertainty.

  Returns:
    ``[B, T, K, 2]`` normalised points.
  """
  b, t = mask_logits.shape[:2]
  num_over = int(num_points * oversample_ratio)
  num_imp = int(importance_ratio * num_points)
  if uniform.shape[2] != num_uniform(num_points, oversample_ratio, importance_ratio):
    raise ValueError(f"importance_points: uniform has {uniform.shape[2]} draws per target, "
                     f"expected {num_uniform(num_points, oversample_ratio, importance_ratio)}")
  cand = uniform[:, :, :num_over]
  logits = jax.lax.stop_gradient(mask_logits).reshape(b * t, *mask_logits.shape[2:])
  at = sample_logits(logits, cand.reshape(b * t, num_over, 2)).reshape(b, t, num_over)
  ok = sample_labels(label, cand) != IGNORE_LABEL
  uncertainty = jnp.where(ok, -jnp.abs(at), -jnp.inf)
  _, idx = jax.lax.top_k(uncertainty, num_imp)
  chosen = jnp.take_along_axis(cand, idx[..., None], axis=2)
  return jnp.concatenate([chosen, uniform[:, :, num_over:]], axis=2)


def num_uniform(num_points: int, oversample_ratio: float = 3.0,
                importance_ratio: float = 0.75) -> int:
  """Uniform draws per target that `importance_points` consumes."""
  return int(num_points * oversample_ratio) + num_points - int(importance_ratio * num_points)


def losses_at_points(class_logits, mask_logits, label, valid, target_of_query,
                     query_of_target, target_valid, points, no_object_weight: float = 0.1):
  """Cross-entropy, mask BCE and dice of one decoder layer, given matching and loss points.

  Args:
    class_logits: ``[B, Q, C + 1]``.
    mask_logits: ``[B, Q, h, w]``.
    label: ``[B, H, W]``.
    valid: ``[B]`` bool, False for padding examples.
    target_of_query: ``[B, Q]`` matched target slot (= class) or -1.
    query_of_target: ``[B, T]`` matched query of each target slot.
    target_valid: ``[B, T]`` bool.
    points: ``[B, T, K, 2]`` loss points per target.
    no_object_weight: cross-entropy weight of the no-object class.

  Returns:
    dict with ``loss_ce``, ``loss_mask``, ``loss_dice`` (float32 scalars).
  """
  b, q, c1 = class_logits.shape
  num_classes = c1 - 1
  tgt = jnp.where(target_of_query >= 0, target_of_query, num_classes)
  logp = jax.nn.log_softmax(class_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  w_ce = jnp.where(tgt == num_classes, no_object_weight, 1.0) * valid[:, None]
  loss_ce = (w_ce * nll).sum() / jnp.maximum(w_ce.sum(), 1e-6)

  t = query_of_target.shape[1]
  k = points.shape[2]
  matched = jnp.take_along_axis(mask_logits, query_of_target[:, :, None, None], axis=1)
  x = sample_logits(matched.reshape(b * t, *matched.shape[2:]),
                    points.reshape(b * t, k, 2)).reshape(b, t, k).astype(jnp.float32)
  lab = sample_labels(label, points)
  ids = jnp.arange(t, dtype=jnp.int32)[None, :, None]
  y = (lab == ids).astype(jnp.float32)
  w = (lab != IGNORE_LABEL).astype(jnp.float32)
  pair = target_valid.astype(jnp.float32)
  num_masks = jnp.maximum(pair.sum(), 1.0)
  bce = ((jax.nn.softplus(x) - x * y) * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)
  s = jax.nn.sigmoid(x) * w
  dice = 1.0 - (2.0 * (s * y).sum(-1) + 1.0) / (s.sum(-1) + (y * w).sum(-1) + 1.0)
  return {
      "loss_ce": loss_ce,
      "loss_mask": (bce * pair).sum() / num_masks,
      "loss_dice": (dice * pair).sum() / num_masks,
  }


def layer_loss(rng: jax.Array, class_logits: jax.Array, mask_logits: jax.Array,
               label: jax.Array, valid: jax.Array, *, num_points: int,
               oversample_ratio: float = 3.0, importance_ratio: float = 0.75,
               no_object_weight: float = 0.1, cost_class: float = 2.0,
               cost_mask: float = 5.0, cost_dice: float = 5.0) -> dict[str, jax.Array]:
  """Matching and losses of one decoder layer's predictions (see module docstring).

  Args:
    rng: key for the matching and loss points: one uniform draw ``[B, K + C * n, 2]``, the
      first ``K`` per image for matching, the rest `importance_points`' draws per target.
    class_logits: ``[B, Q, C + 1]``.
    mask_logits: ``[B, Q, h, w]``.
    label: ``[B, H, W]`` class ids, 255 ignored.
    valid: ``[B]`` bool.
    num_points: ``K`` points for matching and per mask loss.
    oversample_ratio, importance_ratio: importance sampling of loss points.
    no_object_weight: cross-entropy weight of the no-object class.
    cost_class, cost_mask, cost_dice: matcher weights.

  Returns:
    dict with ``loss_ce``, ``loss_mask``, ``loss_dice``.
  """
  b, q, c1 = class_logits.shape
  num_classes = c1 - 1
  if q < num_classes:
    raise ValueError(f"Mask2Former semantic loss needs num_queries ({q}) >= num_classes "
                     f"({num_classes}): every class present must get a query")
  valid = valid.astype(bool)
  target_valid = _class_presence(label, num_classes) & valid[:, None]
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  n_u = num_uniform(num_points, oversample_ratio, importance_ratio)
  draws = jax.random.uniform(rng, (b, num_points + num_classes * n_u, 2))
  mpts = draws[:, :num_points]
  lab = sample_labels(label, mpts)
  y = (lab[:, None, :] == classes[None, :, None]).astype(jnp.float32)
  w = (lab != IGNORE_LABEL).astype(jnp.float32)
  h, w_ = mask_logits.shape[2:]
  # One bilinear read of all Q masks (as channels) at the image's shared matching points.
  x = bilinear_sample(jax.lax.stop_gradient(mask_logits).transpose(0, 2, 3, 1),
                      mpts * jnp.asarray([w_, h], mpts.dtype) - 0.5).transpose(0, 2, 1)
  cost = jax.vmap(lambda cl, xx, yy, ww: match_cost(
      cl, xx, yy, ww, classes, cost_class, cost_mask, cost_dice))(
          jax.lax.stop_gradient(class_logits), x, y, w)
  query_of_target, target_of_query = jax.vmap(hungarian_match)(cost, target_valid)
  matched = jnp.take_along_axis(mask_logits, query_of_target[:, :, None, None], axis=1)
  points = importance_points(draws[:, num_points:].reshape(b, num_classes, n_u, 2), matched,
                             label, num_points, oversample_ratio, importance_ratio)
  return losses_at_points(class_logits, mask_logits, label, valid, target_of_query,
                          query_of_target, target_valid, points, no_object_weight)


def mask2former_loss(
    rng: jax.Array,
    class_logits: Sequence[jax.Array] | jax.Array,
    mask_logits: Sequence[jax.Array] | jax.Array,
    label: jax.Array,
    valid: jax.Array,
    *,
    num_points: int,
    weight_ce: float = 2.0,
    weight_mask: float = 5.0,
    weight_dice: float = 5.0,
    **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Deep-supervised Mask2Former loss: weighted losses summed over every decoder output.

  Args:
    rng: key (split per layer).
    class_logits: ``[L, B, Q, C + 1]`` (or a list of ``L`` arrays), last = final layer.
    mask_logits: ``[L, B, Q, h, w]`` (or a list).
    label: ``[B, H, W]``.
    valid: ``[B]`` bool.
    num_points: ``K``.
    weight_ce, weight_mask, weight_dice: loss weights (2, 5, 5).
    **kwargs: forwarded to `layer_loss` (sampling ratios, no-object weight, matcher costs).

  Returns:
    ``(total, metrics)``: total float32 scalar; metrics hold the final layer's ``loss_ce``,
    ``loss_mask``, ``loss_dice`` and ``loss_aux`` (weighted sum over the other layers).
  """
  class_logits = jnp.stack(list(class_logits)) if not hasattr(class_logits, "ndim") \
      else class_logits
  mask_logits = jnp.stack(list(mask_logits)) if not hasattr(mask_logits, "ndim") \
      else mask_logits
  num_layers = class_logits.shape[0]
  keys = jax.random.split(rng, num_layers)
  per_layer = jax.vmap(lambda k, c, m: layer_loss(
      k, c, m, label, valid, num_points=num_points, **kwargs))(keys, class_logits, mask_logits)
  weighted = (weight_ce * per_layer["loss_ce"] + weight_mask * per_layer["loss_mask"]
              + weight_dice * per_layer["loss_dice"])
  metrics = {name: v[-1] for name, v in per_layer.items()}
  metrics["loss_aux"] = weighted[:-1].sum()
  return weighted.sum(), metrics
