"""Builds the multi-task model from a config: the shared InternImage backbone and each task's
head (its spec's ``build_head``: DINO, Mask2Former, ArcFace, ...)."""

import dataclasses
from typing import Any

from flax import nnx

from tbgc_jax.models import internimage
from tbgc_jax.models.multitask import MultiTaskModel
from tbgc_jax.presets import preset, with_overrides
from tbgc_jax.tasks import get_task


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
  ``config.model.<task>`` and ``config.data.<task>.num_classes`` (``TaskSpec.build_head``).
  """
  backbone = internimage.InternImage(backbone_config(config), rngs=rngs)
  heads = {task: get_task(task).build_head(config, backbone.out_channels, rngs=rngs)
           for task in config.tasks}
  return MultiTaskModel(backbone, heads)
