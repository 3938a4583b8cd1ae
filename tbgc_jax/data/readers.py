"""Readers for the challenge's real on-disk formats, with ``strict`` or ``skip`` validation.

Detection readers return a ``DetReadResult`` (unpacks as ``(records, class_names)``, plus the
file's category ids); the segmentation and classification readers a ``RecordList`` (a list
of records with ``num_skipped`` and ``skipped``). Under ``strict`` the first bad record
raises ``DataValidationError``: ``FILE: RECORD: field 'FIELD': expected ..., got ...``. Under
``skip`` exactly that record is dropped, counted, logged and listed in ``skipped``; the
others are kept. A file that cannot be used at all (not JSON, wrong top-level layout, empty)
raises under both policies, naming the file.

Every malformed case, its strict error and its skip behaviour: ``docs/data.md``, section
"Validation of inputs". Image files: see ``tbgc_jax.data.checks`` (header, format,
completeness always; full decodes with ``deep_check=True``). Paths must stay inside the
dataset root (symlinks resolved) unless ``allow_outside_root=True``.

Each format registers a reader (``tbgc_jax.data.formats``) under its name: ``coco``,
``tt100k``, ``bdd100k``, ``cls_list`` (the classification list file) and ``tfds``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tbgc_jax.data import checks
from tbgc_jax.data.checks import MISSING, BadField
from tbgc_jax.data.formats import ReadContext, register_reader
from tbgc_jax.data.records import (
    ClsRecord,
    DataValidationError,
    DetRecord,
    SegRecord,
    Validator,
    check_label_values,
    read_label_map,
)
from tbgc_jax.data.spec import RecordSet
from tbgc_jax.schema import IGNORE_LABEL

_log = logging.getLogger(__name__)
_EPS = 1e-3  # float slack when comparing box coordinates with the image border


class DetReadResult(tuple):
  """What a detection reader returns: unpacks as ``(records, class_names)``, and also has

  Attributes:
    records: the ``DetRecord`` list (labels contiguous, ``0..num_classes-1``).
    class_names: ``class_names[label]``, the category's name.
    category_ids: ``category_ids[label]``, the annotation file's own category id: what a
      COCO-style export writes as ``category_id``.
    category_map: dict label -> the file's category id.
    num_skipped: records dropped under the ``skip`` policy.
    skipped: one message per dropped record.
  """

  def __new__(cls, records: list[DetRecord], class_names: list[str],
              category_ids: Sequence[int], num_skipped: int = 0,
              skipped: Sequence[str] = ()):
    self = super().__new__(cls, (records, class_names))
    self.category_ids = tuple(int(c) for c in category_ids)
    if len(self.category_ids) != len(class_names):
      raise ValueError(f"DetReadResult: {len(class_names)} names but "
                       f"{len(self.category_ids)} category ids")
    self.num_skipped = int(num_skipped)
    self.skipped = list(skipped)
    return self

  def __getnewargs__(self):
    return (self[0], self[1], self.category_ids, self.num_skipped, self.skipped)

  @property
  def records(self) -> list[DetRecord]:
    return self[0]

  @property
  def class_names(self) -> list[str]:
    return self[1]

  @property
  def category_map(self) -> dict[int, int]:
    return dict(enumerate(self.category_ids))


class RecordList(list):
  """A reader's records (a plain list) with ``num_skipped`` and ``skipped`` (messages)."""

  def __init__(self, records: Sequence[Any] = (), num_skipped: int = 0,
               skipped: Sequence[str] = ()):
    super().__init__(records)
    self.num_skipped = int(num_skipped)
    self.skipped = list(skipped)

  def __reduce__(self):
    return (RecordList, (list(self), self.num_skipped, self.skipped))


