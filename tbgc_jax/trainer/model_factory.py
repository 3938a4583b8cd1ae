"""Builds the multi-task model (InternImage + DINO + Mask2Former + ArcFace heads) from a config."""

import dataclasses
from typing import Any

from flax import nnx

from tbgc_jax.models.classification import ClassificationHead
from tbgc_jax.models.detection import DINOHead, dino_challenge_config, dino_tiny_config
from tbgc_jax.models.internimage import PRESETS, InternImage
from tbgc_jax.models.multitask import MultiTaskModel
from tbgc_jax.models.segmentation import Mask2FormerHead, challenge_config, tiny_config

_DET_PRESETS = {"tiny": dino_tiny_config, "challenge": dino_challenge_config}
_SEG_PRESETS = {"tiny": tiny_config, "challenge": challenge_config}


def _preset(table: dict, name: str, where: str):
  if name not in table:
    raise ValueError(f"{where}: unknown preset {name!r}, expected one of {sorted(table)}")
  return table[name]


def build_model(config: Any, *, rngs: nnx.Rngs) -> MultiTaskModel:
  """The shared backbone and one head per task of ``config.tasks``.

  Uses ``config.model`` (``backbone``, optional ``backbone_overrides`` of the preset's
  fields, ``drop_path_rate``, ``det``, ``seg``, ``cls``) and the class counts of
  ``config.data.<task>.num_classes``.
  """
  m = config.model
  backbone_cfg = _preset(PRESETS, m.backbone, "config.model.backbone")
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
  channels = backbone.out_channels
  heads = {}
  for task in config.tasks:
    n = int(config.data[task].num_classes)
    if task == "det":
      det = _preset(_DET_PRESETS, m.det.preset, "config.model.det.preset")(**m.det.overrides)
      if det.num_queries < config.data.det.max_boxes:
        raise ValueError(
            f"config.model.det: num_queries={det.num_queries} must be >= "
            f"config.data.det.max_boxes={config.data.det.max_boxes} (one query per target)")
      heads[task] = DINOHead(channels, n, det, rngs=rngs)
    elif task == "seg":
      seg = dict(_preset(_SEG_PRESETS, m.seg.preset, "config.model.seg.preset")())
      seg.update(m.seg.overrides)
      seg.pop("num_classes", None)
      heads[task] = Mask2FormerHead(channels, n, **seg, rngs=rngs)
    elif task == "cls":
      heads[task] = ClassificationHead(
          channels, n, hidden_dim=m.cls.hidden_dim or None, margin=m.cls.margin,
          scale=m.cls.scale, rngs=rngs)
  return MultiTaskModel(backbone, heads)
