"""Host-side augmentations as picklable grain ``RandomMap`` transforms (OpenCV pixel work).

Each transform maps an example dict (see ``tbgc_jax.data.records``) and draws randomness
only from the injected ``np.random.Generator``. A geometric transform computes one transform
from its draw (a resize, a 3x3 affine in pixel-edge coordinates: pixel j covers [j, j+1], a
crop window, a flip) and applies it to the image and to every field of the example by the
field's kind (``tbgc_jax.data.fields``: boxes by their corners, clipped and filtered; class
maps nearest with their fill; dense maps bilinear; keypoints with their flip pairs;
image-level labels untouched). Photometric transforms leave the fields untouched.

Which keys are fields, and of which kind, is the task's: every transform has a ``fields``
attribute, set by ``build_chain`` from the task's data spec, and the functions below take it
as an argument. Fields the transform is not told of pass through unchanged.

``Mosaic`` and ``MixUp`` read extra examples from the random-access ``source`` they hold, at
indices drawn from the rng, so a sample stays a function of (seed, epoch, index).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import cv2
import grain
import numpy as np

from tbgc_jax.data.fields import Boxes, Fields, as_fields, present

Example = dict[str, Any]


def resize(ex: Example, out_hw: tuple[int, int], fields: Fields = ()) -> Example:
  """Resizes the image (bilinear, area when shrinking) to ``out_hw`` = (h, w), and
  ``fields`` by their kinds."""
  ex = dict(ex)
  h, w = ex["image"].shape[:2]
  oh, ow = max(1, int(out_hw[0])), max(1, int(out_hw[1]))
  if (oh, ow) == (h, w):
    return ex
  interp = cv2.INTER_AREA if oh * ow < h * w else cv2.INTER_LINEAR
  ex["image"] = cv2.resize(ex["image"], (ow, oh), interpolation=interp)
  for k, kind in present(fields, ex):
    kind.resize(ex, k, (h, w), (oh, ow))
  return ex


def warp_affine(ex: Example, m: np.ndarray, out_hw: tuple[int, int],
                fields: Fields = ()) -> Example:
  """Applies a 3x3 affine ``m`` (pixel-edge coordinates, source -> output) to the image
  (bilinear, black outside) and ``fields`` by their kinds."""
  ex = dict(ex)
  oh, ow = int(out_hw[0]), int(out_hw[1])
  # OpenCV maps pixel centres (pixel j at x=j); our coordinates put it at x=j+0.5.
  t = lambda d: np.array([[1, 0, d], [0, 1, d], [0, 0, 1]], np.float64)
  m_cv = (t(-0.5) @ m @ t(0.5))[:2]
  ex["image"] = cv2.warpAffine(ex["image"], m_cv, (ow, oh), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
  for k, kind in present(fields, ex):
    kind.warp(ex, k, m, m_cv, (oh, ow))
  return ex


def new_canvas(ex: Example, hw: tuple[int, int], fields: Fields = (), keep: bool = False
               ) -> dict[str, Any]:
  """A black ``hw`` canvas for multi-image transforms, with the canvas entries of the fields
  ``ex`` holds (``keep``: they start with ``ex``'s own values)."""
  canvas: dict[str, Any] = {"image": np.zeros((*hw, 3), np.uint8)}
  for k, kind in present(fields, ex):
    canvas |= kind.canvas(ex, k, hw, keep)
  return canvas


def finish_canvas(ex: Example, canvas: dict[str, Any], fields: Fields = ()) -> Example:
  """``ex`` with the canvas's image and its fields (those ``ex`` holds)."""
  out = dict(ex)
  out["image"] = canvas["image"]
  for k, kind in present(fields, ex):
    out |= kind.finish(canvas, k)
  return out


def paste(canvas: dict[str, Any], ex: Example, x0: int, y0: int,
          region: tuple[int, int, int, int], fields: Fields = ()) -> None:
  """Pastes ``ex`` with its top-left at (x0, y0) into ``canvas``, inside ``region`` only.

  ``region`` = (rx0, ry0, rx1, ry1) in canvas pixels. The fields the canvas holds are pasted
  by their kinds (maps like the image; boxes shifted, clipped to the region, degenerate ones
  dropped, appended to the canvas lists).
  """
  h, w = ex["image"].shape[:2]
  rx0, ry0, rx1, ry1 = region
  cx0, cy0 = max(x0, rx0), max(y0, ry0)
  cx1, cy1 = min(x0 + w, rx1), min(y0 + h, ry1)
  if cx1 <= cx0 or cy1 <= cy0:
    return
  canvas["image"][cy0:cy1, cx0:cx1] = ex["image"][cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
  for k, kind in present(fields, canvas):
    if k in ex:
      kind.paste(canvas, ex, k, x0, y0, (cx0, cy0, cx1, cy1))


def crop_at(ex: Example, ch: int, cw: int, rng: np.random.Generator,
            fields: Fields = ()) -> Example:
  """Crops a ``ch`` x ``cw`` window at a uniformly drawn position (sides <= the image's);
  ``fields`` follow by their kinds (boxes shifted, clipped and filtered)."""
  h, w = ex["image"].shape[:2]
  y0 = int(rng.integers(0, h - ch + 1))
  x0 = int(rng.integers(0, w - cw + 1))
  ex["image"] = np.ascontiguousarray(ex["image"][y0:y0 + ch, x0:x0 + cw])
  for k, kind in present(fields, ex):
    kind.crop(ex, k, x0, y0, ch, cw)
  return ex


@dataclasses.dataclass(frozen=True)
class Transform(grain.transforms.RandomMap):
  """Base: applies ``apply`` with probability ``p`` (one rng draw when ``p < 1``).

  ``fields``: the example's fields and their kinds (`tbgc_jax.data.fields`; a mapping or
  ``(key, kind)`` pairs, kept as pairs), set by ``build_chain`` from the task; geometric
  transforms move each by its kind.
  """

  p: float = 1.0
  fields: Fields = ()
  strong: ClassVar[bool] = False

  def __post_init__(self):
    object.__setattr__(self, "fields", as_fields(self.fields))

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    if self.p < 1.0 and rng.random() >= self.p:
      return element
    return self.apply(dict(element), rng)

  def apply(self, ex: Example, rng: np.random.Generator) -> Example:
    raise NotImplementedError


# ---------------------------------------------------------------- resizing and geometry


@dataclasses.dataclass(frozen=True)
class MultiScale(Transform):
  """Detection multi-scale resize: long edge at most ``long_edge``, short edge drawn.

  The short edge is drawn uniformly from ``short_min, short_min + step, ..., short_max``
  (``step=1``: every integer; mmdet's ``multiscale_mode='value'`` lists are larger steps).
  """

  long_edge: int = 608
  short_min: int = 480
  short_max: int = 608
  step: int = 1

  def __post_init__(self):
    super().__post_init__()
    if self.step < 1 or self.short_max < self.short_min or (
        (self.short_max - self.short_min) % self.step):
      raise ValueError(f"MultiScale: need step >= 1 and short_max = short_min + k * step, "
                       f"k >= 0, got {self}")

  @property
  def shorts(self) -> tuple[int, ...]:
    """The short edges it can draw."""
    return tuple(range(self.short_min, self.short_max + 1, self.step))

  def apply(self, ex, rng):
    short = self.short_min + self.step * int(rng.integers(0, len(self.shorts)))
    h, w = ex["image"].shape[:2]
    s = min(self.long_edge / max(h, w), short / min(h, w))
    return resize(ex, (round(h * s), round(w * s)), self.fields)


@dataclasses.dataclass(frozen=True)
class RandomResize(Transform):
  """Segmentation random resize: long edge = ``long_edge`` x U[ratio_min, ratio_max]."""

  long_edge: int = 1280
  ratio_min: float = 0.5
  ratio_max: float = 2.0

  def apply(self, ex, rng):
    r = rng.uniform(self.ratio_min, self.ratio_max)
    h, w = ex["image"].shape[:2]
    s = self.long_edge * r / max(h, w)
    return resize(ex, (round(h * s), round(w * s)), self.fields)


@dataclasses.dataclass(frozen=True)
class Resize(Transform):
  """Resizes to exactly ``size`` = (h, w) (classification: 448 x 448)."""

  size: tuple[int, int] = (448, 448)

  def apply(self, ex, rng):
    del rng
    return resize(ex, tuple(self.size), self.fields)


@dataclasses.dataclass(frozen=True)
class ResizeFit(Transform):
  """Resizes (aspect kept) to the largest size fitting in ``size`` = (h, w) (evaluation)."""

  size: tuple[int, int] = (608, 608)

  def apply(self, ex, rng):
    del rng
    h, w = ex["image"].shape[:2]
    s = min(self.size[0] / h, self.size[1] / w)
    return resize(ex, (min(self.size[0], round(h * s)), min(self.size[1], round(w * s))),
                  self.fields)


@dataclasses.dataclass(frozen=True)
class HFlip(Transform):
  """Horizontal flip with probability ``p``."""

  p: float = 0.5

  def apply(self, ex, rng):
    del rng
    w = ex["image"].shape[1]
    ex["image"] = np.ascontiguousarray(ex["image"][:, ::-1])
    for k, kind in present(self.fields, ex):
      kind.hflip(ex, k, w)
    return ex


@dataclasses.dataclass(frozen=True)
class Rotate(Transform):
  """Rotation by U[-max_deg, max_deg] about the image centre, same canvas size."""

  max_deg: float = 10.0
  p: float = 0.5

  def apply(self, ex, rng):
    angle = rng.uniform(-self.max_deg, self.max_deg)
    h, w = ex["image"].shape[:2]
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return warp_affine(ex, m, (h, w), self.fields)


@dataclasses.dataclass(frozen=True)
class RandomCrop(Transform):
  """Random crop of ``size`` = (h, w) (or the whole side when the image is smaller)."""

  size: tuple[int, int] = (512, 1024)

  def apply(self, ex, rng):
    h, w = ex["image"].shape[:2]
    return crop_at(ex, min(h, self.size[0]), min(w, self.size[1]), rng, self.fields)


@dataclasses.dataclass(frozen=True)
class RangeCrop(Transform):
  """Random crop whose height and width are each drawn from U{min_size..max_size} (capped by
  the image side), mmdet's ``RandomCrop(crop_type='absolute_range')``.

  With ``keep_boxes`` (mmdet's ``allow_negative_crop=False``), an example with boxes (fields
  of kind `Boxes`) is re-cropped (up to ``tries`` draws) until a box survives; if none does,
  the example is returned uncropped (mmdet would re-sample another image, which a map
  cannot).
  """

  min_size: int = 384
  max_size: int = 600
  keep_boxes: bool = True
  tries: int = 10

  def apply(self, ex, rng):
    h, w = ex["image"].shape[:2]
    boxes = [k for k, kind in present(self.fields, ex) if isinstance(kind, Boxes)]
    need_box = self.keep_boxes and any(len(ex[k]) for k in boxes)
    for _ in range(self.tries):
      ch = int(rng.integers(min(h, self.min_size), min(h, self.max_size) + 1))
      cw = int(rng.integers(min(w, self.min_size), min(w, self.max_size) + 1))
      out = crop_at(dict(ex), ch, cw, rng, self.fields)
      if not need_box or any(len(out[k]) for k in boxes):
        return out
    return ex


# ---------------------------------------------------------------- multi-image (strong)


@dataclasses.dataclass(frozen=True)
class Mosaic(Transform):
  """Mosaic of 4 images (this one + 3 read from ``source``) on a ``size`` canvas.

  A centre is drawn in the middle half of the canvas; each image is resized (aspect kept) to
  fit the canvas times U[scale_min, scale_max] and placed with a corner at the centre, cropped
  to its quadrant. The fields follow by their kinds: boxes are shifted, clipped to the
  quadrant, degenerate ones dropped; maps tile the same way (their fill where no image
  lands).
  """

  source: Any = None
  size: tuple[int, int] = (608, 608)
  scale_min: float = 0.5
  scale_max: float = 1.0
  strong: ClassVar[bool] = True

  def apply(self, ex, rng):
    if self.source is None:
      raise ValueError("Mosaic needs a source to read 3 more examples from")
    H, W = self.size
    cx = int(rng.uniform(0.25, 0.75) * W)
    cy = int(rng.uniform(0.25, 0.75) * H)
    others = [self.source[int(i)] for i in rng.integers(0, len(self.source), size=3)]
    canvas = new_canvas(ex, (H, W), self.fields)
    regions = [(0, 0, cx, cy), (cx, 0, W, cy), (0, cy, cx, H), (cx, cy, W, H)]
    for q, item in enumerate([ex, *others]):
      h, w = item["image"].shape[:2]
      s = min(H / h, W / w) * rng.uniform(self.scale_min, self.scale_max)
      item = resize(item, (max(1, round(h * s)), max(1, round(w * s))), self.fields)
      h, w = item["image"].shape[:2]
      x0 = cx - w if q in (0, 2) else cx
      y0 = cy - h if q in (0, 1) else cy
      paste(canvas, item, x0, y0, regions[q], self.fields)
    return finish_canvas(ex, canvas, self.fields)


@dataclasses.dataclass(frozen=True)
class MixUp(Transform):
  """Blends with an example read from ``source`` (resized to fit, top-left aligned).

  The blend weight is ``ratio`` (YOLOX uses 0.5); boxes of both images are kept, image-level
  labels are the first image's. Maps and keypoints have no meaningful blend: examples of a
  task with a field of a kind that is not ``blendable`` pass through unchanged.
  """

  source: Any = None
  ratio: float = 0.5
  p: float = 0.5
  # Not "strong": the paper's Table 1 pairs it with Mosaic in one branch (as YOLOX does).
  strong: ClassVar[bool] = False

  def apply(self, ex, rng):
    if self.source is None:
      raise ValueError("MixUp needs a source to read the second example from")
    j = int(rng.integers(0, len(self.source)))
    if not all(kind.blendable for _, kind in self.fields):
      return ex
    other = self.source[j]
    h, w = ex["image"].shape[:2]
    oh, ow = other["image"].shape[:2]
    s = min(h / oh, w / ow)
    other = resize(other, (min(h, max(1, round(oh * s))), min(w, max(1, round(ow * s)))),
                   self.fields)
    canvas = new_canvas(ex, (h, w), self.fields, keep=True)
    paste(canvas, other, 0, 0, (0, 0, w, h), self.fields)
    out = finish_canvas(ex, canvas, self.fields)
    out["image"] = cv2.addWeighted(ex["image"], 1 - self.ratio, canvas["image"], self.ratio, 0)
    return out


# ---------------------------------------------------------------- photometric


def _blend(a: np.ndarray, b: np.ndarray, factor: float) -> np.ndarray:
  """PIL ImageEnhance semantics: a + factor * (b - a), clipped to uint8."""
  return np.clip(a.astype(np.float32) + factor * (b.astype(np.float32) - a), 0, 255).astype(
      np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


@dataclasses.dataclass(frozen=True)
class ColorDistort(Transform):
  """Photometric distortion (mmseg ``PhotoMetricDistortion`` ranges), each part p=0.5."""

  brightness: float = 32.0
  contrast: tuple[float, float] = (0.5, 1.5)
  saturation: tuple[float, float] = (0.5, 1.5)
  hue: float = 18.0

  def apply(self, ex, rng):
    img = ex["image"].astype(np.float32)
    if rng.random() < 0.5:
      img += rng.uniform(-self.brightness, self.brightness)
    if rng.random() < 0.5:
      img *= rng.uniform(*self.contrast)
    img = np.clip(img, 0, 255).astype(np.uint8)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    sat, hue = rng.uniform(*self.saturation), rng.uniform(-self.hue, self.hue)
    if do_sat or do_hue:
      hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
      if do_sat:
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
      if do_hue:
        hsv[..., 0] = (hsv[..., 0] + hue) % 180
      img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    ex["image"] = img
    return ex


@dataclasses.dataclass(frozen=True)
class GaussianNoise(Transform):
  """Adds N(0, sigma^2) noise with sigma ~ U[0, max_std] (pixel units)."""

  max_std: float = 10.0
  p: float = 0.5

  def apply(self, ex, rng):
    sigma = rng.uniform(0, self.max_std)
    img = ex["image"].astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * sigma
    ex["image"] = np.clip(img, 0, 255).astype(np.uint8)
    return ex


@dataclasses.dataclass(frozen=True)
class RandomErase(Transform):
  """Random erasing (Zhong et al. 2017; torchvision defaults), filled with uniform noise."""

  p: float = 0.5
  scale: tuple[float, float] = (0.02, 0.33)
  ratio: tuple[float, float] = (0.3, 3.3)

  def apply(self, ex, rng):
    h, w = ex["image"].shape[:2]
    for _ in range(10):
      area = h * w * rng.uniform(*self.scale)
      r = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
      eh, ew = round(math.sqrt(area * r)), round(math.sqrt(area / r))
      if 0 < eh < h and 0 < ew < w:
        y0, x0 = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
        img = ex["image"].copy()
        img[y0:y0 + eh, x0:x0 + ew] = rng.integers(0, 256, (eh, ew, 3), dtype=np.uint8)
        ex["image"] = img
        return ex
    return ex


# ImageNet AutoAugment policy (Cubuk et al. 2019, as tabulated by torchvision's
# AutoAugmentPolicy.IMAGENET): 25 sub-policies of two (op, probability, magnitude bin).
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
_NUM_BINS = 10
_GEOMETRIC = ("Rotate", "ShearX", "ShearY")


def _magnitude(op: str, bin_: int) -> float:
  """Magnitude of bin ``bin_`` (torchvision's 10-bin tables)."""
  table = {
      "ShearX": np.linspace(0.0, 0.3, _NUM_BINS), "ShearY": np.linspace(0.0, 0.3, _NUM_BINS),
      "Rotate": np.linspace(0.0, 30.0, _NUM_BINS),
      "Color": np.linspace(0.0, 0.9, _NUM_BINS), "Contrast": np.linspace(0.0, 0.9, _NUM_BINS),
      "Sharpness": np.linspace(0.0, 0.9, _NUM_BINS),
      "Brightness": np.linspace(0.0, 0.9, _NUM_BINS),
      "Posterize": 8 - np.round(np.arange(_NUM_BINS) / ((_NUM_BINS - 1) / 4)),
      "Solarize": np.linspace(255.0, 0.0, _NUM_BINS),
  }
  return float(table[op][bin_]) if op in table else 0.0


def _apply_op(ex: Example, op: str, mag: float, sign: float, fields: Fields = ()) -> Example:
  img = ex["image"]
  if op in _GEOMETRIC:
    h, w = img.shape[:2]
    m = np.eye(3)
    if op == "Rotate":
      m[:2] = cv2.getRotationMatrix2D((w / 2, h / 2), sign * mag, 1.0)
    elif op == "ShearX":
      m[0, 1] = sign * mag
    else:
      m[1, 0] = sign * mag
    return warp_affine(ex, m, (h, w), fields)
  if op == "Posterize":
    keep = 0xFF & ~((1 << (8 - int(mag))) - 1)
    img = img & np.uint8(keep)
  elif op == "Solarize":
    img = np.where(img >= mag, 255 - img, img).astype(np.uint8)
  elif op == "AutoContrast":
    lo = img.reshape(-1, 3).min(0).astype(np.float32)
    hi = img.reshape(-1, 3).max(0).astype(np.float32)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1), 1.0)
    lo = np.where(hi > lo, lo, 0)
    img = np.clip((img - lo) * scale, 0, 255).astype(np.uint8)
  elif op == "Equalize":
    img = np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)], -1)
  elif op == "Invert":
    img = 255 - img
  elif op == "Color":
    img = _blend(_gray(img), img, 1 + sign * mag)
  elif op == "Contrast":
    mean = float(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean())
    img = _blend(np.full_like(img, round(mean)), img, 1 + sign * mag)
  elif op == "Brightness":
    img = _blend(np.zeros_like(img), img, 1 + sign * mag)
  elif op == "Sharpness":
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
    img = _blend(cv2.filter2D(img, -1, k), img, 1 + sign * mag)
  else:
    raise ValueError(f"unknown AutoAugment op {op!r}")
  ex["image"] = img
  return ex


