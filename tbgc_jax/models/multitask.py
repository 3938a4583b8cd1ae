"""The multi-task model: one shared backbone and one head per task.

Parameter paths are ``("backbone", ...)`` for the shared backbone and ``("heads", task,
...)`` for each head, so the TBGC backbone mask is one line from the path
(``backbone_mask``). A forward for one task runs the backbone on that task's images and only
that task's head, so the gradient of ``task_loss(task, ...)`` is exactly zero on the other
heads.

Examples:
  >>> import jax
  >>> from flax import nnx
  >>> from tbgc_jax.models.internimage import InternImage
  >>> from tbgc_jax.models.classification import ClassificationHead
  >>> def build():
  ...   rngs = nnx.Rngs(0)
  ...   backbone = InternImage("tiny", rngs=rngs)
  ...   return MultiTaskModel(
  ...       backbone, {"cls": ClassificationHead(backbone.out_channels, 196, rngs=rngs)})
  >>> model = nnx.eval_shape(build)  # abstract (shapes only); call build() for weights
  >>> mask = backbone_mask(nnx.state(model, nnx.Param))
  >>> is_backbone = jax.tree.leaves(mask)
  >>> any(is_backbone), all(is_backbone)  # backbone leaves True, the head's False
  (True, False)
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tbgc_jax._src.masks import path_mask

# ImageNet statistics (RGB, 0-1 scale), as used to pretrain the InternImage checkpoints.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 RGB ``[B, H, W, 3]`` -> float32 ``(x / 255 - mean) / std`` (ImageNet)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std


class MultiTaskModel(nnx.Module):
  """Shared backbone + a dict of task heads (keys: task names, e.g. "det", "seg", "cls").

  Attributes:
    backbone: ``__call__(x [B,H,W,3] normalised) -> 4 NHWC maps``, with ``out_channels``.
    heads: ``nnx.Dict`` of heads with ``loss(features, batch, rng)`` and
      ``predict(features, batch)``.
  """

  def __init__(self, backbone: nnx.Module, heads: Mapping[str, nnx.Module]):
    """Builds the container.

    Args:
      backbone: the shared backbone.
      heads: ``{task: head}``.
    """
    if not heads:
      raise ValueError("MultiTaskModel needs at least one head")
    self.backbone = backbone
    self.heads = nnx.Dict(dict(heads))

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(self.heads.keys())

  def _head(self, task: str) -> nnx.Module:
    if task not in self.heads:
      raise KeyError(f"no head for task {task!r}; the model has {sorted(self.heads.keys())}")
    return self.heads[task]

  def features(self, batch: dict) -> list[jax.Array]:
    """Backbone features of ``batch["image"]`` (uint8, normalised here, on device)."""
    return self.backbone(normalize_images(batch["image"]))

  def task_loss(
      self, task: str, batch: dict, rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of one task: backbone on that task's images, then only that task's head.

    Args:
      task: a task name (a key of ``heads``).
      batch: that task's batch (see the shared batch interface).
      rng: key for loss-side randomness of the head.

    Returns:
      ``(scalar float32 loss, {name: scalar diagnostic})`` from the head.
    """
    head = self._head(task)
    return head.loss(self.features(batch), batch, rng)

  def task_predict(self, task: str, batch: dict, **kwargs) -> dict[str, jax.Array]:
    """Fixed-shape predictions of one task's head (``kwargs`` go to its ``predict``)."""
    head = self._head(task)
    return head.predict(self.features(batch), batch, **kwargs)


def task_filter(task: str) -> Callable[[tuple, Any], bool]:
  """An nnx filter of the leaves one task's forward reads: the backbone and that task's head.

  ``nnx.filter_state(params, task_filter("seg"))`` is the part of the parameters the "seg"
  loss depends on; its gradient is zero everywhere else.
  """
  def keep(path: tuple, _) -> bool:  # nnx paths: the raw keys ("heads", "seg", ...)
    return bool(path) and (path[0] == "backbone"
                           or (path[0] == "heads" and len(path) > 1 and path[1] == task))
  return keep


backbone_mask: Callable[[Any], Any] = path_mask(r"^backbone/")
"""``params -> bool pytree``, True on the leaves under ``backbone`` (for TBGC / ``optax.masked``):
`tbgc_jax.path_mask` of the multi-task model's layout. Takes the parameters of a
``MultiTaskModel`` (``nnx.state(model, nnx.Param)``, its gradients, or the same as a pure
dict)."""
