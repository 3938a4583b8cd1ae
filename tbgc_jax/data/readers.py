"""Readers for the challenge's real on-disk formats, with ``strict`` or ``skip`` validation.

Every reader returns a list of records (``tbgc_jax.data.records``). Under ``strict`` the
first problem raises ``DataValidationError`` naming the file, the field and what was
expected; under ``skip`` the record is dropped, counted, and one summary is logged.

Checks done while reading: missing or unreadable images (header decode), boxes malformed,
zero-area or outside the image, unknown category ids, label map size different from the
image size; with ``deep_check=True`` also full decodes (corrupt pixel data) and label-map
class ids outside [0, num_classes) other than 255 (these are also checked when an example
is decoded, always strictly).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tbgc_jax.data.records import (
    ClsRecord,
    DataValidationError,
    DetRecord,
    SegRecord,
    Validator,
    check_label_values,
    check_path,
    read_image,
    read_label_map,
)

_EPS = 1e-3  # float slack when comparing box coordinates with the image border


def _load_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataValidationError(f"{path}: expected valid JSON ({e})") from e


def _deep_image_ok(v: Validator, path: str, field: str) -> bool:
  try:
    read_image(path)
    return True
  except DataValidationError:
    v.fail(path, field, "a decodable image (pixel data)", "decode failure")
    return False


def _check_box(v: Validator, ref: str, field: str, xyxy: Any, hw: tuple[int, int]) -> bool:
  """Validates one xyxy box against the image size; reports via ``v``; True if fine."""
  try:
    x0, y0, x1, y1 = (float(c) for c in xyxy)
  except (TypeError, ValueError):
    v.fail(ref, field, "4 numbers", xyxy)
    return False
  if not all(math.isfinite(c) for c in (x0, y0, x1, y1)):
    v.fail(ref, field, "finite coordinates", xyxy)
    return False
  if x1 <= x0 or y1 <= y0:
    v.fail(ref, field, "a box with positive width and height", xyxy)
    return False
  h, w = hw
  if x0 < -_EPS or y0 < -_EPS or x1 > w + _EPS or y1 > h + _EPS:
    v.fail(ref, field, f"a box inside the {w}x{h} (w x h) image", xyxy)
    return False
  return True


def sorted_categories(categories: Sequence[dict]) -> list[dict]:
  """COCO categories in label order: label ``i`` is the ``i``-th category by increasing id."""
  return sorted(categories, key=lambda c: c["id"])


def coco_category_ids(ann_file: str) -> list[int]:
  """Contiguous label -> the file's own ``category_id`` (the mapping `read_coco` uses)."""
  data = _load_json(ann_file)
  if not isinstance(data.get("categories"), list):
    raise DataValidationError(f"{ann_file}: field 'categories': expected a list, got "
                              f"{type(data.get('categories')).__name__}")
  return [int(c["id"]) for c in sorted_categories(data["categories"])]


def read_coco(ann_file: str, image_dir: str, *, policy: str = "strict",
              deep_check: bool = False, skip_crowd: bool = True) -> tuple[list[DetRecord],
                                                                        list[str]]:
  """Reads a COCO-format detection set (how the challenge ships TT100K).

  Category ids are mapped to contiguous labels in increasing id order (`coco_category_ids`
  gives the way back, for exports).

  Args:
    ann_file: COCO JSON with ``images`` (id, file_name, height, width), ``annotations``
      (image_id, category_id, bbox [x, y, w, h], optional iscrowd) and ``categories``.
    image_dir: folder that ``file_name`` is relative to.
    policy: "strict" or "skip".
    deep_check: also fully decode every image.
    skip_crowd: drop ``iscrowd=1`` annotations (standard for training; counted in the log).

  Returns:
    (records, class_names).
  """
  v = Validator(policy, ann_file)
  data = _load_json(ann_file)
  for key in ("images", "annotations", "categories"):
    if not isinstance(data.get(key), list):
      raise DataValidationError(f"{ann_file}: field {key!r}: expected a list, got "
                                f"{type(data.get(key)).__name__}")
  cats = sorted_categories(data["categories"])
  cat_to_label = {c["id"]: i for i, c in enumerate(cats)}
  names = [str(c.get("name", c["id"])) for c in cats]
  anns_by_image: dict[Any, list[dict]] = {}
  for a in data["annotations"]:
    anns_by_image.setdefault(a.get("image_id"), []).append(a)
  records = []
  for img in data["images"]:
    ref = f"{ann_file} (image id {img.get('id')})"
    path = os.path.join(image_dir, str(img.get("file_name")))
    hw = check_path(v, path, ref, "file_name")
    if hw is None or (deep_check and not _deep_image_ok(v, path, "file_name")):
      continue
    if (img.get("height"), img.get("width")) != (None, None) and (
        img.get("height"), img.get("width")) != hw:
      v.fail(ref, "height/width", f"the size of {path}: {hw}",
             (img.get("height"), img.get("width")))
      continue
    boxes, labels, ok = [], [], True
    for a in anns_by_image.get(img.get("id"), []):
      aref = f"{ann_file} (annotation id {a.get('id')})"
      if a.get("category_id") not in cat_to_label:
        v.fail(aref, "category_id", f"one of {sorted(cat_to_label)}", a.get("category_id"))
        ok = False
        break
      bb = a.get("bbox")
      if not (isinstance(bb, (list, tuple)) and len(bb) == 4):
        v.fail(aref, "bbox", "[x, y, w, h]", bb)
        ok = False
        break
      try:
        xyxy = [bb[0], bb[1], bb[0] + bb[2], bb[1] + bb[3]]
      except TypeError:
        v.fail(aref, "bbox", "[x, y, w, h] numbers", bb)
        ok = False
        break
      if not _check_box(v, aref, "bbox", xyxy, hw):
        ok = False
        break
      if skip_crowd and a.get("iscrowd", 0):
        continue
      boxes.append(xyxy)
      labels.append(cat_to_label[a["category_id"]])
    if ok:
      records.append(DetRecord(path, int(img["id"]), np.asarray(boxes, np.float32).reshape(-1, 4),
                               np.asarray(labels, np.int32)))
  v.summary(len(records))
  return records, names


