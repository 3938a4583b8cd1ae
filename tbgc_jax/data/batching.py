"""Fixed-shape examples and batches (the shared batch interface in the project brief).

``pad_example`` turns a variable-shape example into fixed shapes: the image padded
bottom/right to ``image_hw`` (resized down first, keeping the aspect ratio, if it is larger),
then every field by its kind (``tbgc_jax.data.fields``): maps padded with their fill, boxes
to their ``max_boxes`` slots with a valid mask, image-level values as they are. Boxes beyond
the slots are dropped and counted in the example's ``num_dropped_<field>`` field, which
reaches the trainer's logs (``fields.pop_counts``), never silently. ``collate`` stacks
fixed-shape examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tbgc_jax.data.fields import Fields, as_fields
from tbgc_jax.data.transforms import resize


def _fit(ex: dict, image_hw: Sequence[int], fields: Fields) -> dict:
  """Resizes an example down (aspect kept) if it does not fit in ``image_hw``."""
  h, w = ex["image"].shape[:2]
  if h <= image_hw[0] and w <= image_hw[1]:
    return ex
  s = min(image_hw[0] / h, image_hw[1] / w)
  return resize(ex, (min(image_hw[0], max(1, round(h * s))),
                     min(image_hw[1], max(1, round(w * s)))), fields)


def pad_example(ex: dict, fields: Fields | dict, image_hw: Sequence[int], valid: bool = True
                ) -> dict[str, np.ndarray]:
  """Returns the fixed-shape version of one example (keys of the shared batch interface).

  Args:
    ex: example from a source/augmentation (``image`` uint8 [h,w,3], the task's fields).
    fields: the task's fields and their kinds (``DataSpec.fields``).
    image_hw: fixed (H, W); larger images are first resized down to fit.
    valid: value of the ``valid`` field (False for eval padding examples).

  Returns:
    Dict of numpy arrays with fixed shapes (no batch dimension).

  Raises:
    KeyError: a declared field (not ``optional``) is missing from the example.
  """
  fields = as_fields(fields)
  missing = [k for k, kind in fields if k not in ex and not kind.optional]
  if missing:
    raise KeyError(f"pad_example: the example has no field {missing} (it has {sorted(ex)})")
  ex = _fit(ex, image_hw, fields)
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
  for k, kind in fields:
    out.update(kind.pad(ex, k, (H, W)))
  return out


def padding_example(fields: Fields | dict, image_hw: Sequence[int]) -> dict[str, np.ndarray]:
  """An all-zero example with ``valid=False`` (fills the last eval batch)."""
  fields = as_fields(fields)
  ex = {"image": np.zeros((0, 0, 3), np.uint8), "orig_hw": np.zeros(2, np.int32),
        "index": np.int32(-1)}
  for k, kind in fields:
    ex |= kind.empty(k)
  out = pad_example(ex, fields, image_hw, valid=False)
  out["image_hw"] = np.zeros(2, np.int32)
  return out


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks fixed-shape examples into a batch dict (leading dimension B)."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
