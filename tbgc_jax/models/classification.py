"""The paper's fine-grained classification head: MLP with shortcut + ArcFace.

Global average pooling of the last backbone level gives ``f``; the embedding is
``normalize(f + MLP(f))``; logits are cosines to L2-normalised class centres. Training uses
ArcFace (Deng et al., CVPR 2019): the target class's angle gets an additive margin ``m``
(0.4 in the paper), all logits are multiplied by ``scale``, then softmax cross-entropy.
Evaluation uses the plain cosines (no margin).
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

_LINEAR_INIT = nnx.initializers.truncated_normal(stddev=0.02)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis`` (finite gradient at 0)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def arcface_logits(
    cos: jax.Array,
    labels: jax.Array,
    *,
    margin: float = 0.4,
    scale: float = 30.0,
    easy_margin: bool = False,
    min_sin_sq: float = 1e-7,
) -> jax.Array:
  """ArcFace logits: ``scale * cos(theta + margin)`` for the target class, ``scale * cos``
  for the others.

  ``cos(theta + m)`` is computed as ``cos * cos(m) - sin * sin(m)`` with
  ``sin = sqrt(max(1 - cos^2, min_sin_sq))``, so gradients stay finite at ``cos = +-1``.
  As in the reference ArcFace (``ArcMarginProduct``), where ``theta + m`` would pass ``pi``
  (``cos <= cos(pi - m)``) the target logit is ``cos - m * sin(m)`` instead (keeps it
  monotonic in ``theta``); with ``easy_margin`` the margin is only applied where ``cos > 0``.

  Args:
    cos: ``[B, K]`` cosine similarities in [-1, 1].
    labels: ``[B]`` integer target classes (out-of-range labels get no margin).
    margin: additive angular margin ``m`` (radians).
    scale: logit scale ``s``.
    easy_margin: the easy-margin variant.
    min_sin_sq: floor of ``1 - cos^2`` inside the square root.

  Returns:
    ``[B, K]`` float32 logits.
  """
  cos = jnp.clip(cos.astype(jnp.float32), -1.0, 1.0)
  sin = jnp.sqrt(jnp.maximum(1.0 - cos * cos, min_sin_sq))
  phi = cos * math.cos(margin) - sin * math.sin(margin)
  if easy_margin:
    phi = jnp.where(cos > 0.0, phi, cos)
  else:
    fallback = cos - math.sin(math.pi - margin) * margin
    phi = jnp.where(cos > math.cos(math.pi - margin), phi, fallback)
  target = labels[:, None] == jnp.arange(cos.shape[-1])
  return scale * jnp.where(target, phi, cos)


def _pool(feature: jax.Array, image_mask: jax.Array | None) -> jax.Array:
  """Mean over the valid cells of ``feature`` [B, h, w, C] (cells whose top-left input pixel
  is inside the image)."""
  if image_mask is None:
    return feature.mean(axis=(1, 2))
  _, h, w, _ = feature.shape
  big_h, big_w = image_mask.shape[1:]
  rows = (jnp.arange(h) * big_h) // h
  cols = (jnp.arange(w) * big_w) // w
  cells = image_mask[:, rows][:, :, cols].astype(feature.dtype)[..., None]
  return (feature * cells).sum(axis=(1, 2)) / jnp.maximum(cells.sum(axis=(1, 2)), 1.0)


def _mean_off_diagonal(gram: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of ``gram[i, j]`` over valid ``i != j`` (0 with fewer than two valid rows)."""
  pair = valid[:, None] & valid[None, :] & ~jnp.eye(gram.shape[0], dtype=bool)
  return jnp.where(pair, gram, 0.0).sum() / jnp.maximum(pair.sum(), 1)


