"""Kinds of example fields: how each field follows the image through augmentation and batching.

A task declares the fields of its examples (besides ``image``, ``index`` and ``orig_hw``) as
a mapping from example key to kind, e.g. ``{"boxes": Boxes(max_boxes=24), "image_id":
ImageLabel(fill=-1, show=False)}`` (detection) or ``{"label": ClassMap()}`` (segmentation).
A geometric augmentation computes one transform from its random draw (a resize, an affine
matrix, a crop window, a flip) and applies it to the image and, through its kind, to every
declared field; batching pads each field by its kind; the preview draws it by its kind.
Nothing here knows a task.

Kinds:

- `Boxes`: float32 [n, 4] xyxy boxes in pixel-edge coordinates (pixel j covers [j, j+1]),
  with a companion int32 [n] ``labels`` field. Moved by their corners (enclosing box),
  clipped to the image and dropped when narrower or shorter than 1 pixel. Padded to
  ``max_boxes`` slots with a bool ``mask``; boxes beyond the slots are dropped and counted
  in the example's ``num_dropped_<key>`` field (`COUNT_PREFIX`).
- `ClassMap`: an integer map [H, W] (``dtype``, e.g. uint8), nearest interpolation, ``fill``
  (e.g. 255 = ignore) outside the image and in the batch padding.
- `DenseMap`: a float map [H, W] (depth, distance, ...), bilinear interpolation, ``fill``
  outside the image and in the padding (0, or NaN as an invalid mark).
- `Keypoints`: float32 [k, 3] points (x, y, visible) in pixel-edge coordinates; a flip
  swaps the ``flip_pairs`` (left/right) and mirrors x; points leaving the image become
  invisible.
- `ImageLabel`: an image-level value (a class id, an image id), untouched by geometry.

Each kind is a small frozen (hashable, picklable) dataclass; transforms hold the fields as a
tuple of ``(key, kind)`` pairs (`as_fields`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import cv2
import numpy as np

from tbgc_jax.schema import IGNORE_LABEL

Example = dict[str, Any]
# Batch fields whose name starts with this count what batching dropped (per example, int32).
COUNT_PREFIX = "num_dropped_"


@dataclasses.dataclass(frozen=True)
class Kind:
  """Base of the field kinds. Every method updates the example ``ex`` (a dict the caller
  owns) in place for the field ``key``; the caller only calls them when ``key`` is in ``ex``.

  Attributes:
    blendable: MixUp may blend an example holding this field with another one.
    under_padding: the preview draws it before dimming the padding (maps), else after.
    optional: an example may lack the field (`pad` then gives its fill).
  """

  blendable: ClassVar[bool] = True
  under_padding: ClassVar[bool] = False
  optional: ClassVar[bool] = False

  def resize(self, ex: Example, key: str, hw: tuple[int, int], out_hw: tuple[int, int]
             ) -> None:
    """The image went from ``hw`` to ``out_hw`` = (h, w) by scaling."""
    del ex, key, hw, out_hw

  def warp(self, ex: Example, key: str, m: np.ndarray, m_cv: np.ndarray,
           out_hw: tuple[int, int]) -> None:
    """The image was warped by the 3x3 affine ``m`` (pixel-edge coordinates; ``m_cv``: the
    2x3 OpenCV matrix of pixel centres) onto an ``out_hw`` canvas."""
    del ex, key, m, m_cv, out_hw

  def crop(self, ex: Example, key: str, x0: int, y0: int, ch: int, cw: int) -> None:
    """The image was cropped to the ``ch`` x ``cw`` window at (x0, y0)."""
    del ex, key, x0, y0, ch, cw

  def hflip(self, ex: Example, key: str, w: int) -> None:
    """The image (width ``w``) was flipped left-right."""
    del ex, key, w

  def canvas(self, ex: Example, key: str, hw: tuple[int, int], keep: bool) -> dict:
    """The empty canvas entries of a multi-image transform (Mosaic, MixUp) of size ``hw``;
    with ``keep`` they start with ``ex``'s own value (MixUp)."""
    del ex, key, hw, keep
    return {}

  def paste(self, canvas: dict, ex: Example, key: str, x0: int, y0: int,
            clip: tuple[int, int, int, int]) -> None:
    """Pastes ``ex``'s field with its top-left at (x0, y0), inside ``clip`` = (cx0, cy0,
    cx1, cy1) (canvas pixels, already within the pasted image)."""
    del canvas, ex, key, x0, y0, clip

  def finish(self, canvas: dict, key: str) -> dict:
    """The example entries of a finished canvas."""
    del canvas, key
    return {}

  def pad(self, ex: Example, key: str, hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """The fixed-shape entries of the field in a batch of size ``hw`` = (H, W) (the
    example's image sits at the top left)."""
    raise NotImplementedError(f"{type(self).__name__}.pad")

  def empty(self, key: str) -> dict[str, Any]:
    """The field's entries in an empty (padding) example, before `pad`."""
    raise NotImplementedError(f"{type(self).__name__}.empty")

  def draw(self, image: np.ndarray, ex: Mapping[str, np.ndarray], key: str,
           num_classes: int) -> np.ndarray:
    """Draws the fixed-shape field on ``image`` (uint8 RGB) for the preview."""
    del ex, key, num_classes
    return image


def palette(n: int) -> np.ndarray:
  """``n`` fixed random RGB colours, the first black."""
  rng = np.random.default_rng(0)
  pal = rng.integers(60, 256, (max(n, 1), 3)).astype(np.uint8)
  pal[0] = 0
  return pal


# ---------------------------------------------------------------- boxes


@dataclasses.dataclass(frozen=True)
class Boxes(Kind):
  """Boxes xyxy (pixel-edge coordinates) with a companion ``labels`` field.

  Attributes:
    labels: the example key of the int32 [n] class of each box.
    mask: the batch key of the bool [max_boxes] valid-slot mask.
    max_boxes: slots per example in a batch.
  """

  labels: str = "labels"
  mask: str = "box_mask"
  max_boxes: int = 100

  def _set(self, ex: Example, key: str, boxes: np.ndarray, keep: np.ndarray | None = None
           ) -> None:
    ex[key] = boxes if keep is None else boxes[keep]
    if keep is not None:
      ex[self.labels] = np.asarray(ex[self.labels], np.int32).reshape(-1)[keep]

  def _clip_filter(self, ex: Example, key: str, hw: tuple[int, int]) -> None:
    """Clips to the image and drops the degenerate boxes (side < 1 pixel)."""
    h, w = hw
    b = np.asarray(ex[key], np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, w)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, h)
    self._set(ex, key, b, ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1))

  def resize(self, ex, key, hw, out_hw):
    (h, w), (oh, ow) = hw, out_hw
    # Clipped: float32 rounding can put a box edge on the border a hair outside the image.
    b = np.asarray(ex[key], np.float32) * np.asarray([ow / w, oh / h, ow / w, oh / h],
                                                     np.float32)
    ex[key] = np.minimum(b, np.asarray([ow, oh, ow, oh], np.float32))

  def warp(self, ex, key, m, m_cv, out_hw):
    del m_cv
    if not len(ex[key]):
      return
    b = np.asarray(ex[key], np.float64).reshape(-1, 4)
    corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], axis=1)
    pts = corners @ m[:2, :2].T + m[:2, 2]
    ex[key] = np.concatenate([pts.min(1), pts.max(1)], axis=1).astype(np.float32)
    self._clip_filter(ex, key, out_hw)

  def crop(self, ex, key, x0, y0, ch, cw):
    ex[key] = np.asarray(ex[key], np.float32).reshape(-1, 4) - np.float32([x0, y0, x0, y0])
    self._clip_filter(ex, key, (ch, cw))

  def hflip(self, ex, key, w):
    b = np.asarray(ex[key], np.float32).reshape(-1, 4)
    ex[key] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)

  def canvas(self, ex, key, hw, keep):
    del hw
    if not keep:
      return {key: [], self.labels: []}
    return {key: [np.asarray(ex[key], np.float32).reshape(-1, 4)],
            self.labels: [np.asarray(ex[self.labels], np.int32).reshape(-1)]}

  def paste(self, canvas, ex, key, x0, y0, clip):
    cx0, cy0, cx1, cy1 = clip
    b = np.asarray(ex[key], np.float32).reshape(-1, 4) + np.float32([x0, y0, x0, y0])
    b[:, 0::2] = np.clip(b[:, 0::2], cx0, cx1)
    b[:, 1::2] = np.clip(b[:, 1::2], cy0, cy1)
    keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
    canvas[key].append(b[keep])
    canvas[self.labels].append(np.asarray(ex[self.labels], np.int32).reshape(-1)[keep])

  def finish(self, canvas, key):
    return {key: np.concatenate(canvas[key]).reshape(-1, 4),
            self.labels: np.concatenate(canvas[self.labels]).reshape(-1)}

  def pad(self, ex, key, hw):
    del hw
    n_max = int(self.max_boxes)
    boxes = np.asarray(ex[key], np.float32).reshape(-1, 4)
    labels = np.asarray(ex[self.labels], np.int32).reshape(-1)
    n = boxes.shape[0]
    dropped = max(0, n - n_max)
    if dropped:
      boxes, labels, n = boxes[:n_max], labels[:n_max], n_max
    out = {key: np.zeros((n_max, 4), np.float32), self.labels: np.zeros((n_max,), np.int32)}
    out[key][:n] = boxes
    out[self.labels][:n] = labels
    out[self.mask] = np.arange(n_max) < n
    out[COUNT_PREFIX + key] = np.int32(dropped)
    return out

  def empty(self, key):
    return {key: np.zeros((0, 4), np.float32), self.labels: np.zeros((0,), np.int32)}

  def draw(self, image, ex, key, num_classes):
    pal = palette(num_classes + 1)
    mask = ex[self.mask]
    for box, label in zip(ex[key][mask], ex[self.labels][mask], strict=True):
      x0, y0, x1, y1 = (int(round(float(v))) for v in box)
      c = tuple(int(v) for v in pal[int(label) + 1])
      cv2.rectangle(image, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (0, 0, 0), 2)
      cv2.rectangle(image, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), c, 1)
      cv2.putText(image, str(int(label)), (x0, max(8, y0 - 1)), cv2.FONT_HERSHEY_PLAIN, 0.7, c,
                  1)
    return image


