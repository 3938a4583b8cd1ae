"""Records of the built-in formats, validation policies and random-access sources that decode
records.

A *record* is what a reader returns: file paths plus annotations, cheap to hold for a whole
dataset. A *source* turns record ``i`` into an *example*: a dict of numpy arrays with the
decoded image, the task's fields (its ``DataSpec.decode``) and bookkeeping fields.
Examples have variable shapes; the pipeline makes them fixed-shape
(``tbgc_jax.data.batching``).

Example keys (all tasks): ``image`` uint8 [H,W,3] RGB, ``index`` int32 (record position),
``orig_hw`` int32 [2]; then the task's fields (``DataSpec.fields``: their kinds say how
augmentations and batching treat them).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from tbgc_jax.data.spec import DataSpec
from tbgc_jax.schema import IGNORE_LABEL

POLICIES = ("strict", "skip")

_log = logging.getLogger(__name__)


class DataValidationError(ValueError):
  """A record does not match what its on-disk format requires (strict policy)."""


@dataclasses.dataclass(frozen=True)
class DetRecord:
  """One detection image: path, image id, boxes xyxy in pixels and contiguous labels.

  ``image_id`` is the file's own image id as an integer (what a COCO-style export writes as
  ``image_id``); ``file_image_id`` is that id exactly as the annotation file spells it (an
  int for COCO; for TT100K the ``id`` field, or the ``imgs`` key when it has none, which may
  be a string). ``labels`` index the reader's category list; the reader's result maps them
  back to the file's category ids (``category_ids``).
  """

  image_path: str
  image_id: int
  boxes: np.ndarray  # float32 [n, 4] xyxy, pixels of the image on disk
  labels: np.ndarray  # int32 [n] in [0, num_classes)
  file_image_id: int | str | None = None  # the id as written in the file (None: unknown)


@dataclasses.dataclass(frozen=True)
class SegRecord:
  """One segmentation image and its label map (uint8 PNG, class ids, 255 = ignore)."""

  image_path: str
  label_path: str


@dataclasses.dataclass(frozen=True)
class ClsRecord:
  """One classification image and its class id."""

  image_path: str
  label: int


class Validator:
  """Applies a validation policy: ``strict`` raises, ``skip`` drops, counts and logs.

  Usage: call ``fail(...)`` once per bad record (returns normally only under ``skip``), and
  ``summary(kept)`` once after reading. Under ``skip`` every skipped record is logged (the
  first ``MAX_LOGGED`` one by one, then only counted) and kept in ``messages``.
  """

  MAX_LOGGED = 20

  def __init__(self, policy: str, dataset: str):
    if policy not in POLICIES:
      raise ValueError(f"validation policy must be one of {POLICIES}, got {policy!r}")
    self.policy = policy
    self.dataset = dataset
    self.skipped: collections.Counter[str] = collections.Counter()
    self.first: dict[str, str] = {}
    self.messages: list[str] = []

  def fail(self, file: str, field: str, expected: str, got: Any,
           record: str | None = None) -> None:
    """Reports one bad record: raises under ``strict``, records it under ``skip``.

    The message reads ``FILE: RECORD: field 'FIELD': expected EXPECTED, got GOT``.
    """
    where = f"{file}: {record}" if record else file
    got_text = repr(got)
    if len(got_text) > 200:
      got_text = got_text[:200] + "...(truncated)"
    msg = f"{where}: field {field!r}: expected {expected}, got {got_text}"
    if self.policy == "strict":
      raise DataValidationError(msg)
    reason = f"{field}: expected {expected}"
    self.skipped[reason] += 1
    self.first.setdefault(reason, msg)
    self.messages.append(msg)
    if len(self.messages) <= self.MAX_LOGGED:
      _log.warning("skipped: %s", msg)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def summary(self, kept: int) -> str:
    """Logs (once) and returns a one-paragraph summary of the skipped records."""
    if not self.skipped:
      return ""
    lines = [f"{self.dataset}: skipped {self.num_skipped} record(s), kept {kept}:"]
    for reason, n in self.skipped.most_common():
      lines.append(f"  {n} x {reason} (first: {self.first[reason]})")
    text = "\n".join(lines)
    _log.warning("%s", text)
    return text


def image_size(path: str) -> tuple[int, int]:
  """Returns (h, w) of an image file from its header (no full decode).

  Raises:
    OSError: the file is missing or not a readable image.
  """
  # PIL reads only the header here; OpenCV has no header-only API.
  from PIL import Image

  with Image.open(path) as im:
    w, h = im.size
  return h, w


# EXIF orientation is ignored: annotations (and the header size) refer to the stored pixels.
_REDUCED = {r: f | cv2.IMREAD_IGNORE_ORIENTATION for r, f in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}


def read_image(path: str, reduce: int = 1) -> np.ndarray:
  """Decodes an image file to uint8 RGB [H,W,3] with OpenCV; clear error if unreadable.

  Args:
    path: image file.
    reduce: 1, 2, 4 or 8: decode at 1/reduce size (JPEG DCT scaling: much faster).
  """
  im = _decode(path, _REDUCED[reduce])
  if im is None:
    raise DataValidationError(f"{path}: field 'image': expected a readable, complete image "
                              "file")
  return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def _decode(path: str, flags: int) -> np.ndarray | None:
  """``cv2.imdecode`` of the file's bytes; None if unreadable.

  Not ``cv2.imread``: on a truncated JPEG, imread returns the image with the missing part
  grey (128) while imdecode of the same bytes fails (OpenCV 5.0).
  """
  try:
    data = np.fromfile(path, np.uint8)
  except (OSError, ValueError):
    return None
  return cv2.imdecode(data, flags) if data.size else None


def read_label_map(path: str) -> np.ndarray:
  """Decodes a single-channel uint8 label PNG; clear error if unreadable or not 2-D uint8."""
  lab = _decode(path, cv2.IMREAD_UNCHANGED)
  if lab is None:
    raise DataValidationError(f"{path}: field 'label': expected a readable PNG label map")
  if lab.ndim != 2 or lab.dtype != np.uint8:
    raise DataValidationError(
        f"{path}: field 'label': expected a single-channel uint8 map, got shape {lab.shape} "
        f"dtype {lab.dtype}")
  return lab


def check_label_values(path: str, lab: np.ndarray, num_classes: int) -> np.ndarray | None:
  """Returns the invalid class ids of a label map (outside [0, num_classes) and not 255)."""
  # bincount over uint8 is ~20x faster than np.unique (no sort) on a 1280x720 map.
  vals = np.nonzero(np.bincount(lab.ravel(), minlength=256))[0]
  bad = vals[(vals >= num_classes) & (vals != IGNORE_LABEL)]
  return bad if bad.size else None


class RecordSource:
  """Random-access source (grain-compatible: ``__len__``/``__getitem__``) decoding records.

  Args:
    records: the records of one task (e.g. all ``DetRecord``, ``SegRecord`` or ``ClsRecord``).
    spec: the task's data spec; its ``decode`` makes the task fields.
    num_classes: number of classes (checked again at decode time for segmentation).
    min_decode_side: tasks with ``reduced_decode`` (detection): when > 0, images whose long
      side is at least 2x (4x, 8x) this are decoded at 1/2 (1/4, 1/8) size, boxes scaled to
      match (``orig_hw`` stays the size on disk). Set it to the largest long edge the
      augmentations produce.
    category_ids: detection: the file's category id of each contiguous label
      (``category_ids[label]``), for exports; default ``range(num_classes)``.
    class_names: the name of each label; default ``str`` of the category id.
    annotation_file: detection: the COCO file the records came from (evaluation scores
      against it), or None.

  Attributes:
    category_ids: tuple of ints, ``category_ids[label]`` = the file's category id.
    class_names: tuple of strings, one per label.
  """

  def __init__(self, records: Sequence[Any], spec: DataSpec, num_classes: int,
               min_decode_side: int = 0, category_ids: Sequence[int] | None = None,
               class_names: Sequence[str] | None = None, annotation_file: str | None = None):
    if not isinstance(spec, DataSpec):
      raise TypeError(f"RecordSource: expected a task's DataSpec, got {spec!r}")
    self.spec = spec  # pickled to grain's workers with the source
    self.records = list(records)
    self.task = self.spec.name
    self.num_classes = num_classes
    self.min_decode_side = int(min_decode_side)
    ids = tuple(int(c) for c in (range(num_classes) if category_ids is None else category_ids))
    names = tuple(str(n) for n in (ids if class_names is None else class_names))
    if len(ids) != num_classes or len(names) != num_classes:
      raise ValueError(f"RecordSource: expected {num_classes} category ids and names, got "
                       f"{len(ids)} ids and {len(names)} names")
    self.category_ids = ids
    self.class_names = names
    self.annotation_file = annotation_file

  @property
  def category_map(self) -> dict[int, int]:
    """Contiguous label -> the file's category id."""
    return dict(enumerate(self.category_ids))

  def _reduce(self, path: str) -> int:
    if not self.spec.reduced_decode or self.min_decode_side <= 0:
      return 1
    long_side = max(image_size(path))
    r = 8
    while r > 1 and long_side // r < self.min_decode_side:
      r //= 2
    return r

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rec = self.records[index]
    reduce = self._reduce(rec.image_path)
    image = read_image(rec.image_path, reduce)
    orig_hw = image.shape[:2] if reduce == 1 else image_size(rec.image_path)
    ex = {
        "image": image,
        "index": np.int32(index),
        "orig_hw": np.asarray(orig_hw, np.int32),
    }
    ex.update(self.spec.decode(rec, image, tuple(int(v) for v in orig_hw), self.num_classes))
    return ex

  def __repr__(self) -> str:
    return f"RecordSource(task={self.task!r}, n={len(self)})"

