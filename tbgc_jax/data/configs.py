"""Data sections of the configs: ``tiny()`` (embedded data) and ``challenge(...)`` (real data).

Each returns a ``ConfigDict`` with sub-sections ``det``, ``seg``, ``cls`` (the ``data`` section
of a trainer config: ``config.data = configs.tiny()``); a task of your own adds its section
(``tbgc_jax.tasks``). Per task:

- ``source.format``: "embedded", "coco", "tt100k", "bdd100k", "cls_list" or "tfds";
  ``source.train`` / ``source.val``: keyword arguments of that reader
  (``tbgc_jax.data.pipeline.make_source``).
- ``policy`` ("strict" | "skip") and ``deep_check`` (decode everything while reading);
  ``allow_outside_root`` (default False): accept image paths that resolve outside the
  dataset root (``..``, absolute paths, symlinks to elsewhere).
- ``min_decode_side`` (det): decode large JPEGs at 1/2, 1/4 or 1/8 size when the long side
  stays >= this (TT100K 2048 -> 1024 for a 608 network input); 0 disables.
- ``num_classes``; ``batch_size`` (per device); ``image_size`` (fixed train (H, W));
  ``eval_image_size``; ``max_boxes`` (det).
- ``augment``: ``mode`` ("plain", "parallel" or "multi_branch") and the chains of every mode:
  ``plain``, ``branches``, ``parallel``, ``probs``, ``curriculum``, ``probs_start``,
  ``probs_end`` (see ``tbgc_jax.data.augment``). ``eval_augment``: chain string.

``set_augment_mode(data, mode)`` selects one mode for every task (the trainer's
``config.augment_mode``). "plain" is the paper's section 3 augmentation (the setting of its
Table 2), "multi_branch" its Table 1 branches (the default), "parallel" the Table 3 baseline
that chains every branch's transforms. Classification has no RandomChoice in any mode (the
paper uses "common augmentation" for it). Branches are chosen uniformly; the curriculum is an
option, off by default, since the paper gives no schedule.
"""

from __future__ import annotations

import ml_collections

from tbgc_jax.data.augment import AUGMENT_MODES

# Curriculum when enabled (our choice, the paper gives none): branch 2 (Mosaic) likelier early.
PROBS_START = (0.3, 0.7)
PROBS_END = (0.7, 0.3)
# RandomChoice: uniform (empty probs), curriculum off.
_CHOICE = {"probs": (), "curriculum": False, "probs_start": PROBS_START, "probs_end": PROBS_END}


def _det(long_edge: int, short: tuple[int, int], size: tuple[int, int], noise: float) -> dict:
  ms = f"multiscale(long_edge={long_edge}, short_min={short[0]}, short_max={short[1]})"
  mosaic = f"mosaic(size={tuple(size)})"
  return {
      "mode": "multi_branch",
      "plain": f"{ms}|hflip",
      "branches": (
          f"{ms}|hflip|autoaugment|noise(max_std={noise})",
          f"{mosaic}|mixup|hflip|noise(max_std={noise})",
      ),
      **_CHOICE,
      "parallel": f"{mosaic}|mixup|{ms}|hflip|autoaugment|noise(max_std={noise})",
  }


def _seg(long_edge: int, crop: tuple[int, int], mosaic: tuple[int, int], noise: float) -> dict:
  rr = f"random_resize(long_edge={long_edge}, ratio_min=0.5, ratio_max=2.0)"
  rc = f"random_crop(size={tuple(crop)})"
  return {
      "mode": "multi_branch",
      # The crop fits the resized image to the training size (mmseg's standard pipeline).
      "plain": f"{rr}|{rc}|hflip|color_distort",
      "branches": (
          f"{rr}|{rc}|rotate|noise(max_std={noise})",
          f"mosaic(size={tuple(mosaic)})|{rc}|hflip|noise(max_std={noise})",
      ),
      **_CHOICE,
      "parallel": f"mosaic(size={tuple(mosaic)})|{rr}|{rc}|rotate|hflip|noise(max_std={noise})",
  }


def _cls(size: int) -> dict:
  return {"mode": "multi_branch", "plain": f"resize(size=({size}, {size}))|random_erase|hflip"}


def _tiny_augment() -> dict[str, dict]:
  """Multi-branch augmentation for the embedded digits, light enough to learn in minutes.

  Same structure as Table 1 (branch 2 holds the one strong augmentation, Mosaic) but without
  flips (a mirrored digit is a different glyph), AutoAugment and MixUp, and with the easy branch
  likelier: from a random-init tiny backbone, detection's mAP50 after 720 steps fell from 2.8
  to 0.6 with the challenge-style branches. The "plain" chains are the paper's, sized down.
  """
  probs = {**_CHOICE, "probs": (0.8, 0.2)}
  ms = "multiscale(long_edge=192, short_min=112, short_max=160)"
  rr = "random_resize(long_edge=160, ratio_min=0.5, ratio_max=2.0)"
  rc = "random_crop(size=(128, 128))"
  cls = "resize(size=(64, 64))|random_erase"
  return {
      "det": {"mode": "multi_branch", **probs, "plain": f"{ms}|hflip",
              "branches": (f"{ms}|noise(max_std=8.0)",
                           "mosaic(size=(160, 192))|noise(max_std=8.0)"),
              "parallel": f"mosaic(size=(160, 192))|{ms}|noise(max_std=8.0)"},
      "seg": {"mode": "multi_branch", **probs, "plain": f"{rr}|{rc}|hflip|color_distort",
              "branches": (f"{rr}|{rc}|rotate|noise(max_std=8.0)",
                           f"mosaic(size=(192, 192))|{rc}|noise(max_std=8.0)"),
              "parallel": f"mosaic(size=(192, 192))|{rr}|{rc}|rotate|noise(max_std=8.0)"},
      "cls": {"mode": "multi_branch", "plain": f"{cls}|hflip", "branches": (cls,)},
  }