def read_tt100k(root: str, split: str, *, categories: Sequence[str] | None = None,
                policy: str = "strict", deep_check: bool = False,
                ann_file: str = "annotations.json") -> tuple[list[DetRecord], list[str]]:
  """Reads TT100K's original ``annotations.json`` layout.

  Layout: ``root/annotations.json`` = ``{"types": [names], "imgs": {id: {"path":
  "train/123.jpg", "id": 123, "objects": [{"category": name, "bbox": {"xmin", "ymin",
  "xmax", "ymax"}}]}}}``; image paths are relative to ``root``.

  Args:
    root: dataset folder.
    split: keeps images whose ``path`` starts with ``split + "/"``.
    categories: the class names in label order (the challenge keeps 45); default: ``types``.
    policy: "strict" or "skip".
    deep_check: also fully decode every image.
    ann_file: annotation file name inside ``root``.

  Returns:
    (records, class_names).
  """
  path = os.path.join(root, ann_file)
  v = Validator(policy, path)
  data = _load_json(path)
  if not isinstance(data.get("imgs"), dict):
    raise DataValidationError(f"{path}: field 'imgs': expected an object keyed by image id")
  names = list(categories) if categories is not None else list(data.get("types", []))
  if not names:
    raise DataValidationError(f"{path}: field 'types': expected a non-empty list of names")
  label_of = {n: i for i, n in enumerate(names)}
  records = []
  for key in sorted(data["imgs"], key=lambda k: (len(str(k)), str(k))):
    img = data["imgs"][key]
    rel = str(img.get("path", ""))
    if not rel.startswith(split + "/"):
      continue
    ref = f"{path} (imgs[{key!r}])"
    ipath = os.path.join(root, rel)
    hw = check_path(v, ipath, ref, "path")
    if hw is None or (deep_check and not _deep_image_ok(v, ipath, "path")):
      continue
    boxes, labels, ok = [], [], True
    for j, obj in enumerate(img.get("objects", [])):
      oref = f"{ref} objects[{j}]"
      if obj.get("category") not in label_of:
        v.fail(oref, "category", f"one of the {len(names)} known categories", obj.get("category"))
        ok = False
        break
      bb = obj.get("bbox")
      if not isinstance(bb, dict):
        v.fail(oref, "bbox", "{xmin, ymin, xmax, ymax}", bb)
        ok = False
        break
      xyxy = [bb.get("xmin"), bb.get("ymin"), bb.get("xmax"), bb.get("ymax")]
      if not _check_box(v, oref, "bbox", xyxy, hw):
        ok = False
        break
      boxes.append(xyxy)
      labels.append(label_of[obj["category"]])
    if ok:
      image_id = int(img.get("id", key))
      records.append(DetRecord(ipath, image_id, np.asarray(boxes, np.float32).reshape(-1, 4),
                               np.asarray(labels, np.int32)))
  v.summary(len(records))
  return records, names