def _xyxy(x0: Any, y0: Any, x1: Any, y1: Any, hw: tuple[int, int] | None, field: str,
          got: Any) -> list[float]:
  """A box as 4 floats; checks finite, positive size and (given ``hw``) inside the image."""
  try:
    c = [checks.number(x) for x in (x0, y0, x1, y1)]
  except ValueError:
    raise BadField(field, "4 finite numbers (not strings, booleans or null)", got) from None
  if c[2] <= c[0] or c[3] <= c[1]:
    raise BadField(field, "a box with positive width and height", got)
  if hw is not None:
    h, w = hw
    if c[0] < -_EPS or c[1] < -_EPS or c[2] > w + _EPS or c[3] > h + _EPS:
      raise BadField(field, f"a box inside the {w}x{h} (w x h) image", got)
  return c


def _coco_box(bb: Any, hw: tuple[int, int]) -> list[float]:
  if not (isinstance(bb, list) and len(bb) == 4):
    raise BadField("bbox", "[x, y, w, h]: a list of 4 numbers", bb)
  try:
    x, y, w, h = (checks.number(c) for c in bb)
  except ValueError:
    raise BadField("bbox", "[x, y, w, h]: 4 finite numbers (not strings, booleans or null)",
                   bb) from None
  if not math.isfinite(x + w) or not math.isfinite(y + h):
    raise BadField("bbox", "[x, y, w, h] with finite x + w and y + h", bb)
  return _xyxy(x, y, x + w, y + h, hw, "bbox", bb)


def _short(x: Any, limit: int = 40) -> str:
  """``repr(x)``, cut to ``limit`` characters (record names quote values from the file)."""
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + "..."


def _ids_seen_more_than_once(values: list[Any]) -> set[Any]:
  return {k for k, n in Counter(values).items() if n > 1}


def _coco_categories(v: Validator, ann_file: str, cats: list) -> tuple[list[int], list[str]]:
  """Valid categories sorted by id: (ids, names). Duplicated ids: every entry is bad."""
  ids = []
  for c in cats:
    i = c.get("id") if isinstance(c, dict) else None
    ids.append(i if isinstance(i, int) and not isinstance(i, bool) else None)
  dup_ids = _ids_seen_more_than_once([i for i in ids if i is not None])
  good: dict[int, str] = {}
  first_name: dict[str, int] = {}
  for k, c in enumerate(cats):
    rec = f"categories[{k}]"
    try:
      c = checks.obj(c, "category")
      cid = checks.int_id(checks.field(c, "id", "an integer category id"), "id")
      if cid in dup_ids:
        raise BadField("id", "a category id no other category has", cid)
      name = c.get("name", str(cid))
      name = checks.name_str(name, "name", "a non-empty string (or no 'name' field)")
      if name in first_name:
        raise BadField("name", f"a name no other category has (category id "
                               f"{first_name[name]} has it)", name)
    except BadField as e:
      v.fail(ann_file, e.field, e.expected, e.got, rec)
      continue
    first_name[name] = cid
    good[cid] = name
  order = sorted(good)
  return order, [good[i] for i in order]