class ClassificationHead(nnx.Module):
  """GAP -> MLP + shortcut -> L2-normalised embedding -> ArcFace / cosine logits.

  Batch keys used: ``label`` int32 [B], ``valid`` bool [B] (optional, padding examples
  contribute nothing), ``image_mask`` bool [B, H, W] (optional, pools only valid cells).
  """

  def __init__(
      self,
      in_channels: Sequence[int],
      num_classes: int,
      *,
      hidden_dim: int | None = None,
      margin: float = 0.4,
      scale: float = 30.0,
      easy_margin: bool = False,
      rngs: nnx.Rngs,
  ):
    """Builds the head.

    Args:
      in_channels: channels of the backbone levels; the last one is used.
      num_classes: number of classes (196 for Stanford Cars).
      hidden_dim: MLP hidden size (default: the input channels).
      margin: ArcFace additive angular margin (the paper: 0.4).
      scale: ArcFace logit scale (commonly 30 or 64).
      easy_margin: use ArcFace's easy-margin variant.
      rngs: initialisation keys.
    """
    channels = in_channels[-1]
    hidden = hidden_dim or channels
    self.margin = margin
    self.scale = scale
    self.easy_margin = easy_margin
    self.fc1 = nnx.Linear(channels, hidden, kernel_init=_LINEAR_INIT, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, channels, kernel_init=_LINEAR_INIT, rngs=rngs)
    self.centers = nnx.Param(
        nnx.initializers.xavier_uniform()(rngs.params(), (channels, num_classes), jnp.float32))

  def embed(self, features: Sequence[jax.Array], batch: dict | None = None) -> jax.Array:
    """``[B, C]`` unit-norm embeddings."""
    mask = None if batch is None else batch.get("image_mask")
    pooled = _pool(features[-1], mask)
    return l2_normalize(pooled + self.fc2(jax.nn.gelu(self.fc1(pooled), approximate=False)))

  def cosine(self, features: Sequence[jax.Array], batch: dict | None = None) -> jax.Array:
    """``[B, K]`` cosine similarity of each embedding to each class centre."""
    emb = self.embed(features, batch).astype(jnp.float32)
    return emb @ l2_normalize(self.centers[...].astype(jnp.float32), axis=0)

  def loss(
      self, features: Sequence[jax.Array], batch: dict, rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ArcFace cross-entropy averaged over valid examples.

    Returns:
      The scalar loss and ``{"cls_loss", "cls_top1"}`` (top-1 of the margin-free cosines),
      plus two collapse diagnostics: ``embedding_cos``, the mean cosine between the valid
      embeddings of the batch, and ``center_cos``, the mean cosine between class centres
      (both near 1 when the features collapse onto one direction, ArcFace's failure mode on
      undiscriminating features).
    """
    del rng  # no loss-side randomness
    emb = self.embed(features, batch).astype(jnp.float32)
    centers = l2_normalize(self.centers[...].astype(jnp.float32), axis=0)
    cos = emb @ centers
    valid = batch.get("valid", jnp.ones(cos.shape[0], bool))
    labels = jnp.where(valid, batch["label"], 0).astype(jnp.int32)
    logits = arcface_logits(
        cos, labels, margin=self.margin, scale=self.scale, easy_margin=self.easy_margin)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    loss = jnp.where(valid, ce, 0.0).sum() / count
    top1 = jnp.where(valid, jnp.argmax(cos, axis=-1) == labels, False).sum() / count
    diagnostics = jax.lax.stop_gradient({
        "embedding_cos": _mean_off_diagonal(emb @ emb.T, valid),
        "center_cos": _mean_off_diagonal(centers.T @ centers,
                                         jnp.ones(centers.shape[1], bool))})
    return loss, {"cls_loss": loss, "cls_top1": top1, **diagnostics}

  def predict(self, features: Sequence[jax.Array], batch: dict) -> dict[str, jax.Array]:
    """``{"label": int32 [B] class ids, "logits": float32 [B, K] scale * cosine}``."""
    logits = self.scale * self.cosine(features, batch)
    return {"label": jnp.argmax(logits, axis=-1).astype(jnp.int32), "logits": logits}
