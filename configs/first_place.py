"""The first-place team's recipe on the challenge data, beside the paper's (configs/challenge.py).

What the winning code trains (public repository vaew/CVPR-2023-Track1-: config
``multi-task_dino_mask2former_internimage-xl_submit-trainV2.py``, ``train_step`` and
``_clip_grad(backbone_based=True)``), mapped onto this library:

- InternImage-XL (``xl`` preset: 192 channels, depths 5/5/24/5, offset scale 2, post-norm)
  with layer scale 1.0 and drop path 0.4, as that config sets them;
- AdamW lr 2e-4, weight decay 0.005, none on normalisation layers and on the level and query
  embeddings (``challenge.NO_DECAY``), backbone lr x0.1;
- 160 epochs: 5 epochs of linear warm-up from lr x 1e-3, then cosine to lr x 1e-3;
- per-device batch det 1 / seg 2 / cls 8 (16 GPUs in that code); float32;
- gradient method ``backbone_clip``: each task's whole gradient (backbone and head) scaled by
  ``min(1, max_norm / (||backbone gradient|| + 1e-6))``, max_norm 0.1, then summed.

  python train.py --config configs/first_place.py:/data/tt100k,/data/bdd100k,/data/cars \\
      --workdir /ckpt/first_place --config.model.pretrained=/weights/internimage_xl.npz

The heads and the augmentation are the paper's (configs/challenge.py); the winning code's
differences there (5 detection levels, class weight 2 on DINO's class term, 210 detections
per image, a BN-MLP neck and adaptive ArcFace margins 0.5-0.55) are listed in docs/trainer.md.
"""

import ml_collections

from configs import challenge


def get_config(roots: str = "data/tt100k,data/bdd100k,data/cars") -> ml_collections.ConfigDict:
  """``roots``: detection, segmentation and classification data roots, comma separated."""
  c = challenge.get_config(roots)
  c.model.backbone = "xl"
  c.model.backbone_overrides.layer_scale = 1.0
  c.model.drop_path_rate = 0.4
  c.data.det.batch_size = 1
  c.data.seg.batch_size = 2
  c.data.cls.batch_size = 8
  c.optim.lr = 2e-4
  c.optim.weight_decay = 0.005
  c.optim.no_decay = challenge.NO_DECAY
  c.optim.backbone_lr_mult = 0.1
  c.optim.warmup_epochs = 5
  c.optim.warmup_ratio = 1e-3
  c.optim.final_lr_ratio = 1e-3
  c.num_epochs = 160
  c.precision = "float32"
  c.grad.method = "backbone_clip"
  c.grad.hparams = ml_collections.ConfigDict({"max_norm": 0.1})
  return c
