"""The paper's recipe on the challenge data (TT100K, BDD100K, Stanford Cars).

InternImage + DINO (900 queries, 100 denoising, 6/6 layers) + Mask2Former (100 queries, 9
layers) + MLP-shortcut/ArcFace(0.4) heads; 100 epochs; AdamW lr 1e-4, weight decay 1e-4,
backbone lr x0.1; cosine decay with 5 warm-up epochs (ratio 0.001); TBGC with max norm 0.1;
per-device batch det 2 / seg 2 / cls 8; Table 1 augmentation branches.

  python train.py --config configs/challenge.py:/data/tt100k,/data/bdd100k,/data/cars \\
      --workdir /ckpt/run1 --config.model.pretrained=/weights/internimage_t.npz

The backbone must start from ImageNet weights (``model.pretrained``, a converted .npz);
``--config.model.pretrained=none`` starts from random weights (a warning is logged). A CPU
smoke run with tiny sizes: see docs/trainer.md.
"""

import ml_collections

from configs import tiny
from tbgc_jax.data import configs as data_configs
from tbgc_jax.models.detection import DINOConfig
from tbgc_jax.models.segmentation import Mask2FormerConfig
from tbgc_jax.presets import override_fields


def get_config(roots: str = "data/tt100k,data/bdd100k,data/cars") -> ml_collections.ConfigDict:
  """``roots``: detection, segmentation and classification data roots, comma separated."""
  det_root, seg_root, cls_root = roots.split(",")
  c = tiny.get_config()
  c.data = data_configs.challenge(det_root, seg_root, cls_root)
  c.model.backbone = "t"
  # Each level's blocks run as one scanned block: the gradient functions hold 4 DCNv3 blocks
  # instead of 30, so they trace, lower and compile in a time that does not grow with depth
  # (docs/performance.md). Parameters are stored per level with a leading block axis
  # (`internimage.stack_blocks`); converted ImageNet weights load either way.
  c.model.backbone_overrides.scan_blocks = True
  c.model.drop_path_rate = 0.1
  # The paper's sizes: the challenge presets without tiny's size overrides. The heads' layers
  # are stacked and scanned too (DINO's 6 + 6, Mask2Former's 6 + 9 in steps of three; see
  # `stacking`), with the converters `dino.stack_layers` / `head.stack_layers`.
  c.model.det = ml_collections.ConfigDict(
      {"preset": "challenge", "overrides": override_fields(DINOConfig, scan_layers=True)})
  c.model.seg = ml_collections.ConfigDict(
      {"preset": "challenge", "overrides": override_fields(Mask2FormerConfig, scan_layers=True)})
  # Random init is refused unless asked for: pretrained="none" (logged warning).
  c.model.require_pretrained = True
  c.model.cls.hidden_dim = 0  # MLP width = backbone width
  c.model.cls.margin = 0.4  # ArcFace, the paper's margin (the tiny config trains without one)
  c.optim.lr = 1e-4
  c.optim.backbone_lr_mult = 0.1
  c.optim.warmup_epochs = 5
  c.num_epochs = 100
  c.log_every = 50
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.num_workers = 6
  return c
