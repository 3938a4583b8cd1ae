"""Fixed-shape examples and batches (the shared batch interface in the project brief).

``pad_example`` turns a variable-shape example into fixed shapes: image padded bottom/right
to ``image_hw`` (resized down first, keeping the aspect ratio, if it is larger), boxes padded
to ``max_boxes``. Boxes beyond ``max_boxes`` are dropped, counted per process and logged
(``box_overflow_count``), never silently. ``collate`` stacks fixed-shape examples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tbgc_jax.data.transforms import resize
from tbgc_jax.schema import IGNORE_LABEL, TASKS

_log = logging.getLogger(__name__)
_OVERFLOW = {"examples": 0, "boxes": 0}


def box_overflow_count() -> dict[str, int]:
  """Boxes dropped by ``pad_example`` in this process so far: {"examples", "boxes"}."""
  return dict(_OVERFLOW)


def _note_overflow(n_dropped: int, max_boxes: int, index: int) -> None:
  _OVERFLOW["examples"] += 1
  _OVERFLOW["boxes"] += n_dropped
  k = _OVERFLOW["examples"]
  if k & (k - 1) == 0:  # log the 1st, 2nd, 4th, 8th, ... occurrence in this process
    _log.warning("box overflow: record %d has %d boxes more than max_boxes=%d (dropped; "
                 "%d examples / %d boxes so far in this process)", index, n_dropped, max_boxes,
                 _OVERFLOW["examples"], _OVERFLOW["boxes"])


def _fit(ex: dict, image_hw: Sequence[int]) -> dict:
  """Resizes an example down (aspect kept) if it does not fit in ``image_hw``."""
  h, w = ex["image"].shape[:2]
  if h <= image_hw[0] and w <= image_hw[1]:
    return ex
  s = min(image_hw[0] / h, image_hw[1] / w)
  return resize(ex, (min(image_hw[0], max(1, round(h * s))),
                     min(image_hw[1], max(1, round(w * s)))))


def pad_example(ex: dict, task: str, image_hw: Sequence[int], max_boxes: int = 100,
                valid: bool = True) -> dict[str, np.ndarray]:
  """Returns the fixed-shape version of one example (keys of the shared batch interface).

  Args:
    ex: example from a source/augmentation (``image`` uint8 [h,w,3], task annotations).
    task: "det", "seg" or "cls".
    image_hw: fixed (H, W); larger images are first resized down to fit.
    max_boxes: N, fixed number of box slots (det).
    valid: value of the ``valid`` field (False for eval padding examples).

  Returns:
    Dict of numpy arrays with fixed shapes (no batch dimension).
  """
  ex = _fit(ex, image_hw)
  H, W = int(image_hw[0]), int(image_hw[1])
  img = ex["image"]
  h, w = img.shape[:2]
  out_img = np.zeros((H, W, 3), np.uint8)
  out_img[:h, :w] = img
  mask = np.zeros((H, W), bool)
  mask[:h, :w] = True
  out = {
      "image": out_img,
      "image_mask": mask,
      "image_hw": np.asarray([h, w], np.int32),
      "orig_hw": np.asarray(ex["orig_hw"], np.int32),
      "index": np.int32(ex["index"]),
      "valid": np.bool_(valid),
  }
  if task == "det":
    boxes = np.asarray(ex["boxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(ex["labels"], np.int32).reshape(-1)
    n = boxes.shape[0]
    if n > max_boxes:
      _note_overflow(n - max_boxes, max_boxes, int(ex["index"]))
      boxes, labels, n = boxes[:max_boxes], labels[:max_boxes], max_boxes
    out["boxes"] = np.zeros((max_boxes, 4), np.float32)
    out["boxes"][:n] = boxes
    out["labels"] = np.zeros((max_boxes,), np.int32)
    out["labels"][:n] = labels
    out["box_mask"] = np.arange(max_boxes) < n
    out["image_id"] = np.int32(ex.get("image_id", -1))
  elif task == "seg":
    lab = np.full((H, W), IGNORE_LABEL, np.uint8)
    lab[:h, :w] = ex["label"]
    out["label"] = lab
  elif task == "cls":
    out["label"] = np.int32(ex["label"])
  else:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  return out


def padding_example(task: str, image_hw: Sequence[int], max_boxes: int = 100
                    ) -> dict[str, np.ndarray]:
  """An all-zero example with ``valid=False`` (fills the last eval batch)."""
  H, W = int(image_hw[0]), int(image_hw[1])
  ex = {"image": np.zeros((0, 0, 3), np.uint8), "orig_hw": np.zeros(2, np.int32),
        "index": np.int32(-1), "image_id": np.int32(-1)}
  if task == "det":
    ex |= {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int32)}
  elif task == "seg":
    ex["label"] = np.zeros((0, 0), np.uint8)
  else:
    ex["label"] = np.int32(0)
  out = pad_example(ex, task, (H, W), max_boxes, valid=False)
  out["image_hw"] = np.zeros(2, np.int32)
  return out


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks fixed-shape examples into a batch dict (leading dimension B)."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