# ---------------------------------------------------------------- maps


@dataclasses.dataclass(frozen=True)
class _Map(Kind):
  """A per-pixel map [H, W, ...] aligned with the image (``interpolation``: OpenCV flag used
  by resizes and warps; ``fill`` outside the image and in the padding)."""

  dtype: str = "uint8"
  fill: float = IGNORE_LABEL
  blendable: ClassVar[bool] = False  # a blend of two maps means nothing
  under_padding: ClassVar[bool] = True
  resize_flag: ClassVar[int] = cv2.INTER_LINEAR
  warp_flag: ClassVar[int] = cv2.INTER_LINEAR

  def resize(self, ex, key, hw, out_hw):
    del hw
    oh, ow = out_hw
    ex[key] = cv2.resize(ex[key], (ow, oh), interpolation=self.resize_flag)

  def warp(self, ex, key, m, m_cv, out_hw):
    del m
    oh, ow = out_hw
    ex[key] = cv2.warpAffine(ex[key], m_cv, (ow, oh), flags=self.warp_flag,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=self.fill)

  def crop(self, ex, key, x0, y0, ch, cw):
    ex[key] = np.ascontiguousarray(ex[key][y0:y0 + ch, x0:x0 + cw])

  def hflip(self, ex, key, w):
    del w
    ex[key] = np.ascontiguousarray(ex[key][:, ::-1])

  def canvas(self, ex, key, hw, keep):
    del keep
    return {key: np.full((*hw, *np.shape(ex[key])[2:]), self.fill, self.dtype)}

  def paste(self, canvas, ex, key, x0, y0, clip):
    cx0, cy0, cx1, cy1 = clip
    canvas[key][cy0:cy1, cx0:cx1] = ex[key][cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]

  def finish(self, canvas, key):
    return {key: canvas[key]}

  def pad(self, ex, key, hw):
    v = ex[key]
    out = np.full((*hw, *np.shape(v)[2:]), self.fill, self.dtype)
    out[:v.shape[0], :v.shape[1]] = v
    return {key: out}

  def empty(self, key):
    return {key: np.zeros((0, 0), self.dtype)}