def read_coco(ann_file: str, image_dir: str, *, policy: str = "strict",
              deep_check: bool = False, skip_crowd: bool = True,
              allow_outside_root: bool = False) -> DetReadResult:
  """Reads a COCO-format detection set (how the challenge ships TT100K).

  Category ids are mapped to contiguous labels in increasing id order (ids 3, 7, 42 become
  labels 0, 1, 2); ``result.category_ids[label]`` gives the file's id back. Each record keeps
  the file's image id (``image_id`` and ``file_image_id``). Records come in the order of
  ``images``. The unit of ``skip`` is the image: an image with one bad annotation is dropped
  whole (keeping it without that box would teach that the object is background).

  Args:
    ann_file: COCO JSON with ``images`` (id, file_name, optional height and width),
      ``annotations`` (image_id, category_id, bbox [x, y, w, h], optional iscrowd) and
      ``categories`` (id, optional name).
    image_dir: folder that ``file_name`` is relative to (the dataset root for path checks).
    policy: "strict" or "skip".
    deep_check: also fully decode every image.
    skip_crowd: drop ``iscrowd=1`` annotations (standard for training).
    allow_outside_root: accept file names that resolve outside ``image_dir`` (``..``,
      absolute paths, symlinks pointing elsewhere).

  Returns:
    A ``DetReadResult``: unpacks as ``(records, class_names)``; ``.category_ids``.
  """
  v = Validator(policy, ann_file)
  data = checks.load_json(ann_file)
  checks.top_level(ann_file, data, {"images": list, "annotations": list, "categories": list})
  cat_ids, names = _coco_categories(v, ann_file, data["categories"])
  cat_to_label = {c: i for i, c in enumerate(cat_ids)}

  images = data["images"]
  img_ids = [im.get("id") if isinstance(im, dict) else None for im in images]
  img_ids = [i if isinstance(i, int) and not isinstance(i, bool) else None for i in img_ids]
  dup_ids = _ids_seen_more_than_once([i for i in img_ids if i is not None])
  known_ids = {i for i in img_ids if i is not None}

  anns_by_image: dict[int, list[tuple[int, dict]]] = {}
  orphans = []  # reported after the images, so that an image's own problem comes first
  for j, a in enumerate(data["annotations"]):
    rec = f"annotations[{j}]" + (f" (id {_short(a.get('id'))})" if isinstance(a, dict) else "")
    try:  # other fields are checked with the image (a bad one there drops the image)
      if not isinstance(a, dict):
        raise BadField("annotation", "a JSON object", a)
      if "image_id" in getattr(a, "duplicate_keys", {}):
        checks.obj(a, "annotation")
      iid = checks.int_id(checks.field(a, "image_id", "an integer image id"), "image_id")
      if iid not in known_ids:
        raise BadField("image_id", "the id of an image listed in 'images'", iid)
    except BadField as e:  # an annotation that belongs to no image: a bad record of its own
      e.record = rec
      orphans.append(e)
      continue
    anns_by_image.setdefault(iid, []).append((j, a))

  checks.require_folder(image_dir, "image folder (image_dir)")
  records, crowd, paths = [], 0, checks.Paths(image_dir, allow_outside_root)
  for k, img in enumerate(images):
    iid = img_ids[k]
    rec = f"images[{k}]" + ("" if iid is None else f" (id {iid})")
    try:
      img = checks.obj(img, "image")
      iid = checks.int_id(checks.field(img, "id", "an integer image id"), "id")
      if iid in dup_ids:
        raise BadField("id", "an image id no other image has", iid)
      path = paths.new_file(checks.field(img, "file_name", "a file name"), "file_name",
                            f"images[{k}]")
      hw = checks.image_file(path, "file_name", deep_check)
      for key, actual in (("height", hw[0]), ("width", hw[1])):
        if key in img and img[key] != actual:
          raise BadField(key, f"{actual}, the {key} of {path}", img[key])
      boxes, labels = [], []
      for j, a in anns_by_image.get(iid, []):
        try:
          checks.obj(a, "annotation")
          cid = a.get("category_id", MISSING)
          if not isinstance(cid, int) or isinstance(cid, bool) or cid not in cat_to_label:
            raise BadField("category_id", f"one of {cat_ids} (the ids in 'categories')", cid)
          xyxy = _coco_box(checks.field(a, "bbox", "[x, y, w, h]"), hw)
          is_crowd = a.get("iscrowd", 0)
          if is_crowd not in (0, 1):
            raise BadField("iscrowd", "0 or 1", is_crowd)
        except BadField as e:
          e.record = f"annotations[{j}] (id {_short(a.get('id'))}, of image id {iid})"
          raise
        if skip_crowd and is_crowd:
          crowd += 1
          continue
        boxes.append(xyxy)
        labels.append(cat_to_label[cid])
    except BadField as e:
      v.fail(ann_file, e.field, e.expected, e.got, e.record or rec)
      continue
    records.append(DetRecord(path, iid, np.asarray(boxes, np.float32).reshape(-1, 4),
                             np.asarray(labels, np.int32), iid))
  for e in orphans:
    v.fail(ann_file, e.field, e.expected, e.got, e.record)
  if crowd:
    _log.info("%s: dropped %d crowd annotation(s) (skip_crowd=True)", ann_file, crowd)
  v.summary(len(records))
  return DetReadResult(records, names, cat_ids, v.num_skipped, v.messages)


