"""Detection ("det"): DINO head, COCO / TT100K records, padded boxes, mAP50 with pycocotools."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from tbgc_jax.data import embedded
from tbgc_jax.data.fields import Boxes, ImageLabel
from tbgc_jax.data.spec import DataSpec, EmbeddedPool
from tbgc_jax.models.detection import PRESETS as DINO_PRESETS
from tbgc_jax.models.detection import DINOConfig
from tbgc_jax.presets import preset, with_overrides
from tbgc_jax.tasks.base import EvalContext, TaskSpec, register_task

_log = logging.getLogger(__name__)
EMBEDDED_HW = (144, 192)  # the embedded scenes: 192x144 (w x h), 2-5 digits, 10 classes
EMBEDDED_SIZES = {"train": 800, "val": 100}


def ground_truth(source: Any) -> dict:
  """The COCO ground truth a detection source is scored against.

  The annotation file itself for COCO sources (every box and crowd region, the file's ids);
  otherwise (TT100K's own format) all boxes of the reader's records, with the category ids
  the export writes.
  """
  from tbgc_jax.metrics.detection import load_coco_ground_truth, records_to_coco

  if getattr(source, "annotation_file", None):
    return load_coco_ground_truth(source.annotation_file)
  return records_to_coco(source.records, source.category_ids)


# Boxes drawn in the evaluation gallery: predictions scoring at least this.
GALLERY_SCORE = 0.2



def det_config(config: Any) -> DINOConfig:
  """``config.model.det.preset`` with ``config.model.det.overrides``."""
  det = config.model.det
  return with_overrides(preset(DINO_PRESETS, det.preset, "config.model.det.preset"),
                        det.overrides, "config.model.det.overrides")

class DetectionEvaluator:
  """mAP50 as the challenge computes it: pycocotools against `ground_truth` of the source,
  with the file's category and image ids; fills the submission's ``dec`` section. Also
  ``mAP50_agnostic``, the same with every class one (localisation alone)."""

  def __init__(self, ctx: EvalContext):
    from tbgc_jax.metrics.detection import DetectionAccumulator

    self.ctx = ctx
    self.ground_truth = ground_truth(ctx.source)
    self.acc = DetectionAccumulator(category_ids=ctx.source.category_ids,
                                    ground_truth=self.ground_truth)

  def update(self, batch: Mapping[str, np.ndarray],
             predictions: Mapping[str, np.ndarray]) -> None:
    self.acc.add(batch, predictions)

  def compute(self) -> dict[str, float]:
    missing = {int(im["id"]) for im in self.ground_truth["images"]} - self.acc.image_ids
    if missing:
      _log.warning("det/%s: %d image(s) of the ground truth were not evaluated (skipped by "
                   "the reader); they count as missed, e.g. ids %s", self.ctx.split,
                   len(missing), sorted(missing)[:5])
    if self.ctx.submission is not None:
      self.ctx.submission[DetectionTask.submission_key] = self.acc.results()
    out = self.acc.compute()
    return {k: float(out[k]) for k in ("mAP50", "mAP50_agnostic")}


class DetectionData(DataSpec):
  """Boxes (xyxy pixels) with their labels, and the file's image id, per image; COCO or
  TT100K files; ``config.data.det.max_boxes`` box slots per example."""

  name = "det"
  formats = ("coco", "tt100k")
  reduced_decode = True
  rng_stream = 0
  embedded_format = "coco"
  embedded_data = True

  def fields(self, task_cfg):
    return {"boxes": Boxes(labels="labels", mask="box_mask",
                           max_boxes=int(task_cfg["max_boxes"])),
            "image_id": ImageLabel(fill=-1, show=False)}

  def check_source(self, source, task_cfg, split):
    max_boxes = int(task_cfg["max_boxes"])
    over = sum(len(r.labels) > max_boxes for r in source.records)
    if over:
      _log.warning("%s/%s: %d of %d records have more than max_boxes=%d boxes; the extra "
                   "boxes are dropped (counted in the batch field num_dropped_boxes)",
                   self.name, split, over, len(source.records), max_boxes)

  def decode(self, record, image, orig_hw, num_classes):
    del num_classes
    sy, sx = image.shape[0] / orig_hw[0], image.shape[1] / orig_hw[1]
    return {"boxes": np.asarray(record.boxes, np.float32).reshape(-1, 4) * np.float32(
                [sx, sy, sx, sy]),
            "labels": np.asarray(record.labels, np.int32).reshape(-1),
            "image_id": np.int32(record.image_id)}

  def embedded_reader_args(self, root, split):
    return {"ann_file": os.path.join(root, "det", "annotations", f"instances_{split}.json"),
            "image_dir": os.path.join(root, "det", "images", split)}

  def write_embedded(self, root: str, split: str, rng: np.random.Generator,
                     pool: EmbeddedPool) -> None:
    """COCO JSON ``det/annotations/instances_{split}.json`` + ``det/images/{split}/*.jpg``."""
    os.makedirs(os.path.join(root, "det", "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "det", "annotations"), exist_ok=True)
    images, anns = [], []
    for i in range(EMBEDDED_SIZES[split]):
      img = embedded.background(rng, pool.backgrounds, EMBEDDED_HW)
      for x, y, k, alpha, _ in embedded.paste_digits(img, rng, pool.digits, EMBEDDED_HW,
                                                     (2, 6), (20, 45)):
        ys, xs = np.nonzero(alpha > 0.25)
        x0, y0 = x + xs.min(), y + ys.min()
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        anns.append({"id": len(anns) + 1, "image_id": i + 1,
                     "category_id": int(pool.targets[k]) + 1,
                     "bbox": [float(x0), float(y0), float(bw), float(bh)],
                     "area": float(bw * bh), "iscrowd": 0})
      name = f"{split}_{i:05d}.jpg"
      cv2.imwrite(os.path.join(root, "det", "images", split, name),
                  cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
      images.append({"id": i + 1, "file_name": name, "height": EMBEDDED_HW[0],
                     "width": EMBEDDED_HW[1]})
    cats = [{"id": d + 1, "name": f"digit_{d}"} for d in range(10)]
    with open(os.path.join(root, "det", "annotations", f"instances_{split}.json"), "w") as f:
      json.dump({"images": images, "annotations": anns, "categories": cats}, f)


class DetectionTask(TaskSpec):
  """DINO head, mAP50 (pycocotools), the submission's ``dec`` section."""

  name = "det"
  data = DetectionData()
  metric = "mAP50"
  submission_key = "dec"

  def build_head(self, config: Any, channels: Sequence[int], *, rngs: Any) -> Any:
    from tbgc_jax.models.detection import DINOHead

    det = det_config(config)
    if det.num_queries < config.data.det.max_boxes:
      raise ValueError(
          f"config.model.det: num_queries={det.num_queries} must be >= "
          f"config.data.det.max_boxes={config.data.det.max_boxes} (one query per target)")
    return DINOHead(channels, int(config.data.det.num_classes), det, rngs=rngs)

  def evaluator(self, ctx):
    return DetectionEvaluator(ctx)

  def empty_submission(self):
    return []

  def prediction_example(self, ex, prediction):
    keep = prediction["scores"] >= GALLERY_SCORE
    n, slots = int(keep.sum()), ex["boxes"].shape[0]
    boxes = np.zeros_like(ex["boxes"])
    labels = np.zeros_like(ex["labels"])
    boxes[:min(n, slots)] = prediction["boxes"][keep][:slots]
    labels[:min(n, slots)] = prediction["labels"][keep][:slots]
    return {**ex, "boxes": boxes, "labels": labels, "box_mask": np.arange(slots) < n}


register_task(DetectionTask())
