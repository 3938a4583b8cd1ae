"""Classification ("cls"): ArcFace head, list files or TFDS, top-1 accuracy."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from tbgc_jax.data import embedded
from tbgc_jax.data.fields import ImageLabel
from tbgc_jax.data.spec import DataSpec, EmbeddedPool
from tbgc_jax.tasks.base import EvalContext, TaskSpec, register_task

EMBEDDED_HW = (64, 64)  # 20 fine-grained classes: digit x ink colour variant
EMBEDDED_SIZES = {"train": 2000, "val": 400}
EMBEDDED_NUM_CLASSES = 20
# Two close ink hues per digit for the fine-grained classes (OpenCV hue units, 0..180).
_HUES = (100.0, 118.0)


class ClassificationEvaluator:
  """Top-1 accuracy over the valid rows; fills the submission's ``cls`` section
  (``{image file name: predicted class}``)."""

  def __init__(self, ctx: EvalContext):
    from tbgc_jax.metrics.classification import Top1Accuracy

    self.ctx = ctx
    self.acc = Top1Accuracy()

  def update(self, batch: Mapping[str, np.ndarray],
             predictions: Mapping[str, np.ndarray]) -> None:
    self.acc.update(predictions, batch)
    if self.ctx.submission is not None:
      section = self.ctx.submission[ClassificationTask.submission_key]
      records = self.ctx.source.records
      for i in np.flatnonzero(np.asarray(batch["valid"], bool)):
        name = os.path.basename(records[int(batch["index"][i])].image_path)
        section[name] = int(predictions["label"][i])

  def compute(self) -> dict[str, float]:
    return {"top1": float(self.acc.result())}


class ClassificationData(DataSpec):
  """One class id per image (``label`` int32); list files or TFDS."""

  name = "cls"
  formats = ("cls_list", "tfds")
  rng_stream = 2
  embedded_format = "cls_list"
  embedded_data = True

  def fields(self, task_cfg):
    del task_cfg
    return {"label": ImageLabel(dtype="int32", fill=0)}

  def decode(self, record, image, orig_hw, num_classes):
    del image, orig_hw, num_classes
    return {"label": np.int32(record.label)}

  def embedded_reader_args(self, root, split):
    return {"list_file": os.path.join(root, "cls", f"{split}.txt"),
            "image_dir": os.path.join(root, "cls", "images")}

  def write_embedded(self, root: str, split: str, rng: np.random.Generator,
                     pool: EmbeddedPool) -> None:
    """List files ``cls/{split}.txt`` (``<image_name> <class_id>``) + ``cls/images/*.jpg``."""
    idir = os.path.join(root, "cls", "images")
    os.makedirs(idir, exist_ok=True)
    lines = []
    h, w = EMBEDDED_HW
    for i in range(EMBEDDED_SIZES[split]):
      label = i % EMBEDDED_NUM_CLASSES  # balanced classes
      digit, variant = divmod(label, 2)
      candidates = np.nonzero(pool.targets == digit)[0]
      k = int(candidates[rng.integers(len(candidates))])
      img = embedded.background(rng, pool.backgrounds, EMBEDDED_HW)
      size = int(rng.integers(36, 57))
      x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
      embedded.compose(img, embedded.digit_alpha(pool.digits[k], size), x, y,
                       embedded.ink(rng, _HUES[variant]))
      name = f"{split}_{i:05d}.jpg"
      cv2.imwrite(os.path.join(idir, name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                  [cv2.IMWRITE_JPEG_QUALITY, 95])
      lines.append(f"{name} {label}\n")
    with open(os.path.join(root, "cls", f"{split}.txt"), "w") as f:
      f.writelines(lines)


class ClassificationTask(TaskSpec):
  """ArcFace head, top-1 accuracy, the submission's ``cls`` section."""

  name = "cls"
  data = ClassificationData()
  metric = "top1"
  submission_key = "cls"

  def build_head(self, config: Any, channels: Sequence[int], *, rngs: Any) -> Any:
    from tbgc_jax.models.classification import ClassificationHead

    m = config.model.cls
    return ClassificationHead(channels, int(config.data.cls.num_classes),
                              hidden_dim=m.hidden_dim or None, margin=m.margin, scale=m.scale,
                              rngs=rngs)

  def evaluator(self, ctx):
    return ClassificationEvaluator(ctx)

  def empty_submission(self):
    return {}

  def prediction_example(self, ex, prediction):
    return {**ex, "label": np.int32(prediction["label"])}


register_task(ClassificationTask())