@dataclasses.dataclass(frozen=True)
class ClassMap(_Map):
  """An integer class map (nearest interpolation; ``fill``, default 255, is "ignore")."""

  # NEAREST_EXACT samples at pixel centres like the bilinear image resize (plain NEAREST is
  # offset by up to half a source pixel).
  resize_flag: ClassVar[int] = cv2.INTER_NEAREST_EXACT
  warp_flag: ClassVar[int] = cv2.INTER_NEAREST

  def draw(self, image, ex, key, num_classes):
    lab = ex[key]
    pal = palette(num_classes)
    over = np.zeros_like(image)
    known = (lab != self.fill) & (lab < num_classes)
    over[known] = pal[lab[known]]
    over[lab == self.fill] = 128
    show = (lab != 0)
    image[show] = (0.45 * image[show] + 0.55 * over[show]).astype(np.uint8)
    return image


@dataclasses.dataclass(frozen=True)
class DenseMap(_Map):
  """A float target map (depth, distance, ...): bilinear interpolation, ``fill`` outside the
  image and in the padding (0, or NaN to mark those pixels invalid for the loss)."""

  dtype: str = "float32"
  fill: float = 0.0


# ---------------------------------------------------------------- points and image labels


@dataclasses.dataclass(frozen=True)
class Keypoints(Kind):
  """``num_keypoints`` points as float32 [k, 3]: x, y (pixel-edge coordinates) and a
  visibility flag (1 visible, 0 not); ``flip_pairs`` lists the (left, right) indices a
  horizontal flip swaps. A point moved outside the image becomes invisible (0).

  >>> ex = {"kp": np.float32([[2, 1, 1], [5, 1, 1]])}  # left eye, right eye
  >>> Keypoints(2, flip_pairs=((0, 1),)).hflip(ex, "kp", 8)  # an 8-pixel-wide image
  >>> ex["kp"].tolist()  # mirrored (8 - x), then swapped: the left eye is still first
  [[3.0, 1.0, 1.0], [6.0, 1.0, 1.0]]
  """

  num_keypoints: int = 1
  flip_pairs: tuple[tuple[int, int], ...] = ()
  blendable: ClassVar[bool] = False

  def _points(self, ex: Example, key: str) -> np.ndarray:
    return np.asarray(ex[key], np.float32).reshape(-1, 3).copy()

  def _hide_outside(self, p: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    out = (p[:, 0] < 0) | (p[:, 0] > w) | (p[:, 1] < 0) | (p[:, 1] > h)
    p[out, 2] = 0
    return p

  def resize(self, ex, key, hw, out_hw):
    p = self._points(ex, key)
    p[:, :2] *= np.float32([out_hw[1] / hw[1], out_hw[0] / hw[0]])
    ex[key] = p

  def warp(self, ex, key, m, m_cv, out_hw):
    del m_cv
    p = self._points(ex, key)
    p[:, :2] = (p[:, :2].astype(np.float64) @ m[:2, :2].T + m[:2, 2]).astype(np.float32)
    ex[key] = self._hide_outside(p, out_hw)

  def crop(self, ex, key, x0, y0, ch, cw):
    p = self._points(ex, key)
    p[:, :2] -= np.float32([x0, y0])
    ex[key] = self._hide_outside(p, (ch, cw))

  def hflip(self, ex, key, w):
    p = self._points(ex, key)
    p[:, 0] = w - p[:, 0]
    order = np.arange(len(p))
    for a, b in self.flip_pairs:
      order[a], order[b] = b, a
    ex[key] = p[order]

  def canvas(self, ex, key, hw, keep):
    raise ValueError(f"field {key!r} (Keypoints) cannot be pasted into a multi-image canvas "
                     "(Mosaic)")

  def pad(self, ex, key, hw):
    del hw
    return {key: np.asarray(ex[key], np.float32).reshape(self.num_keypoints, 3)}

  def empty(self, key):
    return {key: np.zeros((self.num_keypoints, 3), np.float32)}

  def draw(self, image, ex, key, num_classes):
    del num_classes
    for x, y, v in ex[key]:
      if v > 0:
        cv2.circle(image, (int(x), int(y)), 2, (255, 255, 0), -1)
    return image


@dataclasses.dataclass(frozen=True)
class ImageLabel(Kind):
  """An image-level value (class id, image id) of ``dtype``; ``fill`` when absent (padding
  examples); ``show``: the preview writes it on the image."""

  dtype: str = "int32"
  fill: float = 0
  show: bool = True
  optional: ClassVar[bool] = True

  def pad(self, ex, key, hw):
    del hw
    return {key: np.dtype(self.dtype).type(ex.get(key, self.fill))}

  def empty(self, key):
    return {key: np.dtype(self.dtype).type(self.fill)}

  def draw(self, image, ex, key, num_classes):
    del num_classes
    if self.show:
      cv2.putText(image, str(ex[key].item()), (2, 10), cv2.FONT_HERSHEY_PLAIN, 0.8,
                  (255, 255, 0), 1)
    return image


Fields = tuple[tuple[str, Kind], ...]


def as_fields(fields: Mapping[str, Kind] | Iterable[tuple[str, Kind]] | None) -> Fields:
  """``fields`` as a tuple of ``(key, kind)`` pairs (hashable, for frozen transforms).

  Raises:
    TypeError: a value is not a `Kind`.
  """
  items = tuple((fields or {}).items() if isinstance(fields, Mapping) else fields or ())
  for key, kind in items:
    if not isinstance(key, str) or not isinstance(kind, Kind):
      raise TypeError(f"fields: expected (example key, Kind) pairs, got {key!r}: {kind!r}")
  return tuple((k, v) for k, v in items)


def present(fields: Fields | Mapping[str, Kind], ex: Mapping[str, Any]
            ) -> Iterable[tuple[str, Kind]]:
  """The ``(key, kind)`` pairs of ``fields`` whose key ``ex`` holds."""
  items = fields.items() if isinstance(fields, Mapping) else fields
  return ((k, kind) for k, kind in items if k in ex)


def pop_counts(batch: dict[str, Any]) -> dict[str, int]:
  """Removes the drop counters (`COUNT_PREFIX` fields, e.g. ``num_dropped_boxes``) from a
  batch or example; returns their sums by name."""
  names = [k for k in batch if k.startswith(COUNT_PREFIX)]
  return {k: int(np.sum(batch.pop(k))) for k in names}