_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit accepts other scripts)


def _tt100k_image_id(key: str, img: dict) -> tuple[int, int | str]:
  """(image id as int, the id as the file writes it): the ``id`` field, else the key."""
  raw = img.get("id", key)
  name = "id" if "id" in img else "imgs key"
  expected = f"an integer image id in [0, {checks.ID_LIMIT}) (or a string of its digits)"
  if isinstance(raw, str):
    if not (_DIGITS.fullmatch(raw) and len(raw) <= 10):
      raise BadField(name, expected, raw)
    iid = int(raw)
  elif isinstance(raw, int) and not isinstance(raw, bool):
    iid = raw
  else:
    raise BadField(name, expected, raw)
  if not 0 <= iid < checks.ID_LIMIT:
    raise BadField(name, expected, raw)
  if name == "id" and not (len(key) <= 10 and _DIGITS.fullmatch(key) and int(key) == iid):
    raise BadField("id", f"the image's key {_short(key)} as an integer", raw)
  return iid, raw


def _first_folder(rel: str) -> str:
  """The first folder of a relative path ('.' components dropped); "/" if it is absolute."""
  parts = [p for p in rel.split("/") if p not in ("", ".")]
  if rel.startswith("/"):
    return "/"
  return parts[0] if parts else ""


def _tt100k_names(v: Validator, path: str, data: dict,
                  categories: Sequence[str] | None) -> tuple[list[int], list[str]]:
  """(category ids, names): ids are indices in the list used; bad or repeated names dropped."""
  if categories is not None:
    names = list(categories)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
      raise ValueError(f"read_tt100k: categories must be distinct non-empty strings, got "
                       f"{names}")
    return list(range(len(names))), names
  ids, names, first = [], [], {}
  for k, n in enumerate(data["types"]):
    try:
      n = checks.name_str(n, "types", "a non-empty category name (string)")
      if n in first:
        raise BadField("types", f"a name not listed before (types[{first[n]}] has it)", n)
    except BadField as e:
      v.fail(path, e.field, e.expected, e.got, f"types[{k}]")
      continue
    first[n] = k
    ids.append(k)
    names.append(n)
  if not names:
    raise DataValidationError(f"{path}: top level: field 'types': expected a non-empty list "
                              f"of category names, got {data['types']!r:.200}")
  return ids, names


def _tt100k_object(obj: Any, label_of: dict[str, int], n: int, hw: tuple[int, int]
                   ) -> tuple[list[float], int]:
  obj = checks.obj(obj, "object")
  cat = obj.get("category", MISSING)
  if not isinstance(cat, str) or cat not in label_of:
    raise BadField("category", f"one of the {n} known category names", cat)
  bb = checks.obj(checks.field(obj, "bbox", "{xmin, ymin, xmax, ymax}"), "bbox")
  xyxy = _xyxy(*(bb.get(k, MISSING) for k in ("xmin", "ymin", "xmax", "ymax")), hw, "bbox", bb)
  return xyxy, label_of[cat]