def read_bdd100k_seg(root: str, split: str, *, num_classes: int = 19, policy: str = "strict",
                     deep_check: bool = False) -> list[SegRecord]:
  """Reads the BDD100K semantic segmentation layout.

  Layout: ``root/images/10k/{split}/NAME.jpg`` and ``root/labels/sem_seg/masks/{split}/
  NAME.png`` (uint8, class ids in [0, num_classes), 255 = ignore).

  Args:
    root: dataset folder.
    split: "train" or "val" (any folder name under ``images/10k``).
    num_classes: number of classes (19 for BDD100K).
    policy: "strict" or "skip".
    deep_check: decode every image and mask (corrupt data, class ids out of range).

  Returns:
    The records, sorted by image name.
  """
  image_dir = os.path.join(root, "images", "10k", split)
  mask_dir = os.path.join(root, "labels", "sem_seg", "masks", split)
  for d in (image_dir, mask_dir):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{d}: expected the BDD100K folder (images/10k/{split}, "
                              f"labels/sem_seg/masks/{split}) under {root}")
  v = Validator(policy, image_dir)
  records = []
  for ipath in sorted(glob.glob(os.path.join(image_dir, "*.jpg"))):
    stem = os.path.splitext(os.path.basename(ipath))[0]
    mpath = os.path.join(mask_dir, stem + ".png")
    hw = check_path(v, ipath, ipath, "image")
    if hw is None:
      continue
    mhw = check_path(v, mpath, ipath, "mask")
    if mhw is None:
      continue
    if mhw != hw:
      v.fail(mpath, "mask", f"the image size {hw} (h, w)", mhw)
      continue
    if deep_check:
      if not _deep_image_ok(v, ipath, "image"):
        continue
      try:
        lab = read_label_map(mpath)
      except DataValidationError as e:
        v.fail(mpath, "mask", "a single-channel uint8 PNG", str(e))
        continue
      bad = check_label_values(mpath, lab, num_classes)
      if bad is not None:
        v.fail(mpath, "mask", f"class ids in [0, {num_classes}) or 255", bad.tolist())
        continue
    records.append(SegRecord(ipath, mpath))
  v.summary(len(records))
  return records


def read_cls_list(list_file: str, image_dir: str, *, num_classes: int, policy: str = "strict",
                  deep_check: bool = False) -> list[ClsRecord]:
  """Reads the challenge's classification list file: ``<image_name> <class_id>`` per line.

  Args:
    list_file: the list file; blank lines are ignored.
    image_dir: folder that image names are relative to.
    num_classes: class ids must lie in [0, num_classes).
    policy: "strict" or "skip".
    deep_check: also fully decode every image.

  Returns:
    The records in file order.
  """
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"{list_file}: list file not found")
  v = Validator(policy, list_file)
  records = []
  with open(list_file) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      ref = f"{list_file}:{lineno}"
      parts = line.split()
      if len(parts) != 2:
        v.fail(ref, "line", "'<image_name> <class_id>'", line.rstrip("\n"))
        continue
      name, cid = parts
      try:
        label = int(cid)
      except ValueError:
        v.fail(ref, "class_id", "an integer", cid)
        continue
      if not 0 <= label < num_classes:
        v.fail(ref, "class_id", f"an integer in [0, {num_classes})", label)
        continue
      path = os.path.join(image_dir, name)
      if check_path(v, path, ref, "image_name") is None:
        continue
      if deep_check and not _deep_image_ok(v, path, "image_name"):
        continue
      records.append(ClsRecord(path, label))
  v.summary(len(records))
  return records


class TfdsClsSource:
  """Stanford Cars through TFDS ``cars196``, prepared locally (never downloads).

  The dataset must already be prepared in ``data_dir`` in a random-access file format
  (``tfds build cars196 --file_format=array_record --data_dir DIR``).

  Args:
    split: TFDS split ("train" or "test").
    data_dir: the TFDS data folder (default: TFDS's own default, ``~/tensorflow_datasets``).
    name: TFDS dataset name.
  """

  task = "cls"

  def __init__(self, split: str, data_dir: str | None = None, name: str = "cars196"):
    import tensorflow_datasets as tfds

    self.split, self.data_dir, self.name = split, data_dir, name
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"{builder.data_dir}: TFDS dataset {name!r} is not prepared there; this reader never "
          f"downloads. Prepare it first: tfds build {name} --file_format=array_record "
          f"--data_dir {data_dir or '~/tensorflow_datasets'}")
    try:
      self._src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as e:
      raise DataValidationError(
          f"{builder.data_dir}: field 'file_format': expected array_record or parquet "
          f"(random access), got a dataset prepared as tfrecord ({e})") from e
    self.num_classes = builder.info.features["label"].num_classes

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    ex = self._src[index]
    image = np.asarray(ex["image"], np.uint8)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    return {
        "image": image,
        "index": np.int32(index),
        "orig_hw": np.asarray(image.shape[:2], np.int32),
        "label": np.int32(ex["label"]),
    }

  def __getstate__(self):
    return {"split": self.split, "data_dir": self.data_dir, "name": self.name}

  def __setstate__(self, state):
    self.__init__(**state)
