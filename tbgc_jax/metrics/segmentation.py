"""Semantic segmentation: confusion-matrix mIoU and prediction exports (PNG, challenge polygons).

mIoU convention (mmsegmentation / Cityscapes scripts): IoU of class ``c`` is
``TP / (TP + FP + FN)`` over the whole accumulated evaluation set; a class absent from both the
predictions and the ground truth of the whole set (``TP + FP + FN == 0``) has an undefined IoU
and is left out of the mean (``nanmean``); a class predicted but absent from the ground truth
counts with IoU 0. Pixels labelled ``ignore_index`` (255) and padding examples
(``valid == False``) contribute nothing.

>>> import numpy as np
>>> acc = ConfusionMatrix(num_classes=3)
>>> acc.update(np.array([[[0, 1]]]), np.array([[[0, 255]]], np.uint8), np.array([True]))
>>> float(acc.compute()["miou"])
1.0
"""

import os
from collections.abc import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from tbgc_jax.schema import IGNORE_LABEL


def confusion_matrix(
    pred: jax.Array,
    label: jax.Array,
    valid: jax.Array | None = None,
    num_classes: int = 19,
    ignore_index: int = IGNORE_LABEL,
) -> jax.Array:
  """Counts (ground truth, prediction) pixel pairs of one batch; jittable, fixed shapes.

  Args:
    pred: ``[B, H, W]`` integer predicted class ids in ``[0, num_classes)``.
    label: ``[B, H, W]`` integer ground-truth ids; ``ignore_index`` (and any id outside
      ``[0, num_classes)``) is ignored.
    valid: optional ``[B]`` bool, False for padding examples (ignored entirely).
    num_classes: number of classes ``C``.
    ignore_index: label id that is never counted.

  Returns:
    ``[C, C]`` int32 counts, rows = ground truth, columns = prediction.
  """
  label = label.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  keep = (label != ignore_index) & (label >= 0) & (label < num_classes)
  keep &= (pred >= 0) & (pred < num_classes)
  if valid is not None:
    keep &= valid.astype(bool)[:, None, None]
  index = jnp.where(keep, label * num_classes + pred, num_classes * num_classes)
  counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def iou_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Per-class IoU and mIoU from an accumulated confusion matrix (see module docstring).

  Args:
    confusion: ``[C, C]`` counts, rows = ground truth, columns = prediction.

  Returns:
    dict with ``iou`` ``[C]`` float64 (NaN for classes absent from both prediction and ground
    truth), ``miou`` (nanmean of ``iou``, NaN if every class is absent), ``acc`` overall
    pixel accuracy, and ``present`` ``[C]`` bool (classes that enter the mean).
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  present = union > 0
  iou = np.full(tp.shape, np.nan)
  np.divide(tp, union, out=iou, where=present)
  miou = float(np.mean(iou[present])) if present.any() else float("nan")
  total = confusion.sum()
  acc = float(tp.sum() / total) if total > 0 else float("nan")
  return {"iou": iou, "miou": np.float64(miou), "acc": np.float64(acc), "present": present}


class ConfusionMatrix:
  """Host-side accumulator of `confusion_matrix` over evaluation batches.

  Counts are kept in int64 on the host (a full BDD100K val set overflows no int32 per batch,
  but could in total at high resolution).

  Args:
    num_classes: number of classes (19 for BDD100K).
    ignore_index: label id never counted.
  """

  def __init__(self, num_classes: int = 19, ignore_index: int = IGNORE_LABEL):
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.matrix = np.zeros((num_classes, num_classes), np.int64)
    self._count = jax.jit(confusion_matrix, static_argnames=("num_classes", "ignore_index"))

  def reset(self) -> None:
    """Forgets every accumulated count."""
    self.matrix[:] = 0

  def update(self, pred, label, valid=None) -> None:
    """Adds one batch: ``pred``/``label`` ``[B, H, W]``, ``valid`` ``[B]`` (see module)."""
    if np.shape(pred) != np.shape(label) or np.ndim(pred) != 3:
      raise ValueError(
          f"ConfusionMatrix.update: pred {np.shape(pred)} and label {np.shape(label)} must "
          "both be [B, H, W]")
    counts = self._count(pred, label, valid, num_classes=self.num_classes,
                         ignore_index=self.ignore_index)
    self.matrix += np.asarray(counts, np.int64)

  def compute(self) -> dict[str, np.ndarray]:
    """Returns `iou_from_confusion` of everything accumulated so far."""
    return iou_from_confusion(self.matrix)


def restore_label_map(pred: np.ndarray, image_hw: Sequence[int],
                      orig_hw: Sequence[int]) -> np.ndarray:
  """Crops a padded network-resolution prediction and resizes it to the original image.

  Args:
    pred: ``[H, W]`` class ids at the network input resolution (padded bottom/right).
    image_hw: valid ``(h, w)`` of the resized image inside ``pred``.
    orig_hw: ``(h, w)`` of the image on disk.

  Returns:
    ``[orig_h, orig_w]`` uint8 class ids (nearest-neighbour resize, no new labels invented).
  """
  h, w = int(image_hw[0]), int(image_hw[1])
  oh, ow = int(orig_hw[0]), int(orig_hw[1])
  if not (0 < h <= pred.shape[0] and 0 < w <= pred.shape[1]):
    raise ValueError(f"restore_label_map: image_hw {(h, w)} outside prediction {pred.shape}")
  crop = np.ascontiguousarray(np.asarray(pred)[:h, :w].astype(np.uint8))
  if (h, w) == (oh, ow):
    return crop
  return cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_NEAREST)


