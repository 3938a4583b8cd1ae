"""Builds the multi-task model from a config: the shared InternImage backbone and each task's
head (its spec's ``build_head``: DINO, Mask2Former, ArcFace, ...), and the head presets'
config helpers the built-in specs use (`det_config`, `seg_config`)."""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from flax import nnx

from tbgc_jax.models import detection, internimage, segmentation
from tbgc_jax.models.multitask import MultiTaskModel
from tbgc_jax.tasks import get_task


def _preset(table: dict, name: str, where: str):
  if name not in table:
    raise ValueError(f"{where}: unknown preset {name!r}, expected one of {sorted(table)}")
  return table[name]


def _field_type(annotation: Any) -> type:
  """The command-line type of a dataclass field: ``float | None`` -> float, tuples -> tuple."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
  return typing.get_origin(annotation) or annotation


def override_fields(config_cls: type, **values: Any) -> ml_collections.ConfigDict:
  """A config section for `with_overrides` holding every field of ``config_cls``.

  The fields in ``values`` are set; every other is None ("keep the preset's") but typed, so
  that any field can be set from the command line
  (``--config.model.det.overrides.loss_class=2.0``; tuples as ``'(1, 2, 3)'``).

  Raises:
    ValueError: if ``values`` names a field ``config_cls`` does not have.
  """
  hints = typing.get_type_hints(config_cls)
  names = [f.name for f in dataclasses.fields(config_cls)]
  unknown = set(values) - set(names)
  if unknown:
    raise ValueError(f"{config_cls.__name__} has no fields {sorted(unknown)}; expected among "
                     f"{sorted(names)}")
  return ml_collections.ConfigDict({
      name: ml_collections.FieldReference(values.get(name), field_type=_field_type(hints[name]))
      for name in names})


def with_overrides(preset: Any, overrides: Mapping[str, Any] | None, where: str) -> Any:
  """``preset`` (a frozen dataclass) with the fields in ``overrides`` replaced.

  Fields set to None keep the preset's value (`override_fields` lists every field so).
  Sequences become tuples (the dataclasses' type). An unknown field fails, naming ``where``
  (the config path of ``overrides``), the unknown names and the known ones.
  """
  overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
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
