"""Builds the multi-task model: the shared InternImage backbone and each task's head (its spec's
``build_head``: DINO, Mask2Former, ArcFace, ...) from a config."""

import dataclasses
from typing import Any

from flax import nnx

from tbgc_jax.models.internimage import PRESETS, InternImage
from tbgc_jax.models.multitask import MultiTaskModel
from tbgc_jax.tasks import get_task


def preset(table: dict, name: str, where: str):
  """``table[name]``, or an error naming the config field ``where`` and the known names."""
  if name not in table:
    raise ValueError(f"{where}: unknown preset {name!r}, expected one of {sorted(table)}")
  return table[name]


def build_model(config: Any, *, rngs: nnx.Rngs) -> MultiTaskModel:
  """The shared backbone and one head per task of ``config.tasks``.

  Uses ``config.model`` (``backbone``, optional ``backbone_overrides`` of the preset's
  fields, ``drop_path_rate``) for the backbone; each task's spec builds its head from
  ``config.model.<task>`` and ``config.data.<task>.num_classes`` (``TaskSpec.build_head``).
  """
  m = config.model
  backbone_cfg = preset(PRESETS, m.backbone, "config.model.backbone")
  overrides = dict(m.get("backbone_overrides", None) or {})
  if overrides:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(backbone_cfg)}
    if unknown:
      raise ValueError(f"config.model.backbone_overrides: unknown fields {sorted(unknown)}")
    overrides = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in overrides.items()}
    backbone_cfg = dataclasses.replace(backbone_cfg, **overrides)
  if m.drop_path_rate >= 0:
    backbone_cfg = dataclasses.replace(backbone_cfg, drop_path_rate=float(m.drop_path_rate))
  backbone = InternImage(backbone_cfg, rngs=rngs)
  heads = {task: get_task(task).build_head(config, backbone.out_channels, rngs=rngs)
           for task in config.tasks}
  return MultiTaskModel(backbone, heads)