def read_tt100k(root: str, split: str, *, categories: Sequence[str] | None = None,
                policy: str = "strict", deep_check: bool = False,
                ann_file: str = "annotations.json",
                allow_outside_root: bool = False) -> DetReadResult:
  """Reads TT100K's original ``annotations.json`` layout.

  Layout: ``root/annotations.json`` = ``{"types": [names], "imgs": {id: {"path":
  "train/123.jpg", "id": 123, "objects": [{"category": name, "bbox": {"xmin", "ymin",
  "xmax", "ymax"}}]}}}``; image paths are relative to ``root``.

  The file names categories, not ids. A COCO-style export of these records uses
  ``category_id`` = the index of the category in the list the reader uses (``categories``
  if given, else the file's ``types``; ``result.category_ids[label]``), and ``image_id`` =
  the file's image id: the image's ``id`` field, else its ``imgs`` key, as an integer
  (``"10"`` -> 10; ``DetRecord.file_image_id`` keeps it as written). When both are given
  they must agree. Records come sorted by key (numerically for digit keys).

  Args:
    root: dataset folder (the root for path checks).
    split: keeps images whose ``path`` starts with the folder ``split``.
    categories: the class names in label order (the challenge keeps 45); default: ``types``.
    policy: "strict" or "skip".
    deep_check: also fully decode every image.
    ann_file: annotation file name inside ``root``.
    allow_outside_root: accept paths that resolve outside ``root``.

  Returns:
    A ``DetReadResult``: unpacks as ``(records, class_names)``; ``.category_ids``.
  """
  path = os.path.join(root, ann_file)
  v = Validator(policy, path)
  data = checks.load_json(path)
  checks.top_level(path, data, {"imgs": dict} if categories else {"imgs": dict, "types": list})
  cat_ids, names = _tt100k_names(v, path, data, categories)
  label_of = {n: i for i, n in enumerate(names)}
  imgs = data["imgs"]
  for key, count in getattr(imgs, "duplicate_keys", {}).items():
    for _ in range(count):  # only the last value survives parsing: every copy is unusable
      v.fail(path, "imgs key", "a key used once in 'imgs'", f"{_short(key)} ({count} times)",
             f"imgs[{_short(key)}]")
  keys = sorted((k for k in imgs if k not in getattr(imgs, "duplicate_keys", {})),
                key=lambda k: (len(k), k))
  all_ids = []
  for key in keys:
    try:
      all_ids.append(_tt100k_image_id(key, imgs[key])[0] if isinstance(imgs[key], dict)
                     else None)
    except BadField:
      pass
  dup_ids = _ids_seen_more_than_once([i for i in all_ids if i is not None])
  records, paths = [], checks.Paths(root, allow_outside_root)
  for key in keys:
    rec = f"imgs[{_short(key)}]"
    try:
      img = checks.obj(imgs[key], "image")
      rel = checks.name_str(checks.field(img, "path", "a relative image path"), "path",
                            "a non-empty relative image path")
      if "\\" in rel:  # a Windows path would silently fall out of every split
        raise BadField("path", "a path with '/' separators", rel)
      first = _first_folder(rel)
      if first != split:
        if not allow_outside_root and first in ("/", ".."):
          raise BadField("path", f"a path inside the dataset root {root} "
                                 "(allow_outside_root=False)", rel)
        continue
      iid, file_id = _tt100k_image_id(key, img)
      if iid in dup_ids:
        raise BadField("id" if "id" in img else "imgs key", "an image id no other image has",
                       file_id)
      ipath = paths.new_file(rel, "path", rec)
      objects = checks.field(img, "objects", "a list of objects")
      if not isinstance(objects, list):
        raise BadField("objects", "a list of objects", objects)
      hw = checks.image_file(ipath, "path", deep_check)
      boxes, labels = [], []
      for j, obj in enumerate(objects):
        try:
          xyxy, label = _tt100k_object(obj, label_of, len(names), hw)
        except BadField as e:
          e.record = f"{rec}.objects[{j}]"
          raise
        boxes.append(xyxy)
        labels.append(label)
    except BadField as e:
      v.fail(path, e.field, e.expected, e.got, e.record or rec)
      continue
    records.append(DetRecord(ipath, iid, np.asarray(boxes, np.float32).reshape(-1, 4),
                             np.asarray(labels, np.int32), file_id))
  v.summary(len(records))
  return DetReadResult(records, names, cat_ids, v.num_skipped, v.messages)


def _visible_files(folder: str) -> list[str]:
  """Names in ``folder`` that are not hidden (``.``-prefixed) and not folders, sorted."""
  return sorted(n for n in os.listdir(folder)
                if not n.startswith(".") and not os.path.isdir(os.path.join(folder, n)))