def scores_to_label_map(scores: np.ndarray, image_hw: Sequence[int],
                        orig_hw: Sequence[int]) -> np.ndarray:
  """Class map at the ORIGINAL resolution from network-resolution class scores.

  The scores of the valid region are resized bilinearly (half-pixel centres, as
  mmsegmentation's ``resize(..., align_corners=False)``) to the size on disk, then the argmax
  is taken there, so classes thinner than the network's pixel can still win. One image at a
  time: ``orig_h * orig_w * C`` float32 on the host (70 MB for BDD100K's 720x1280, 19 classes).

  Args:
    scores: ``[H, W, C]`` per-class scores at the network input resolution (padded
      bottom/right).
    image_hw: valid ``(h, w)`` of the resized image inside ``scores``.
    orig_hw: ``(h, w)`` of the image on disk.

  Returns:
    ``[orig_h, orig_w]`` uint8 class ids.
  """
  h, w = int(image_hw[0]), int(image_hw[1])
  oh, ow = int(orig_hw[0]), int(orig_hw[1])
  scores = np.asarray(scores, np.float32)
  if scores.ndim != 3 or not (0 < h <= scores.shape[0] and 0 < w <= scores.shape[1]):
    raise ValueError(f"scores_to_label_map: image_hw {(h, w)} outside scores {scores.shape} "
                     "(expected [H, W, C])")
  crop = np.ascontiguousarray(scores[:h, :w])
  if (h, w) != (oh, ow):
    crop = cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_LINEAR)
    crop = crop.reshape(oh, ow, -1)  # OpenCV drops a single channel axis
  return np.argmax(crop, -1).astype(np.uint8)


def save_label_png(path: str | os.PathLike, label_map: np.ndarray) -> None:
  """Writes a ``[H, W]`` class-id map as a single-channel 8-bit PNG (BDD100K's format)."""
  label_map = np.asarray(label_map)
  if label_map.ndim != 2 or label_map.min(initial=0) < 0 or label_map.max(initial=0) > 255:
    raise ValueError(
        f"save_label_png({path}): expected [H, W] ids in [0, 255], got shape "
        f"{label_map.shape}")
  if not cv2.imwrite(os.fspath(path), label_map.astype(np.uint8)):
    raise OSError(f"save_label_png: OpenCV could not write {path}")


def label_map_to_polygons(label_map: np.ndarray, num_classes: int = 19,
                          min_area: float = 0.0) -> dict[int, list[list[int]]]:
  """Converts a class-id map to polygons per class (the challenge's ``seg`` entry of one image).

  Each connected region's outer boundary becomes one polygon ``[x1, y1, x2, y2, ...]`` in pixel
  coordinates (OpenCV ``findContours`` with ``RETR_EXTERNAL``: the boundary runs through the
  centres of the region's border pixels, so filling the polygon with ``cv2.fillPoly`` gives the
  region back; holes are not represented, they are covered by the enclosed classes' own
  polygons). Ignore/unknown ids are skipped.

  Args:
    label_map: ``[H, W]`` class ids.
    num_classes: classes to export (ids ``0 .. num_classes - 1``).
    min_area: regions whose contour area is below this are dropped (0 keeps all, including
      single pixels, whose polygon is one point).

  Returns:
    ``{class_id: [polygon, ...]}`` for the classes present. JSON turns the int keys into
    strings.
  """
  label_map = np.asarray(label_map)
  out: dict[int, list[list[int]]] = {}
  for c in np.unique(label_map):
    c = int(c)
    if c >= num_classes or c < 0:
      continue
    mask = (label_map == c).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [cnt.reshape(-1).astype(int).tolist() for cnt in contours
             if min_area <= 0 or cv2.contourArea(cnt) >= min_area]
    if polys:
      out[c] = polys
  return out


def seg_submission(
    predictions: Sequence[np.ndarray],
    image_names: Sequence[str],
    image_hw: Sequence[Sequence[int]] | None = None,
    orig_hw: Sequence[Sequence[int]] | None = None,
    num_classes: int = 19,
) -> dict[str, dict[int, list[list[int]]]]:
  """Builds the challenge's ``seg`` submission section ``{image_name: {class_id: polygons}}``.

  Args:
    predictions: per image ``[H, W]`` class ids (network resolution if ``image_hw`` and
      ``orig_hw`` are given, else already at the original size).
    image_names: file name of each image, as in the annotation.
    image_hw: optional per image valid ``(h, w)`` inside the padded prediction.
    orig_hw: optional per image original ``(h, w)``; with ``image_hw``, predictions are
      cropped and resized back first (`restore_label_map`).
    num_classes: classes to export.

  Returns:
    dict ready for ``json.dump`` under the submission's ``"seg"`` key.
  """
  if len(predictions) != len(image_names):
    raise ValueError(f"seg_submission: {len(predictions)} predictions for "
                     f"{len(image_names)} image names")
  if (image_hw is None) != (orig_hw is None):
    raise ValueError("seg_submission: give both image_hw and orig_hw, or neither")
  out = {}
  for i, (pred, name) in enumerate(zip(predictions, image_names, strict=True)):
    if image_hw is not None:
      pred = restore_label_map(pred, image_hw[i], orig_hw[i])
    out[str(name)] = label_map_to_polygons(pred, num_classes)
  return out