@dataclasses.dataclass(frozen=True)
class ImageNetAutoAugment(Transform):
  """AutoAugment with the published ImageNet policy (one random sub-policy per example).

  Mostly colour operations (Posterize, Solarize, Equalize, Invert, Color, ...). Geometric ops
  (Rotate, ShearX/Y) move the fields by their kinds (boxes via their corners, class maps
  nearest with their fill); ``photometric_only=True`` skips them instead.
  """

  photometric_only: bool = False
  strong: ClassVar[bool] = True

  def apply(self, ex, rng):
    sub = IMAGENET_POLICY[int(rng.integers(len(IMAGENET_POLICY)))]
    for op, prob, bin_ in sub:
      go, sign = rng.random() < prob, (1.0 if rng.random() < 0.5 else -1.0)
      if not go or (self.photometric_only and op in _GEOMETRIC):
        continue
      ex = _apply_op(ex, op, _magnitude(op, bin_ or 0), sign, self.fields)
    return ex


@dataclasses.dataclass(frozen=True)
class DetAutoAugment(Transform):
  """Detection AutoAugment of the InternImage DINO configs: one of two sub-policies, uniformly.

  Sub-policy 0: multi-scale resize (short edge from ``short_min..short_max`` by ``step``,
  long edge at most ``long_edge``). Sub-policy 1: resize (short edge from
  ``crop_short_min..crop_short_max`` by ``crop_short_step``, long edge at most
  ``crop_long_edge``), a ``RangeCrop(crop_min, crop_max)`` keeping a box, then the
  sub-policy 0 resize. Only axis-aligned geometry: boxes stay tight.

  The defaults are the InternImage numbers fitted to a 608 long edge (see docs/data.md):
  short edges 480..608 by 32 (their 480..800 list cut at 608), pre-crop short edges 400, 500,
  600 and crop sides in [384, 600] as published.
  """

  long_edge: int = 608
  short_min: int = 480
  short_max: int = 608
  step: int = 32
  crop_long_edge: int = 4200
  crop_short_min: int = 400
  crop_short_max: int = 600
  crop_short_step: int = 100
  crop_min: int = 384
  crop_max: int = 600
  strong: ClassVar[bool] = True

  @property
  def policies(self) -> tuple[tuple[Transform, ...], ...]:
    """The two sub-policies, each a sequence of transforms applied in order."""
    final = MultiScale(long_edge=self.long_edge, short_min=self.short_min,
                       short_max=self.short_max, step=self.step, fields=self.fields)
    pre = MultiScale(long_edge=self.crop_long_edge, short_min=self.crop_short_min,
                     short_max=self.crop_short_max, step=self.crop_short_step,
                     fields=self.fields)
    crop = RangeCrop(min_size=self.crop_min, max_size=self.crop_max, fields=self.fields)
    return (final,), (pre, crop, final)

  def apply_policy(self, ex: Example, k: int, rng: np.random.Generator) -> Example:
    """Applies sub-policy ``k``."""
    for t in self.policies[k]:
      ex = t.random_map(ex, rng)
    return ex

  def apply(self, ex, rng):
    return self.apply_policy(ex, int(rng.integers(2)), rng)


REGISTRY: dict[str, type[Transform]] = {
    "multiscale": MultiScale,
    "random_resize": RandomResize,
    "resize": Resize,
    "resize_fit": ResizeFit,
    "hflip": HFlip,
    "rotate": Rotate,
    "random_crop": RandomCrop,
    "mosaic": Mosaic,
    "mixup": MixUp,
    "range_crop": RangeCrop,
    "autoaugment": DetAutoAugment,
    "imagenet_autoaugment": ImageNetAutoAugment,
    "color_distort": ColorDistort,
    "noise": GaussianNoise,
    "random_erase": RandomErase,
}