def read_bdd100k_seg(root: str, split: str, *, num_classes: int = 19, policy: str = "strict",
                     deep_check: bool = False, allow_outside_root: bool = False) -> RecordList:
  """Reads the BDD100K semantic segmentation layout.

  Layout: ``root/images/10k/{split}/NAME.jpg`` and ``root/labels/sem_seg/masks/{split}/
  NAME.png`` (8-bit single-channel PNG, class ids in [0, num_classes), 255 = ignore).
  Hidden files (``.``-prefixed) and sub-folders are ignored; any other file in either
  folder must pair with one in the other.

  Args:
    root: dataset folder (the root for path checks).
    split: "train" or "val" (any folder name under ``images/10k``).
    num_classes: number of classes (19 for BDD100K).
    policy: "strict" or "skip".
    deep_check: decode every image and mask (corrupt data, class ids out of range).
    allow_outside_root: accept files that are symlinks resolving outside ``root``.

  Returns:
    A ``RecordList`` of ``SegRecord``, sorted by image name.
  """
  image_rel = os.path.join("images", "10k", split)
  mask_rel = os.path.join("labels", "sem_seg", "masks", split)
  image_dir, mask_dir = os.path.join(root, image_rel), os.path.join(root, mask_rel)
  for d in (image_dir, mask_dir):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{d}: expected the BDD100K folder (images/10k/{split}, "
                              f"labels/sem_seg/masks/{split}) under {root}")
  v = Validator(policy, image_dir)
  records, stems, paths = RecordList(), set(), checks.Paths(root, allow_outside_root)
  for name in _visible_files(image_dir):
    stem, ext = os.path.splitext(name)
    ipath, mpath = os.path.join(image_dir, name), os.path.join(mask_dir, stem + ".png")
    file = ipath
    try:
      if ext != ".jpg":
        raise BadField("image", "a .jpg image (the BDD100K layout)", name)
      stems.add(stem)
      paths.inside(os.path.join(image_rel, name), "image")
      hw = checks.image_file(ipath, "image", deep_check)
      file = mpath
      paths.inside(os.path.join(mask_rel, stem + ".png"), "mask")
      mhw = checks.image_file(mpath, "mask", modes=("L",), formats=("PNG",))
      if mhw != hw:
        raise BadField("mask", f"the image size {hw} (h, w)", mhw)
      if deep_check:
        try:
          lab = read_label_map(mpath)
        except DataValidationError as e:
          raise BadField("mask", "a decodable single-channel uint8 PNG", str(e)) from e
        bad = check_label_values(mpath, lab, num_classes)
        if bad is not None:
          raise BadField("mask", f"class ids in [0, {num_classes}) or {IGNORE_LABEL}", bad.tolist())
    except BadField as e:
      v.fail(file, e.field, e.expected, e.got, f"sample {stem!r}")
      continue
    records.append(SegRecord(ipath, mpath))
  for name in _visible_files(mask_dir):
    stem, ext = os.path.splitext(name)
    if ext == ".png" and stem in stems:
      continue
    expected = (f"an image {image_rel}/{stem}.jpg for this mask" if ext == ".png" else
                "a .png label map (the BDD100K layout)")
    v.fail(os.path.join(mask_dir, name), "mask", expected,
           MISSING if ext == ".png" else name, f"sample {stem!r}")
  v.summary(len(records))
  records.num_skipped, records.skipped = v.num_skipped, v.messages
  return records


