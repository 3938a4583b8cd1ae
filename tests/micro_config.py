"""A minimal config for the end-to-end tests: same code paths as ``configs/tiny.py``, widths,
depths, queries and resolutions cut so that XLA:CPU compiles a train step in seconds. Two
tasks (seg + cls) by default; the argument picks others:

  python train.py --config tests/micro_config.py --workdir /tmp/micro
  python train.py --config tests/micro_config.py:det,seg,cls --workdir /tmp/micro3
"""

import ml_collections

from configs import tiny

# Model sizes at which XLA:CPU compiles each head's gradient in seconds.
BACKBONE = {"channels": 8, "depths": (1, 1, 1, 1), "groups": (1, 1, 2, 2), "mlp_ratio": 1.0}
SEG = {"hidden_dim": 8, "mask_dim": 8, "num_queries": 12, "num_decoder_layers": 1,
       "num_heads": 1, "decoder_ffn_dim": 8, "encoder_ffn_dim": 8, "encoder_heads": 1,
       "encoder_points": 1, "num_points": 16}
DET = {"hidden_dim": 16, "num_queries": 24, "num_denoising": 8, "num_encoder_layers": 1,
       "num_decoder_layers": 1, "num_heads": 1, "num_points": 1, "ffn_dim": 16,
       "norm_groups": 8, "num_select": 12}


def get_config(tasks: str = "seg,cls") -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.tasks = tuple(tasks.split(","))
  c.model.backbone_overrides.update(BACKBONE)
  c.model.det.overrides.update(DET)
  c.model.seg.overrides.update(SEG)
  c.data.det.image_size = (64, 80)
  c.data.det.eval_image_size = (64, 80)
  c.data.det.augment = ml_collections.ConfigDict(
      {"mode": "plain", "plain": "resize_fit(size=(64, 80))|hflip"})
  c.data.det.eval_augment = "resize_fit(size=(64, 80))"
  c.data.seg.batch_size = 2
  c.data.seg.image_size = (32, 32)
  c.data.seg.eval_image_size = (32, 32)
  c.data.seg.augment = ml_collections.ConfigDict(
      {"mode": "plain", "plain": "random_resize(long_edge=40, ratio_min=0.5, ratio_max=2.0)|"
                                 "random_crop(size=(32, 32))|noise(max_std=8.0)"})
  c.data.seg.eval_augment = "resize_fit(size=(32, 32))"
  c.data.cls.batch_size = 4
  c.data.cls.image_size = (32, 32)
  c.data.cls.eval_image_size = (32, 32)
  c.data.cls.augment = ml_collections.ConfigDict(
      {"mode": "plain", "plain": "resize(size=(32, 32))|random_erase"})
  c.data.cls.eval_augment = "resize(size=(32, 32))"
  c.total_steps = 8
  c.log_every = 2
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.mesh_devices = 1
  return c
