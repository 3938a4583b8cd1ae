"""``configs/challenge.py`` at CPU smoke-test sizes: the same tasks, readers, augmentation
branches, heads and evaluation; widths, depths, queries and resolutions of
``tests/micro_config.py``.

  python train.py --config tests/challenge_smoke_config.py:DET_ROOT,SEG_ROOT,CLS_ROOT ...
"""

import ml_collections

from configs import challenge
from tbgc_jax.models.detection import DINOConfig
from tbgc_jax.models.segmentation import Mask2FormerConfig
from tbgc_jax.presets import override_fields
from tests import micro_config


def get_config(roots: str) -> ml_collections.ConfigDict:
  c = challenge.get_config(roots)
  c.model.pretrained = "none"
  c.model.backbone = "tiny"
  c.model.backbone_overrides.update(micro_config.BACKBONE)  # keeps the challenge's scan_blocks
  # Micro heads of one layer each, unrolled (scanning one layer only adds the loop; the
  # scanned heads are checked against the unrolled ones in tests/test_stacking.py).
  c.model.det = ml_collections.ConfigDict(
      {"preset": "tiny", "overrides": override_fields(DINOConfig, **micro_config.DET)})
  # BDD100K's 19 classes each need a query to match.
  c.model.seg = ml_collections.ConfigDict(
      {"preset": "tiny",
       "overrides": override_fields(Mask2FormerConfig, **{**micro_config.SEG, "num_queries": 20})})
  c.data.det.max_boxes = 8
  for task, train, val in (("det", (64, 64), (64, 64)), ("seg", (64, 64), (48, 64)),
                           ("cls", (32, 32), (32, 32))):
    c.data[task].image_size = train
    c.data[task].eval_image_size = val
  c.total_steps = 2
  c.log_every = 1
  c.checkpoint_every = 2
  c.num_workers = 0
  c.mesh_devices = 1
  return c
