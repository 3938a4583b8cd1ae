"""Segmentation ("seg"): Mask2Former head, BDD100K label maps, mIoU at the original size."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from tbgc_jax.data import embedded
from tbgc_jax.data.fields import ClassMap
from tbgc_jax.data.records import DataValidationError, check_label_values, read_label_map
from tbgc_jax.data.spec import DataSpec, EmbeddedPool
from tbgc_jax.models.segmentation import PRESETS as MASK2FORMER_PRESETS
from tbgc_jax.models.segmentation import Mask2FormerConfig
from tbgc_jax.presets import preset, with_overrides
from tbgc_jax.schema import IGNORE_LABEL
from tbgc_jax.tasks.base import EvalContext, TaskSpec, register_task

EMBEDDED_HW = (128, 160)  # the embedded scenes: 160x128
EMBEDDED_SIZES = {"train": 800, "val": 100}
# The embedded classes: 0 background, c + 1 for a digit inked in hue family c (OpenCV hue units,
# 0..180: red, chartreuse, cyan, violet). A tiny Mask2Former does not learn the per-pixel digit
# identity in minutes (docs/data.md), region colour it does, as road scenes' stuff classes.
EMBEDDED_HUES = (0.0, 45.0, 90.0, 135.0)



def seg_config(config: Any) -> Mask2FormerConfig:
  """``config.model.seg.preset`` with ``config.model.seg.overrides``."""
  seg = config.model.seg
  return with_overrides(preset(MASK2FORMER_PRESETS, seg.preset, "config.model.seg.preset"),
                        seg.overrides, "config.model.seg.overrides")

class SegmentationEvaluator:
  """mIoU at the original resolution, against the label PNG on disk, one image at a time
  (`scores_to_label_map` of the head's ``seg_scores``); fills the submission's ``seg``
  section and writes the predicted label maps as PNGs when asked."""

  def __init__(self, ctx: EvalContext):
    from tbgc_jax.metrics.segmentation import ConfusionMatrix

    self.ctx = ctx
    self.num_classes = int(ctx.task_cfg["num_classes"])
    self.acc = ConfusionMatrix(num_classes=self.num_classes)

  def update(self, batch: Mapping[str, np.ndarray],
             predictions: Mapping[str, np.ndarray]) -> None:
    from tbgc_jax.metrics.segmentation import save_label_png, scores_to_label_map, seg_submission

    records = self.ctx.source.records
    for i in np.flatnonzero(np.asarray(batch["valid"], bool)):
      record = records[int(batch["index"][i])]
      label = read_label_map(record.label_path)
      if label.shape != tuple(batch["orig_hw"][i]):
        raise ValueError(f"{record.label_path}: field 'label': expected the image size "
                         f"{tuple(batch['orig_hw'][i])}, got {label.shape}")
      pred = scores_to_label_map(predictions["seg_scores"][i], batch["image_hw"][i],
                                 label.shape)
      self.acc.update(pred[None], label[None])
      name = os.path.basename(record.image_path)
      if self.ctx.submission is not None:
        self.ctx.submission[SegmentationTask.submission_key].update(
            seg_submission([pred], [name], num_classes=self.num_classes))
      if self.ctx.output_dir:
        save_label_png(os.path.join(self.ctx.output_dir, os.path.splitext(name)[0] + ".png"),
                       pred)

  def compute(self) -> dict[str, float]:
    return {"mIoU": float(self.acc.compute()["miou"])}


class SegmentationData(DataSpec):
  """A uint8 label map per image (``label``, 255 = ignore); BDD100K layout."""

  name = "seg"
  formats = ("bdd100k",)
  rng_stream = 1
  embedded_format = "bdd100k"
  embedded_data = True

  def fields(self, task_cfg):
    del task_cfg
    return {"label": ClassMap(dtype="uint8", fill=IGNORE_LABEL)}

  def decode(self, record, image, orig_hw, num_classes):
    lab = read_label_map(record.label_path)
    if lab.shape != image.shape[:2]:
      raise DataValidationError(
          f"{record.label_path}: field 'label': expected size {image.shape[:2]} of "
          f"{record.image_path}, got {lab.shape}")
    bad = check_label_values(record.label_path, lab, num_classes)
    if bad is not None:
      raise DataValidationError(
          f"{record.label_path}: field 'label': expected class ids in [0, {num_classes}) "
          f"or {IGNORE_LABEL}, got {bad.tolist()}")
    return {"label": lab}

  def embedded_reader_args(self, root, split):
    return {"root": os.path.join(root, "seg"), "split": split}

  def write_embedded(self, root: str, split: str, rng: np.random.Generator,
                     pool: EmbeddedPool) -> None:
    """BDD100K layout: ``seg/images/10k/{split}/*.jpg`` + ``seg/labels/sem_seg/masks/{split}/
    *.png``: 0 background, ``c + 1`` for the strokes of a digit inked in ``EMBEDDED_HUES[c]``,
    255 on the anti-aliased stroke border."""
    idir = os.path.join(root, "seg", "images", "10k", split)
    mdir = os.path.join(root, "seg", "labels", "sem_seg", "masks", split)
    os.makedirs(idir, exist_ok=True)
    os.makedirs(mdir, exist_ok=True)
    for i in range(EMBEDDED_SIZES[split]):
      img = embedded.background(rng, pool.backgrounds, EMBEDDED_HW)
      lab = np.zeros(EMBEDDED_HW, np.uint8)
      for x, y, _, alpha, hue in embedded.paste_digits(
          img, rng, pool.digits, EMBEDDED_HW, (2, 5), (28, 57), hues=EMBEDDED_HUES):
        size = alpha.shape[0]
        region = lab[y:y + size, x:x + size]
        region[alpha > 0.15] = IGNORE_LABEL
        region[alpha > 0.5] = hue + 1
      name = f"{split}_{i:05d}"
      cv2.imwrite(os.path.join(idir, name + ".jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                  [cv2.IMWRITE_JPEG_QUALITY, 92])
      cv2.imwrite(os.path.join(mdir, name + ".png"), lab)


class SegmentationTask(TaskSpec):
  """Mask2Former head, mIoU at the original size, the submission's ``seg`` section."""

  name = "seg"
  data = SegmentationData()
  metric = "mIoU"
  submission_key = "seg"

  def build_head(self, config: Any, channels: Sequence[int], *, rngs: Any) -> Any:
    from tbgc_jax.models.segmentation import Mask2FormerHead

    return Mask2FormerHead(channels, int(config.data.seg.num_classes), seg_config(config),
                           rngs=rngs)

  def predict_kwargs(self):
    return {"return_scores": True}  # per-class scores, for evaluation at the original size

  def prediction_example(self, ex, prediction):
    return {**ex, "label": np.asarray(prediction["seg"], np.uint8)}

  def evaluator(self, ctx):
    return SegmentationEvaluator(ctx)

  def empty_submission(self):
    return {}


register_task(SegmentationTask())