def read_cls_list(list_file: str, image_dir: str, *, num_classes: int, policy: str = "strict",
                  deep_check: bool = False, allow_outside_root: bool = False) -> RecordList:
  """Reads the challenge's classification list file: ``<image_name> <class_id>`` per line.

  Lines are split on any whitespace (spaces, tabs; names cannot contain whitespace); blank
  lines, a leading UTF-8 byte-order mark and CRLF / CR line ends are accepted. Each line is
  decoded as UTF-8 on its own (a bad line does not take the file with it). ``class_id``:
  decimal digits, in [0, num_classes). A name listed twice: the later line is the bad one.

  Args:
    list_file: the list file.
    image_dir: folder that image names are relative to (the root for path checks).
    num_classes: class ids must lie in [0, num_classes).
    policy: "strict" or "skip".
    deep_check: also fully decode every image.
    allow_outside_root: accept names that resolve outside ``image_dir``.

  Returns:
    A ``RecordList`` of ``ClsRecord`` in file order.
  """
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"{list_file}: list file not found")
  v = Validator(policy, list_file)
  with open(list_file, "rb") as f:
    raw = f.read()
  raw = raw.removeprefix(b"\xef\xbb\xbf")
  if not raw.strip():
    raise DataValidationError(f"{list_file}: whole file: expected lines '<image_name> "
                              "<class_id>', got an empty file")
  checks.require_folder(image_dir, "image folder (image_dir)")
  records, paths = RecordList(), checks.Paths(image_dir, allow_outside_root)
  expected_id = f"an integer in [0, {num_classes}) (decimal digits)"
  for lineno, bline in enumerate(raw.splitlines(), 1):
    try:
      try:
        line = bline.decode("utf-8")
      except UnicodeDecodeError:
        raise BadField("line", "UTF-8 text", bline) from None
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2:
        raise BadField("line", "'<image_name> <class_id>' (2 whitespace-separated fields)",
                       line.strip())
      name, cid = parts
      if not _DIGITS.fullmatch(cid) or len(cid) > 18 or int(cid) >= num_classes:
        raise BadField("class_id", expected_id, cid)
      path = paths.new_file(name, "image_name", f"line {lineno}")
      checks.image_file(path, "image_name", deep_check)
    except BadField as e:
      v.fail(list_file, e.field, e.expected, e.got, f"line {lineno}")
      continue
    records.append(ClsRecord(path, int(cid)))
  v.summary(len(records))
  records.num_skipped, records.skipped = v.num_skipped, v.messages
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

  def _bad(self, index: int, field: str, expected: str, got: Any) -> DataValidationError:
    return DataValidationError(f"{self.data_dir or '~/tensorflow_datasets'}: {self.name} "
                               f"{self.split}[{index}]: field {field!r}: expected {expected}, "
                               f"got {got!r}")

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """The example of record ``index``; ``DataValidationError`` for a malformed one."""
    ex = self._src[index]
    image = np.asarray(ex["image"])
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and
                                                            image.shape[-1] in (1, 3))):
      raise self._bad(index, "image", "uint8 [H, W, 3], [H, W, 1] or [H, W]",
                      f"{image.dtype} {image.shape}")
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    label = ex["label"]
    if not (np.ndim(label) == 0 and np.issubdtype(np.asarray(label).dtype, np.integer)
            and 0 <= int(label) < self.num_classes):
      raise self._bad(index, "label", f"an integer in [0, {self.num_classes})", label)
    return {
        "image": image,
        "index": np.int32(index),
        "orig_hw": np.asarray(image.shape[:2], np.int32),
        "label": np.int32(label),
    }

  def __getstate__(self):
    return {"split": self.split, "data_dir": self.data_dir, "name": self.name}

  def __setstate__(self, state):
    self.__init__(**state)


# ---------------------------------------------------------------- the format registry


def _coco(kwargs: Mapping[str, Any], ctx: ReadContext) -> RecordSet:
  result = read_coco(**kwargs, **ctx.checks)
  return RecordSet(result.records, result.category_ids, result.class_names, kwargs["ann_file"])


def _tt100k(kwargs: Mapping[str, Any], ctx: ReadContext) -> RecordSet:
  result = read_tt100k(**kwargs, **ctx.checks)
  return RecordSet(result.records, result.category_ids, result.class_names)


def _bdd100k(kwargs: Mapping[str, Any], ctx: ReadContext) -> RecordSet:
  return RecordSet(read_bdd100k_seg(**kwargs, num_classes=ctx.num_classes, **ctx.checks))


def _cls_list(kwargs: Mapping[str, Any], ctx: ReadContext) -> RecordSet:
  return RecordSet(read_cls_list(**kwargs, num_classes=ctx.num_classes, **ctx.checks))


def _tfds(kwargs: Mapping[str, Any], ctx: ReadContext) -> TfdsClsSource:
  del ctx
  return TfdsClsSource(**kwargs)


register_reader("coco", _coco)
register_reader("tt100k", _tt100k)
register_reader("bdd100k", _bdd100k)
register_reader("cls_list", _cls_list)
register_reader("tfds", _tfds)