def tiny() -> ml_collections.ConfigDict:
  """Data section for the embedded datasets (generated on first use, no download)."""
  augment = _tiny_augment()
  return ml_collections.ConfigDict({
      "det": {
          "source": {"format": "embedded", "root": "", "train": {}, "val": {}},
          "policy": "strict", "deep_check": False, "allow_outside_root": False, "num_classes": 10,
          "batch_size": 2, "image_size": (160, 192), "eval_image_size": (160, 192),
          "max_boxes": 24,
          "augment": augment["det"],
          "eval_augment": "resize_fit(size=(160, 192))",
      },
      "seg": {
          "source": {"format": "embedded", "root": "", "train": {}, "val": {}},
          "policy": "strict", "deep_check": False, "allow_outside_root": False, "num_classes": 5,
          "batch_size": 2, "image_size": (128, 128), "eval_image_size": (128, 160),
          "augment": augment["seg"],
          "eval_augment": "resize_fit(size=(128, 160))",
      },
      "cls": {
          "source": {"format": "embedded", "root": "", "train": {}, "val": {}},
          "policy": "strict", "deep_check": False, "allow_outside_root": False, "num_classes": 20,
          "batch_size": 8, "image_size": (64, 64), "eval_image_size": (64, 64),
          "augment": augment["cls"],
          "eval_augment": "resize(size=(64, 64))",
      },
  })


def challenge(det_root: str = "data/tt100k", seg_root: str = "data/bdd100k",
              cls_root: str = "data/cars") -> ml_collections.ConfigDict:
  """Data section for the challenge's data (paper resolutions and per-device batch sizes).

  Args:
    det_root: TT100K in COCO format: ``annotations/instances_{train,val}.json`` and
      ``images/{train,val}/``.
    seg_root: BDD100K root (``images/10k/...``, ``labels/sem_seg/masks/...``).
    cls_root: Stanford Cars: ``train.txt``/``val.txt`` list files and ``images/``.
  """
  return ml_collections.ConfigDict({
      "det": {
          "source": {"format": "coco",
                     "train": {"ann_file": f"{det_root}/annotations/instances_train.json",
                               "image_dir": f"{det_root}/images/train"},
                     "val": {"ann_file": f"{det_root}/annotations/instances_val.json",
                             "image_dir": f"{det_root}/images/val"}},
          "policy": "skip", "deep_check": False, "allow_outside_root": False, "num_classes": 45,
          "batch_size": 2, "image_size": (608, 608), "eval_image_size": (608, 608),
          "max_boxes": 100, "min_decode_side": 608,
          "augment": _det(608, (480, 608), (608, 608), 10.0),
          "eval_augment": "resize_fit(size=(608, 608))",
      },
      "seg": {
          "source": {"format": "bdd100k", "train": {"root": seg_root, "split": "train"},
                     "val": {"root": seg_root, "split": "val"}},
          "policy": "skip", "deep_check": False, "allow_outside_root": False, "num_classes": 19,
          "batch_size": 2, "image_size": (512, 1024), "eval_image_size": (576, 1024),
          "augment": _seg(1280, (512, 1024), (1024, 2048), 10.0),
          "eval_augment": "resize_fit(size=(576, 1024))",
      },
      "cls": {
          "source": {"format": "cls_list",
                     "train": {"list_file": f"{cls_root}/train.txt",
                               "image_dir": f"{cls_root}/images"},
                     "val": {"list_file": f"{cls_root}/val.txt",
                             "image_dir": f"{cls_root}/images"}},
          "policy": "skip", "deep_check": False, "allow_outside_root": False, "num_classes": 196,
          "batch_size": 8, "image_size": (448, 448), "eval_image_size": (448, 448),
          "augment": _cls(448),
          "eval_augment": "resize(size=(448, 448))",
      },
  })


def set_augment_mode(data: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
  """Selects augmentation ``mode`` (one of ``AUGMENT_MODES``) for every task of ``data`` (each
  section with an ``augment``)."""
  if mode not in AUGMENT_MODES:
    raise ValueError(f"augmentation mode must be one of {AUGMENT_MODES}, got {mode!r}")
  for section in data.values():
    if "augment" in section:
      section.augment.mode = mode
  return data


def use_parallel_baseline(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Switches every task to the "parallel" baseline of Table 3 (all augmentations chained)."""
  return set_augment_mode(data, "parallel")
