"""Builds the multi-task model from a config: the shared InternImage backbone and each task's
head (its spec's ``build_head``: DINO, Mask2Former, ArcFace, ...), and the head presets'
config helpers the built-in specs use (`det_config`, `seg_config`)."""

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from tbgc_jax.models import detection, internimage, segmentation
from tbgc_jax.models.multitask import MultiTaskModel
from tbgc_jax.tasks import get_task


def _preset(table: dict, name: str, where: str):
  if name not in table:
    raise ValueError(f"{where}: unknown preset {name!r}, expected one of {sorted(table)}")
  return table[name]


def with_overrides(preset: Any, overrides: Mapping[str, Any] | None, where: str) -> Any:
  """``preset`` (a frozen dataclass) with the fields in ``overrides`` replaced.

  Sequences become tuples (the dataclasses' type). An unknown field fails, naming ``where``
  (the config path of ``overrides``), the unknown names and the known ones.
  """
  overrides = dict(overrides or {})
  known = {f.name for f in dataclasses.fields(preset)}
  unknown = set(overrides) - known
  if unknown:
    raise ValueError(f"{where}: unknown fields {sorted(unknown)}, expected among "
                     f"{sorted(known)}")
  overrides = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in overrides.items()}
  return dataclasses.replace(preset, **overrides)


def backbone_config(config: Any) -> internimage.InternImageConfig:
  """``config.model.backbone``'s preset, its ``backbone_overrides`` and ``drop_path_rate``."""
  m = config.model
  cfg = with_overrides(_preset(internimage.PRESETS, m.backbone, "config.model.backbone"),
                       m.get("backbone_overrides", None), "config.model.backbone_overrides")
  if m.drop_path_rate >= 0:
    cfg = dataclasses.replace(cfg, drop_path_rate=float(m.drop_path_rate))
  return cfg


def det_config(config: Any) -> detection.DINOConfig:
  """``config.model.det.preset`` with ``config.model.det.overrides``."""
  det = config.model.det
  return with_overrides(_preset(detection.PRESETS, det.preset, "config.model.det.preset"),
                        det.overrides, "config.model.det.overrides")


def seg_config(config: Any) -> segmentation.Mask2FormerConfig:
  """``config.model.seg.preset`` with ``config.model.seg.overrides``."""
  seg = config.model.seg
  return with_overrides(_preset(segmentation.PRESETS, seg.preset, "config.model.seg.preset"),
                        seg.overrides, "config.model.seg.overrides")


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
