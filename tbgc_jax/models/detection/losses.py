"""Set-prediction losses of the DETR family: focal classification, L1 and GIoU box losses.

Predictions are matched to padded targets one-to-one (Hungarian matching inside `jax.jit`,
`tbgc_jax.ops.hungarian_match`); every loss is a sum over the batch divided by ``num_boxes``,
the number of valid target boxes in the whole batch (Deformable DETR / DINO normalisation).
Boxes are normalised ``(cx, cy, w, h)``.
"""

import jax
import jax.numpy as jnp

from tbgc_jax.ops import hungarian_match
from tbgc_jax.ops.boxes import (
  box_cxcywh_to_xyxy,
  generalized_box_iou,
  pairwise_generalized_box_iou,
)

_LOG_EPS = 1e-8


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
  """Elementwise sigmoid focal loss (Lin et al. 2017), not reduced.

  ``optax.sigmoid_focal_loss`` computes the same thing; it is written here so the matcher's
  focal class cost and the loss share one formula and one ``alpha`` convention.

  Args:
    logits: any shape.
    targets: same shape, in {0, 1} (or soft targets in [0, 1]).
    alpha: weight of positives (``1 - alpha`` for negatives); negative disables it.
    gamma: focusing exponent.

  Returns:
    the loss, same shape as ``logits``.
  """
  p = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1.0 - p) * (1.0 - targets)
  loss = ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return loss


def match_cost(logits: jax.Array, boxes: jax.Array, target_labels: jax.Array,
               target_boxes: jax.Array, cost_class: float = 2.0, cost_bbox: float = 5.0,
               cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """DINO's matching cost of every query for every target of one image.

  Args:
    logits: ``[Q, K]`` class logits.
    boxes: ``[Q, 4]`` predicted normalised cxcywh boxes.
    target_labels: ``[T]`` int class ids.
    target_boxes: ``[T, 4]`` normalised cxcywh boxes.
    cost_class, cost_bbox, cost_giou: weights of the focal class cost, the L1 box distance
      and the negative GIoU.
    alpha, gamma: focal parameters of the class cost.

  Returns:
    ``[Q, T]`` cost.
  """
  p = jax.nn.sigmoid(logits)
  neg = (1.0 - alpha) * p ** gamma * -jnp.log(1.0 - p + _LOG_EPS)
  pos = alpha * (1.0 - p) ** gamma * -jnp.log(p + _LOG_EPS)
  c_class = jnp.take(pos - neg, target_labels, axis=1)
  c_bbox = jnp.abs(boxes[:, None, :] - target_boxes[None, :, :]).sum(-1)
  c_giou = -pairwise_generalized_box_iou(box_cxcywh_to_xyxy(boxes),
                                         box_cxcywh_to_xyxy(target_boxes))
  return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


def match_predictions(logits: jax.Array, boxes: jax.Array, target_labels: jax.Array,
                      target_boxes: jax.Array, target_valid: jax.Array,
                      cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                      alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Hungarian matching of a batch of predictions to padded targets (no gradient).

  Args:
    logits: ``[B, Q, K]``; boxes: ``[B, Q, 4]`` normalised cxcywh.
    target_labels: ``[B, T]``; target_boxes: ``[B, T, 4]``; target_valid: ``[B, T]`` bool.
    cost_class, cost_bbox, cost_giou, alpha, gamma: see `match_cost`.

  Returns:
    ``[B, Q]`` int32 index of the valid target matched to each query, or -1.
  """
  logits, boxes = jax.lax.stop_gradient((logits, boxes))

  def one(lg, bx, tl, tb, tv):
    cost = match_cost(lg, bx, tl, tb, cost_class, cost_bbox, cost_giou, alpha, gamma)
    return hungarian_match(cost, tv)[1]

  return jax.vmap(one)(logits, boxes, target_labels, target_boxes, target_valid)


def set_prediction_losses(logits: jax.Array, boxes: jax.Array, target_labels: jax.Array,
                          target_boxes: jax.Array, target_of_query: jax.Array,
                          query_weight: jax.Array, num_boxes: jax.Array, alpha: float = 0.25,
                          gamma: float = 2.0) -> dict[str, jax.Array]:
  """Focal, L1 and GIoU losses for queries assigned to targets.

  Args:
    logits: ``[B, Q, K]`` class logits.
    boxes: ``[B, Q, 4]`` predicted normalised cxcywh boxes.
    target_labels: ``[B, T]`` int class ids.
    target_boxes: ``[B, T, 4]`` normalised cxcywh boxes.
    target_of_query: ``[B, Q]`` index of the target of each query, -1 for "no object".
    query_weight: ``[B, Q]`` 1 for queries that count, 0 for padding (padded examples,
      denoising queries of padded targets).
    num_boxes: scalar normaliser (valid target boxes in the batch, at least 1).
    alpha, gamma: focal parameters.

  Returns:
    ``{"loss_ce", "loss_bbox", "loss_giou"}`` scalars, each summed over the batch and
    divided by ``num_boxes``.
  """
  num_classes = logits.shape[-1]
  matched = (target_of_query >= 0) & (query_weight > 0)
  idx = jnp.maximum(target_of_query, 0)
  labels = jnp.take_along_axis(target_labels, idx, axis=1)
  tboxes = jnp.take_along_axis(target_boxes, idx[..., None], axis=1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype) * matched[..., None]
  focal = sigmoid_focal_loss(logits, onehot, alpha, gamma).sum(-1)
  loss_ce = (focal * query_weight).sum() / num_boxes
  m = matched.astype(boxes.dtype)
  l1 = jnp.abs(boxes - tboxes).sum(-1)
  giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tboxes))
  return {
      "loss_ce": loss_ce,
      "loss_bbox": (l1 * m).sum() / num_boxes,
      "loss_giou": ((1.0 - giou) * m).sum() / num_boxes,
  }
