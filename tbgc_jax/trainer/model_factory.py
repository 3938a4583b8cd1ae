"""Builds the multi-task model from a config: the shared InternImage backbone and each task's
head (its spec's ``build_head``: DINO, Mask2Former, ArcFace, ...)."""

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from tbgc_jax.models import internimage
from tbgc_jax.models.multitask import MultiTaskModel
from tbgc_jax.presets import preset, with_overrides
from tbgc_jax.tasks import get_task

# config.precision: the compute dtype of activations and matmuls. Parameters stay float32.
PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The flax layers whose ``dtype`` is their compute dtype (``param_dtype`` stays float32).
_COMPUTE_DTYPE_LAYERS = (nnx.Linear, nnx.Conv, nnx.LayerNorm, nnx.GroupNorm, nnx.Embed,
                         nnx.MultiHeadAttention)


def set_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
  """Sets the compute ``dtype`` of every flax layer of ``model`` (in place); returns it.

  The layers cast their inputs and float32 parameters to ``dtype`` and compute in it
  (normalisation statistics stay float32, flax's ``force_float32_reductions``); the
  parameters themselves, and so their gradients, stay float32. Arrays the model builds itself
  (positional encodings, reference grids, parameters used outside a flax layer) keep their
  dtype, and an operation mixing them with ``dtype`` activations promotes to float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> layer = set_compute_dtype(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jnp.bfloat16)
    >>> layer(jnp.ones((1, 2))).dtype, layer.kernel.dtype
    (dtype(bfloat16), dtype('float32'))
  """
  for _, module in nnx.iter_modules(model):
    if isinstance(module, _COMPUTE_DTYPE_LAYERS):
      module.dtype = dtype
  return model


def compute_dtype(config: Any) -> Any:
  """The dtype ``config.precision`` names (default "float32"); a ValueError naming the field
  for another value."""
  precision = config.get("precision", "float32")
  if precision not in PRECISIONS:
    raise ValueError(f"config.precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
  return PRECISIONS[precision]


def backbone_config(config: Any) -> internimage.InternImageConfig:
  """``config.model.backbone``'s preset, its ``backbone_overrides`` and ``drop_path_rate``."""
  m = config.model
  cfg = with_overrides(preset(internimage.PRESETS, m.backbone, "config.model.backbone"),
                       m.get("backbone_overrides", None), "config.model.backbone_overrides")
  if m.drop_path_rate >= 0:
    cfg = dataclasses.replace(cfg, drop_path_rate=float(m.drop_path_rate))
  return cfg


def build_model(config: Any, *, rngs: nnx.Rngs) -> MultiTaskModel:
  """The shared backbone and one head per task of ``config.tasks``.

  Uses ``config.model`` (``backbone``, optional ``backbone_overrides`` of the preset's
  fields, ``drop_path_rate``) for the backbone; each task's spec builds its head from
  ``config.model.<task>`` and ``config.data.<task>.num_classes`` (``TaskSpec.build_head``);
  ``config.precision`` (default "float32") sets the layers' compute dtype
  (`set_compute_dtype`).
  """
  backbone = internimage.InternImage(backbone_config(config), rngs=rngs)
  heads = {task: get_task(task).build_head(config, backbone.out_channels, rngs=rngs)
           for task in config.tasks}
  model = MultiTaskModel(backbone, heads)
  dtype = compute_dtype(config)
  return model if dtype == jnp.float32 else set_compute_dtype(model, dtype)
