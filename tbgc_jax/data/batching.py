"""Fixed-shape examples and batches (the shared batch interface in the project brief).

``pad_example`` turns a variable-shape example into fixed shapes: image padded bottom/right
to ``image_hw`` (resized down first, keeping the aspect ratio, if it is larger), label maps
likewise (255), the task's other fields as its spec pads them (``TaskSpec.pad_targets``:
detection pads boxes to ``max_boxes``). Boxes beyond ``max_boxes`` are dropped, counted per
process and logged (``box_overflow_count``), never silently. ``collate`` stacks fixed-shape
examples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from tbgc_jax.data.transforms import resize
from tbgc_jax.schema import IGNORE_LABEL
from tbgc_jax.tasks import TaskSpec, get_task

_log = logging.getLogger(__name__)
_OVERFLOW = {"examples": 0, "boxes": 0}


def box_overflow_count() -> dict[str, int]:
  """Boxes dropped by ``pad_example`` in this process so far: {"examples", "boxes"}."""
  return dict(_OVERFLOW)


def note_box_overflow(n_dropped: int, max_boxes: int, index: int) -> None:
  """Counts (and logs the 1st, 2nd, 4th, ... time) boxes dropped beyond ``max_boxes``."""
  _OVERFLOW["examples"] += 1
  _OVERFLOW["boxes"] += n_dropped
  k = _OVERFLOW["examples"]
  if k & (k - 1) == 0:  # log the 1st, 2nd, 4th, 8th, ... occurrence in this process
    _log.warning("box overflow: record %d has %d boxes more than max_boxes=%d (dropped; "
                 "%d examples / %d boxes so far in this process)", index, n_dropped, max_boxes,
                 _OVERFLOW["examples"], _OVERFLOW["boxes"])


def _fit(ex: dict, image_hw: Sequence[int], label_maps: Sequence[str]) -> dict:
  """Resizes an example down (aspect kept) if it does not fit in ``image_hw``."""
  h, w = ex["image"].shape[:2]
  if h <= image_hw[0] and w <= image_hw[1]:
    return ex
  s = min(image_hw[0] / h, image_hw[1] / w)
  return resize(ex, (min(image_hw[0], max(1, round(h * s))),
                     min(image_hw[1], max(1, round(w * s)))), label_maps)


def pad_example(ex: dict, task: str | TaskSpec, image_hw: Sequence[int], max_boxes: int = 100,
                valid: bool = True) -> dict[str, np.ndarray]:
  """Returns the fixed-shape version of one example (keys of the shared batch interface).

  Args:
    ex: example from a source/augmentation (``image`` uint8 [h,w,3], task annotations).
    task: a registered task's name (or its spec).
    image_hw: fixed (H, W); larger images are first resized down to fit.
    max_boxes: N, fixed number of box slots (det).
    valid: value of the ``valid`` field (False for eval padding examples).

  Returns:
    Dict of numpy arrays with fixed shapes (no batch dimension).
  """
  spec = get_task(task)
  ex = _fit(ex, image_hw, spec.label_maps)
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
  for k in spec.label_maps:
    lab = np.full((H, W), IGNORE_LABEL, np.uint8)
    lab[:h, :w] = ex[k]
    out[k] = lab
  out.update(spec.pad_targets(ex, (H, W), max_boxes=max_boxes))
  return out


def padding_example(task: str | TaskSpec, image_hw: Sequence[int], max_boxes: int = 100
                    ) -> dict[str, np.ndarray]:
  """An all-zero example with ``valid=False`` (fills the last eval batch)."""
  spec = get_task(task)
  H, W = int(image_hw[0]), int(image_hw[1])
  ex = {"image": np.zeros((0, 0, 3), np.uint8), "orig_hw": np.zeros(2, np.int32),
        "index": np.int32(-1), "image_id": np.int32(-1)}
  ex |= {k: np.zeros((0, 0), np.uint8) for k in spec.label_maps}
  ex |= spec.padding_targets()
  out = pad_example(ex, spec, (H, W), max_boxes, valid=False)
  out["image_hw"] = np.zeros(2, np.int32)
  return out


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks fixed-shape examples into a batch dict (leading dimension B)."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
