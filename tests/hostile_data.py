"""A corpus of malformed datasets in the real on-disk formats, for the readers' validation.

Each ``Case`` writes one small dataset (8x8 images) under a folder and returns a function
``read(policy)`` that runs the real reader on it. Every dataset holds good records and (for
record-level cases) bad ones; the case states what ``skip`` keeps (record keys: the image id
for detection, the image's file name otherwise), how many records it drops, and the pieces
the ``strict`` error must name: file, record, field, expected, got. ``error=None`` marks an
input that is accepted with a documented normalisation (a BOM, CRLF line ends, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from tbgc_jax.data import readers


@dataclasses.dataclass(frozen=True)
class Error:
  """Pieces of the strict error: ``FILE: RECORD: field 'FIELD': expected ..., got ...``.

  ``file`` is relative to the case folder; ``expected`` and ``got`` are substrings.
  ``field`` None: a file-level error (``record`` is "whole file" or "top level").
  """

  file: str
  record: str
  field: str | None
  expected: str
  got: str


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  build: Callable[[Path], Callable[[str], Any]]
  kept: tuple = ()
  skipped: int = 0
  error: Error | None = None
  file_level: bool = False


def image(path: Path, fmt: str = ".jpg", hw: tuple[int, int] = (8, 8), seed: int = 0) -> Path:
  """Writes a small noisy image (OpenCV encoder) and returns its path."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  ok, buf = cv2.imencode(fmt, rng.integers(0, 256, (*hw, 3), np.uint8))
  assert ok
  path.write_bytes(buf.tobytes())
  return path


def truncate(path: Path, keep: float = 0.6) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def record_key(r: Any) -> Any:
  return r.image_id if isinstance(r, readers.DetRecord) else os.path.basename(r.image_path)


# --------------------------------------------------------------------------- COCO

COCO_IDS = (11, 13, 17)  # 17 is the image the record-level cases spoil


def coco(mutate: Callable[[dict, Path], Any] | None = None, raw: Callable[[str], str] | None = None,
         write: Callable[[Path], None] | None = None, **kw) -> Callable[[Path], Callable]:
  """COCO set: images 11 (a.jpg), 13 (b.jpg), 17 (c.jpg), categories 3, 7, 42."""

  def build(root: Path) -> Callable[[str], Any]:
    d = root / "images"
    for k, name in enumerate("abc"):
      image(d / f"{name}.jpg", seed=k)
    data = {
        "images": [{"id": i, "file_name": f"{n}.jpg", "height": 8, "width": 8}
                   for i, n in zip(COCO_IDS, "abc", strict=True)],
        "annotations": [{"id": 1, "image_id": 11, "category_id": 3, "bbox": [1, 1, 4, 4]},
                        {"id": 2, "image_id": 13, "category_id": 42, "bbox": [2, 2, 5, 5]},
                        {"id": 3, "image_id": 17, "category_id": 7, "bbox": [0, 0, 8, 8]}],
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"},
                       {"id": 42, "name": "forty-two"}],
    }
    if mutate:
      mutate(data, root)
    text = json.dumps(data)
    ann = root / "instances.json"
    ann.write_text(raw(text) if raw else text)
    if write:
      write(ann)
    return lambda policy: readers.read_coco(str(ann), str(d), policy=policy, **kw)

  return build


def _ann(i: int) -> Callable[[dict], dict]:
  return lambda data: data["annotations"][i]


def bad_bbox(value: Any) -> Callable[[dict, Path], None]:
  def mutate(data, root):
    data["annotations"][2]["bbox"] = value
  return mutate


def set_(getter: Callable[[dict], dict], key: str, value: Any) -> Callable[[dict, Path], None]:
  def mutate(data, root):
    getter(data)[key] = value
  return mutate


def outside_file(root: Path) -> str:
  """An image outside the dataset root (in a sibling folder of the case folder)."""
  return str(image(root.parent / f"{root.name}-outside" / "x.jpg"))


def coco_path(kind: str) -> Callable[[dict, Path], None]:
  def mutate(data, root):
    target = outside_file(root)
    img = data["images"][2]
    if kind == "dotdot":
      img["file_name"] = os.path.relpath(target, root / "images")
    elif kind == "absolute":
      img["file_name"] = target
    else:  # symlink
      os.remove(root / "images" / "c.jpg")
      os.symlink(target, root / "images" / "c.jpg")
  return mutate


def _symlink_inside(data, root):
  """images/c.jpg -> images/real/c.jpg: a symlink that stays inside the root."""
  (root / "images" / "real").mkdir()
  os.rename(root / "images" / "c.jpg", root / "images" / "real" / "c.jpg")
  os.symlink(root / "images" / "real" / "c.jpg", root / "images" / "c.jpg")


def _img_ann(e_field, expected, got, ann_index=2, ann_id=3):
  return Error("instances.json", f"annotations[{ann_index}] (id {ann_id}, of image id 17)",
               e_field, expected, got)


def _img(field, expected, got):
  return Error("instances.json", "images[2] (id 17)", field, expected, got)


def _whole(expected, got, file="instances.json", record="whole file", field=None):
  return Error(file, record, field, expected, got)


KEEP2 = (11, 13)
KEEP3 = COCO_IDS
FOUR_NUMBERS = "4 finite numbers"

COCO_CASES = [
    Case("coco_bbox_strings", coco(bad_bbox(["0", "0", "8", "8"])), KEEP2, 1,
         _img_ann("bbox", FOUR_NUMBERS, "['0', '0', '8', '8']")),
    Case("coco_bbox_nan", coco(bad_bbox([0, float("nan"), 8, 8])), KEEP2, 1,
         _img_ann("bbox", FOUR_NUMBERS, "nan")),
    Case("coco_bbox_inf", coco(raw=lambda t: t.replace("[0, 0, 8, 8]", "[0, 0, 1e400, 8]")),
         KEEP2, 1, _img_ann("bbox", FOUR_NUMBERS, "inf")),
    Case("coco_bbox_negative_size", coco(bad_bbox([4, 4, -2, 3])), KEEP2, 1,
         _img_ann("bbox", "positive width and height", "[4, 4, -2, 3]")),
    Case("coco_bbox_negative_origin", coco(bad_bbox([-3, 1, 4, 4])), KEEP2, 1,
         _img_ann("bbox", "inside the 8x8", "[-3, 1, 4, 4]")),
    Case("coco_bbox_bool", coco(bad_bbox([True, 0, 4, 4])), KEEP2, 1,
         _img_ann("bbox", FOUR_NUMBERS, "[True, 0, 4, 4]")),
    Case("coco_bbox_null", coco(bad_bbox([None, 0, 4, 4])), KEEP2, 1,
         _img_ann("bbox", FOUR_NUMBERS, "[None, 0, 4, 4]")),
    Case("coco_bbox_nested", coco(bad_bbox([[0, 0], [4, 4]])), KEEP2, 1,
         _img_ann("bbox", "[x, y, w, h]: a list of 4 numbers", "[[0, 0], [4, 4]]")),
    Case("coco_bbox_length5", coco(bad_bbox([0, 0, 4, 4, 1])), KEEP2, 1,
         _img_ann("bbox", "a list of 4 numbers", "[0, 0, 4, 4, 1]")),
    Case("coco_bbox_object", coco(bad_bbox({"x": 0})), KEEP2, 1,
         _img_ann("bbox", "a list of 4 numbers", "{'x': 0}")),
    Case("coco_bbox_missing", coco(lambda d, r: d["annotations"][2].pop("bbox")), KEEP2, 1,
         _img_ann("bbox", "[x, y, w, h]", "<missing>")),
    Case("coco_bbox_huge", coco(bad_bbox([0, 0, 1e308, 1e308])), KEEP2, 1,
         _img_ann("bbox", "inside the 8x8 (w x h) image", "1e+308")),
    Case("coco_unknown_category", coco(set_(_ann(2), "category_id", 5)), KEEP2, 1,
         _img_ann("category_id", "one of [3, 7, 42]", "5")),
    Case("coco_category_id_string_in_annotation", coco(set_(_ann(2), "category_id", "7")),
         KEEP2, 1, _img_ann("category_id", "one of [3, 7, 42]", "'7'")),
    Case("coco_category_id_list", coco(set_(_ann(2), "category_id", [7])), KEEP2, 1,
         _img_ann("category_id", "one of [3, 7, 42]", "[7]")),
    Case("coco_iscrowd_string", coco(set_(_ann(2), "iscrowd", "yes")), KEEP2, 1,
         _img_ann("iscrowd", "0 or 1", "'yes'")),
    Case("coco_duplicate_key_in_annotation",
         coco(raw=lambda t: t.replace('"bbox": [0, 0, 8, 8]',
                                      '"bbox": [0, 0, 8, 8], "bbox": [0, 0, 2, 2]')),
         KEEP2, 1, _img_ann("bbox", "the key once in the object", "2 values")),
    Case("coco_category_without_id",
         coco(lambda d, r: d["categories"].append({"name": "nameless"})), KEEP3, 1,
         Error("instances.json", "categories[3]", "id", "an integer category id", "<missing>")),
    Case("coco_category_id_string",
         coco(lambda d, r: d["categories"].append({"id": "5", "name": "five"})), KEEP3, 1,
         Error("instances.json", "categories[3]", "id", "an integer id in [0, 2147483648)",
               "'5'")),
    Case("coco_category_not_object", coco(lambda d, r: d["categories"].append("five")), KEEP3,
         1, Error("instances.json", "categories[3]", "category", "a JSON object", "'five'")),
    # Both entries with id 7 are ambiguous, and image 17 (category 7) has no category left.
    Case("coco_duplicate_category_id",
         coco(lambda d, r: d["categories"].append({"id": 7, "name": "seven-bis"})), KEEP2, 3,
         Error("instances.json", "categories[1]", "id", "a category id no other category has",
               "7")),
    Case("coco_duplicate_category_name",
         coco(lambda d, r: d["categories"].append({"id": 50, "name": "three"})), KEEP3, 1,
         Error("instances.json", "categories[3]", "name", "a name no other category has",
               "'three'")),
    # The image and its annotation both carry the bad id: the annotation has no image left.
    Case("coco_image_id_string",
         coco(lambda d, r: (d["images"][2].update(id="17x"), d["annotations"][2].update(
             image_id="17x"))), KEEP2, 2,
         Error("instances.json", "images[2]", "id", "an integer id in [0, 2147483648)", "'17x'")),
    Case("coco_image_id_float",
         coco(lambda d, r: (d["images"][2].update(id=17.5), d["annotations"][2].update(
             image_id=17.5))), KEEP2, 2,
         Error("instances.json", "images[2]", "id", "an integer id", "17.5")),
    Case("coco_image_id_huge",
         coco(lambda d, r: (d["images"][2].update(id=2**40), d["annotations"][2].update(
             image_id=2**40))), KEEP2, 2,
         Error("instances.json", f"images[2] (id {2**40})", "id", "an integer id",
               str(2**40))),
    Case("coco_image_id_negative",
         coco(lambda d, r: (d["images"][2].update(id=-4), d["annotations"][2].update(
             image_id=-4))), KEEP2, 2,
         Error("instances.json", "images[2] (id -4)", "id", "an integer id", "-4")),
    # Two images with id 13: neither can be told apart from the other's annotations.
    Case("coco_duplicate_image_id", coco(lambda d, r: (d["images"][2].update(id=13), d[
        "annotations"][2].update(image_id=13))), (11,), 2,
         Error("instances.json", "images[1] (id 13)", "id", "an image id no other image has",
               "13")),
    Case("coco_orphan_annotation",
         coco(lambda d, r: d["annotations"].append(
             {"id": 9, "image_id": 999, "category_id": 3, "bbox": [0, 0, 2, 2]})), KEEP3, 1,
         Error("instances.json", "annotations[3] (id 9)", "image_id",
               "the id of an image listed in 'images'", "999")),
    Case("coco_annotation_not_object", coco(lambda d, r: d["annotations"].append([1, 2])),
         KEEP3, 1, Error("instances.json", "annotations[3]", "annotation", "a JSON object",
                         "[1, 2]")),
    Case("coco_image_not_object", coco(lambda d, r: d["images"].__setitem__(2, "c.jpg")),
         KEEP2, 2, Error("instances.json", "images[2]", "image", "a JSON object", "'c.jpg'")),
    Case("coco_missing_image_file", coco(lambda d, r: os.remove(r / "images" / "c.jpg")), KEEP2,
         1, _img("file_name", "an existing image file", "c.jpg")),
    Case("coco_file_name_missing", coco(lambda d, r: d["images"][2].pop("file_name")), KEEP2,
         1, _img("file_name", "a file name", "<missing>")),
    Case("coco_file_name_number", coco(set_(lambda d: d["images"][2], "file_name", 5)), KEEP2,
         1, _img("file_name", "a non-empty file name", "5")),
    Case("coco_file_name_nul", coco(set_(lambda d: d["images"][2], "file_name", "c\x00.jpg")),
         KEEP2, 1, _img("file_name", "a non-empty file name", "'c\\x00.jpg'")),
    Case("coco_dotdot_path", coco(coco_path("dotdot")), KEEP2, 1,
         _img("file_name", "a path inside the dataset root", "../")),
    Case("coco_absolute_path", coco(coco_path("absolute")), KEEP2, 1,
         _img("file_name", "a path inside the dataset root", "-outside/x.jpg")),
    Case("coco_symlink_escape", coco(coco_path("symlink")), KEEP2, 1,
         _img("file_name", "a path inside the dataset root", "c.jpg")),
    Case("coco_outside_root_allowed", coco(coco_path("dotdot"), allow_outside_root=True), KEEP3),
    Case("coco_duplicate_file_name", coco(set_(lambda d: d["images"][2], "file_name", "a.jpg")),
         KEEP2, 1, _img("file_name", "a file no earlier record names (images[0] names it)",
                        "a.jpg")),
    Case("coco_width_mismatch", coco(set_(lambda d: d["images"][2], "width", 99)), KEEP2, 1,
         _img("width", "8, the width of", "99")),
    Case("coco_height_string", coco(set_(lambda d: d["images"][2], "height", "8")), KEEP2, 1,
         _img("height", "8, the height of", "'8'")),
    Case("coco_symlink_inside_accepted", coco(_symlink_inside), KEEP3),
    Case("coco_duplicate_top_level_key",
         coco(raw=lambda t: t.replace('"categories": ', '"categories": [], "categories": ')),
         file_level=True, error=_whole("it once", "2 times", record="top level",
                                       field="categories")),
    Case("coco_bom", coco(write=lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())),
         KEEP3),
    Case("coco_not_json", coco(raw=lambda t: "images: none\n"), file_level=True,
         error=_whole("valid JSON", "JSONDecodeError")),
    Case("coco_truncated_json", coco(raw=lambda t: t[:len(t) // 2]), file_level=True,
         error=_whole("valid JSON", "JSONDecodeError")),
    Case("coco_empty_file", coco(raw=lambda t: ""), file_level=True,
         error=_whole("a JSON document", "an empty file")),
    Case("coco_not_utf8", coco(write=lambda p: p.write_bytes(b'{"images": "\xff\xfe"}')),
         file_level=True, error=_whole("UTF-8 JSON", "not UTF-8")),
    Case("coco_huge_integer_literal", coco(raw=lambda t: t.replace('"id": 1,', '"id": 1' +
                                                                   "0" * 5000 + ",")),
         file_level=True, error=_whole("valid JSON", "ValueError")),
    Case("coco_top_level_array", coco(raw=lambda t: "[" + t + "]"), file_level=True,
         error=_whole("a JSON object with 'images' (list)", "array", record="top level")),
    Case("coco_missing_annotations", coco(lambda d, r: d.pop("annotations")), file_level=True,
         error=_whole("a JSON list", "<missing>", record="top level", field="annotations")),
    Case("coco_images_not_list", coco(lambda d, r: d.update(images={})), file_level=True,
         error=_whole("a JSON list", "object", record="top level", field="images")),
]


# --------------------------------------------------------------------------- TT100K

def tt100k(mutate: Callable[[dict, Path], Any] | None = None,
           raw: Callable[[str], str] | None = None, **kw) -> Callable[[Path], Callable]:
  """TT100K set: train images 10, 11, 12 (12 is the one cases spoil), test image 20."""

  def build(root: Path) -> Callable[[str], Any]:
    def obj(cat, b=(1, 1, 6, 6)):
      return {"category": cat, "bbox": dict(zip(("xmin", "ymin", "xmax", "ymax"), b,
                                                strict=True))}
    imgs = {}
    for key, split, cat in (("10", "train", "pl80"), ("11", "train", "i5"),
                            ("12", "train", "w13"), ("20", "test", "i5")):
      image(root / split / f"{key}.jpg", seed=int(key))
      imgs[key] = {"path": f"{split}/{key}.jpg", "id": int(key), "objects": [obj(cat)]}
    data = {"types": ["pl80", "i5", "w13"], "imgs": imgs}
    if mutate:
      mutate(data, root)
    text = json.dumps(data)
    (root / "annotations.json").write_text(raw(text) if raw else text)
    return lambda policy: readers.read_tt100k(str(root), "train", policy=policy, **kw)

  return build


def _tt(field, expected, got, record="imgs['12']"):
  return Error("annotations.json", record, field, expected, got)


def _im12(data):
  return data["imgs"]["12"]


def _box12(data):
  return data["imgs"]["12"]["objects"][0]["bbox"]


TT_KEEP2, TT_KEEP3 = (10, 11), (10, 11, 12)
TT_OBJ = "imgs['12'].objects[0]"


def _tt_outside(kind):
  def mutate(data, root):
    target = outside_file(root)
    rel = os.path.relpath(target, root)
    _im12(data)["path"] = target if kind == "absolute" else "train/../" + rel
  return mutate


def _tt_dup_id(data, root):
  image(root / "train" / "13.jpg")
  data["imgs"]["012"] = {"path": "train/13.jpg", "objects": []}
  _im12(data).pop("id")


TT100K_CASES = [
    Case("tt100k_bbox_string", tt100k(set_(_box12, "xmin", "1")), TT_KEEP2, 1,
         _tt("bbox", FOUR_NUMBERS, "'1'", TT_OBJ)),
    Case("tt100k_bbox_missing_key", tt100k(lambda d, r: _box12(d).pop("ymax")), TT_KEEP2, 1,
         _tt("bbox", FOUR_NUMBERS, "'xmax': 6}", TT_OBJ)),
    Case("tt100k_bbox_list", tt100k(set_(lambda d: _im12(d)["objects"][0], "bbox", [1, 1, 6, 6])),
         TT_KEEP2, 1, _tt("bbox", "a JSON object", "[1, 1, 6, 6]", TT_OBJ)),
    Case("tt100k_bbox_outside", tt100k(set_(_box12, "xmax", 9)), TT_KEEP2, 1,
         _tt("bbox", "inside the 8x8", "'xmax': 9", TT_OBJ)),
    Case("tt100k_unknown_category", tt100k(set_(lambda d: _im12(d)["objects"][0], "category",
                                                "zz")), TT_KEEP2, 1,
         _tt("category", "one of the 3 known category names", "'zz'", TT_OBJ)),
    Case("tt100k_id_not_integer", tt100k(set_(_im12, "id", "abc")), TT_KEEP2, 1,
         _tt("id", "an integer image id", "'abc'")),
    Case("tt100k_id_float", tt100k(set_(_im12, "id", 12.0)), TT_KEEP2, 1,
         _tt("id", "an integer image id", "12.0")),
    Case("tt100k_key_not_integer",
         tt100k(lambda d, r: (d["imgs"].__setitem__("img12", d["imgs"].pop("12")),
                              d["imgs"]["img12"].pop("id"))), TT_KEEP2, 1,
         _tt("imgs key", "an integer image id", "'img12'", "imgs['img12']")),
    Case("tt100k_id_key_disagree", tt100k(set_(_im12, "id", 13)), TT_KEEP2, 1,
         _tt("id", "the image's key '12' as an integer", "13")),
    Case("tt100k_huge_key", tt100k(lambda d, r: d["imgs"].__setitem__("9" * 5000, {
        "path": "train/12.jpg", "id": 12, "objects": []})), TT_KEEP3, 1,
         _tt("id", "the image's key '9999", "12", "imgs['" + "9" * 39 + "...]")),
    Case("tt100k_string_id_accepted", tt100k(set_(_im12, "id", "12")), TT_KEEP3),
    Case("tt100k_duplicate_key",
         tt100k(raw=lambda t: t.replace('"imgs": {', '"imgs": {"12": {"path": "x"}, ')),
         TT_KEEP2, 2, _tt("imgs key", "a key used once in 'imgs'", "'12' (2 times)")),
    Case("tt100k_duplicate_image_id", tt100k(_tt_dup_id), TT_KEEP2, 2,
         _tt("imgs key", "an image id no other image has", "'12'")),
    Case("tt100k_duplicate_path", tt100k(set_(_im12, "path", "train/10.jpg")), TT_KEEP2, 1,
         _tt("path", "a file no earlier record names (imgs['10'] names it)", "train/10.jpg")),
    Case("tt100k_objects_missing", tt100k(lambda d, r: _im12(d).pop("objects")), TT_KEEP2, 1,
         _tt("objects", "a list of objects", "<missing>")),
    Case("tt100k_object_not_object", tt100k(set_(_im12, "objects", ["w13"])), TT_KEEP2, 1,
         _tt("object", "a JSON object", "'w13'", TT_OBJ)),
    Case("tt100k_image_not_object", tt100k(lambda d, r: d["imgs"].__setitem__("12", [])),
         TT_KEEP2, 1, _tt("image", "a JSON object", "[]")),
    Case("tt100k_dotdot_path", tt100k(_tt_outside("dotdot")), TT_KEEP2, 1,
         _tt("path", "a path inside the dataset root", "train/../")),
    Case("tt100k_absolute_path", tt100k(_tt_outside("absolute")), TT_KEEP2, 1,
         _tt("path", "a path inside the dataset root", "-outside/x.jpg")),
    Case("tt100k_outside_root_allowed", tt100k(_tt_outside("dotdot"), allow_outside_root=True),
         TT_KEEP3),
    Case("tt100k_missing_image", tt100k(lambda d, r: os.remove(r / "train" / "12.jpg")),
         TT_KEEP2, 1, _tt("path", "an existing image file", "12.jpg")),
    Case("tt100k_backslash_path", tt100k(set_(_im12, "path", "train\\12.jpg")), TT_KEEP2, 1,
         _tt("path", "a path with '/' separators", "'train\\\\12.jpg'")),
    Case("tt100k_other_split_not_checked",
         tt100k(lambda d, r: d["imgs"]["20"].update(objects="none", id="x")), TT_KEEP3),
    Case("tt100k_dot_prefix_accepted", tt100k(set_(_im12, "path", "./train/12.jpg")), TT_KEEP3),
    Case("tt100k_duplicate_type", tt100k(lambda d, r: d["types"].append("i5")), TT_KEEP3, 1,
         _tt("types", "a name not listed before (types[1] has it)", "'i5'", "types[3]")),
    Case("tt100k_type_not_string", tt100k(lambda d, r: d["types"].append(7)), TT_KEEP3, 1,
         _tt("types", "a non-empty category name", "7", "types[3]")),
    Case("tt100k_types_missing", tt100k(lambda d, r: d.pop("types")), file_level=True,
         error=_whole("a JSON list", "<missing>", "annotations.json", "top level", "types")),
    Case("tt100k_imgs_list", tt100k(lambda d, r: d.update(imgs=[])), file_level=True,
         error=_whole("a JSON object", "array", "annotations.json", "top level", "imgs")),
    Case("tt100k_not_json", tt100k(raw=lambda t: t[:-3]), file_level=True,
         error=_whole("valid JSON", "JSONDecodeError", "annotations.json")),
]


# --------------------------------------------------------------------------- BDD100K

IMG_DIR = "images/10k/train"
MASK_DIR = "labels/sem_seg/masks/train"


def bdd(mutate: Callable[[Path], Any] | None = None, **kw) -> Callable[[Path], Callable]:
  """BDD100K set: samples a, b, c (c is the one cases spoil), 8x8, masks {0, 3, 255}."""

  def build(root: Path) -> Callable[[str], Any]:
    (root / MASK_DIR).mkdir(parents=True)
    for k, name in enumerate("abc"):
      image(root / IMG_DIR / f"{name}.jpg", seed=k)
      lab = np.zeros((8, 8), np.uint8)
      lab[:2], lab[2:4] = 255, 3
      cv2.imwrite(str(root / MASK_DIR / f"{name}.png"), lab)
    if mutate:
      mutate(root)
    return lambda policy: readers.read_bdd100k_seg(str(root), "train", policy=policy, **kw)

  return build


def _mask_c(arr=None, mode=None):
  def mutate(root):
    path = root / MASK_DIR / "c.png"
    if mode is not None:
      Image.new(mode, (8, 8)).save(path)
    else:
      cv2.imwrite(str(path), arr)
  return mutate


def _bdd(field, expected, got, file=f"{MASK_DIR}/c.png", record="sample 'c'"):
  return Error(file, record, field, expected, got)


BDD_KEEP2, BDD_KEEP3 = ("a.jpg", "b.jpg"), ("a.jpg", "b.jpg", "c.jpg")
MODE_L = "an image of PIL mode L"


def _bdd_symlink(root):
  os.remove(root / IMG_DIR / "c.jpg")
  os.symlink(outside_file(root), root / IMG_DIR / "c.jpg")


BDD_CASES = [
    Case("bdd_mask_rgb", bdd(_mask_c(np.zeros((8, 8, 3), np.uint8))), BDD_KEEP2, 1,
         _bdd("mask", MODE_L, "mode RGB")),
    Case("bdd_mask_16bit", bdd(_mask_c(np.zeros((8, 8), np.uint16))), BDD_KEEP2, 1,
         _bdd("mask", MODE_L, "mode I;16")),
    Case("bdd_mask_palette", bdd(_mask_c(mode="P")), BDD_KEEP2, 1, _bdd("mask", MODE_L, "mode P")),
    Case("bdd_mask_wrong_size", bdd(_mask_c(np.zeros((4, 8), np.uint8))), BDD_KEEP2, 1,
         _bdd("mask", "the image size (8, 8) (h, w)", "(4, 8)")),
    Case("bdd_mask_values_out_of_range", bdd(_mask_c(np.full((8, 8), 19, np.uint8)),
                                            deep_check=True), BDD_KEEP2, 1,
         _bdd("mask", "class ids in [0, 19) or 255", "[19]")),
    Case("bdd_mask_truncated", bdd(lambda r: truncate(r / MASK_DIR / "c.png", 0.5)), BDD_KEEP2,
         1, _bdd("mask", "a complete, decodable image file", "truncated")),
    Case("bdd_mask_jpeg_named_png", bdd(lambda r: image(r / MASK_DIR / "c.png", ".jpg")),
         BDD_KEEP2, 1, _bdd("mask", "formats PNG", "JPEG")),
    Case("bdd_mask_missing", bdd(lambda r: os.remove(r / MASK_DIR / "c.png")), BDD_KEEP2, 1,
         _bdd("mask", "an existing image file", "c.png")),
    Case("bdd_orphan_mask", bdd(lambda r: cv2.imwrite(str(r / MASK_DIR / "d.png"),
                                                      np.zeros((8, 8), np.uint8))), BDD_KEEP3, 1,
         _bdd("mask", f"an image {IMG_DIR}/d.jpg for this mask", "<missing>",
              f"{MASK_DIR}/d.png", "sample 'd'")),
    Case("bdd_image_not_jpg", bdd(lambda r: (r / IMG_DIR / "d.txt").write_text("x")), BDD_KEEP3,
         1, _bdd("image", "a .jpg image", "'d.txt'", f"{IMG_DIR}/d.txt", "sample 'd'")),
    Case("bdd_image_symlink_escape", bdd(_bdd_symlink), BDD_KEEP2, 1,
         _bdd("image", "a path inside the dataset root", "c.jpg", f"{IMG_DIR}/c.jpg")),
    Case("bdd_symlink_allowed", bdd(_bdd_symlink, allow_outside_root=True), BDD_KEEP3),
    Case("bdd_hidden_files_ignored", bdd(lambda r: (r / IMG_DIR / ".DS_Store").write_text("x")),
         BDD_KEEP3),
]


# --------------------------------------------------------------------------- list file

def cls(lines: bytes | Callable[[Path], bytes] | None = None,
        prepare: Callable[[Path], Any] | None = None, num_classes: int = 4,
        **kw) -> Callable[[Path], Callable]:
  """List-file set: images a, b, c (.jpg) with classes 0, 1, 2; ``lines`` (bytes, or a
  function of the folder) replaces the file."""

  def build(root: Path) -> Callable[[str], Any]:
    for k, name in enumerate("abc"):
      image(root / "images" / f"{name}.jpg", seed=k)
    if prepare:
      prepare(root)
    lst = root / "list.txt"
    text = lines(root) if callable(lines) else lines
    lst.write_bytes(b"a.jpg 0\nb.jpg 1\nc.jpg 2\n" if text is None else text)
    return lambda policy: readers.read_cls_list(str(lst), str(root / "images"),
                                                num_classes=num_classes, policy=policy, **kw)

  return build


def _line(n, field, expected, got):
  return Error("list.txt", f"line {n}", field, expected, got)


CLS_KEEP2, CLS_KEEP3 = ("a.jpg", "b.jpg"), ("a.jpg", "b.jpg", "c.jpg")
CLASS_ID = "an integer in [0, 4) (decimal digits)"


CLS_CASES = [
    Case("cls_bom_accepted", cls(b"\xef\xbb\xbfa.jpg 0\nb.jpg 1\nc.jpg 2\n"), CLS_KEEP3),
    Case("cls_crlf_tabs_blank_lines_accepted",
         cls(b"a.jpg\t0\r\n\r\n  \r\nb.jpg 1  \r\nc.jpg  2\t\r\n\n"), CLS_KEEP3),
    Case("cls_no_final_newline_accepted", cls(b"a.jpg 0\nb.jpg 1\nc.jpg 2"), CLS_KEEP3),
    Case("cls_float_id", cls(b"a.jpg 0\nb.jpg 1\nc.jpg 2.0\n"), CLS_KEEP2, 1,
         _line(3, "class_id", CLASS_ID, "'2.0'")),
    Case("cls_negative_id", cls(b"a.jpg 0\nb.jpg 1\nc.jpg -1\n"), CLS_KEEP2, 1,
         _line(3, "class_id", CLASS_ID, "'-1'")),
    Case("cls_out_of_range", cls(b"a.jpg 0\nb.jpg 1\nc.jpg 4\n"), CLS_KEEP2, 1,
         _line(3, "class_id", CLASS_ID, "'4'")),
    Case("cls_huge_id", cls(b"a.jpg 0\nb.jpg 1\nc.jpg " + b"9" * 40 + b"\n"), CLS_KEEP2, 1,
         _line(3, "class_id", CLASS_ID, "'999")),
    Case("cls_non_ascii_digit", cls("a.jpg 0\nb.jpg 1\nc.jpg \u0662\n".encode()), CLS_KEEP2, 1,
         _line(3, "class_id", CLASS_ID, "'\u0662'")),
    Case("cls_extra_column", cls(b"a.jpg 0\nb.jpg 1\nc.jpg 2 x\n"), CLS_KEEP2, 1,
         _line(3, "line", "'<image_name> <class_id>'", "'c.jpg 2 x'")),
    Case("cls_missing_column", cls(b"a.jpg 0\nb.jpg 1\nc.jpg\n"), CLS_KEEP2, 1,
         _line(3, "line", "'<image_name> <class_id>'", "'c.jpg'")),
    Case("cls_not_utf8", cls(b"a.jpg 0\nb.jpg 1\nc\xff.jpg 2\n"), CLS_KEEP2, 1,
         _line(3, "line", "UTF-8 text", "b'c\\xff.jpg 2'")),
    Case("cls_duplicate_entry", cls(b"a.jpg 0\nb.jpg 1\nc.jpg 2\na.jpg 0\n"), CLS_KEEP3, 1,
         _line(4, "image_name", "a file no earlier record names (line 1 names it)", "'a.jpg'")),
    Case("cls_dotdot", cls(b"a.jpg 0\nb.jpg 1\n../c.jpg 2\n",
                           lambda r: image(r / "c.jpg")), CLS_KEEP2, 1,
         _line(3, "image_name", "a path inside the dataset root", "'../c.jpg'")),
    Case("cls_absolute", cls(lambda r: f"a.jpg 0\nb.jpg 1\n{outside_file(r)} 2\n".encode()),
         CLS_KEEP2, 1, _line(3, "image_name", "a path inside the dataset root", "-outside/x.jpg")),
    Case("cls_missing_image", cls(b"a.jpg 0\nb.jpg 1\nz.jpg 2\n"), CLS_KEEP2, 1,
         _line(3, "image_name", "an existing image file", "z.jpg")),
    Case("cls_unicode_name_accepted",
         cls("a.jpg 0\nb.jpg 1\n\u00e9\u6f22.jpg 2\n".encode(),
             lambda r: image(r / "images" / "\u00e9\u6f22.jpg")), ("a.jpg", "b.jpg",
                                                                    "\u00e9\u6f22.jpg")),
    Case("cls_empty_file", cls(b""), file_level=True,
         error=_whole("lines '<image_name> <class_id>'", "an empty file", "list.txt")),
    Case("cls_only_bom_and_blank_lines", cls(b"\xef\xbb\xbf\r\n\n"), file_level=True,
         error=_whole("lines '<image_name> <class_id>'", "an empty file", "list.txt")),
]


# --------------------------------------------------------------------------- image files

def _spoil_c(how: Callable[[Path], Any], **kw) -> Callable[[Path], Callable]:
  return cls(prepare=lambda r: how(r / "images" / "c.jpg"), **kw)


def _c(expected, got):
  return _line(3, "image_name", expected, got)


def _text_named_jpg(p):
  p.write_text("this is not an image\n")


def _gif_named_jpg(p):
  Image.new("RGB", (8, 8)).save(p, format="GIF")


def _trailing_bytes(p):
  p.write_bytes(p.read_bytes() + b"\x00" * 16 + b"camera trailer")


def _png_named_jpg_truncated(p):
  image(p, ".png")
  truncate(p, 0.6)


def _truncated_in_scan(p):
  """A 64x64 JPEG cut inside its pixel data (the header stays intact)."""
  image(p, hw=(64, 64))
  truncate(p, 0.7)


def _directory_named_jpg(p):
  os.remove(p)
  p.mkdir()


IMAGE_CASES = [
    Case("image_zero_bytes", _spoil_c(lambda p: p.write_bytes(b"")), CLS_KEEP2, 1,
         _c("a readable image file", "empty file (0 bytes)")),
    Case("image_text_named_jpg", _spoil_c(_text_named_jpg), CLS_KEEP2, 1,
         _c("a readable image file", "UnidentifiedImageError")),
    Case("image_gif_named_jpg", _spoil_c(_gif_named_jpg), CLS_KEEP2, 1,
         _c("an image in one of the formats JPEG", "GIF")),
    Case("image_truncated_jpeg_header", _spoil_c(truncate), CLS_KEEP2, 1,
         _c("a readable image file", "Truncated File Read")),
    Case("image_truncated_jpeg", _spoil_c(_truncated_in_scan), CLS_KEEP2, 1,
         _c("a complete, decodable image file", "image file is truncated")),
    Case("image_truncated_jpeg_deep", _spoil_c(_truncated_in_scan, deep_check=True), CLS_KEEP2,
         1, _c("a complete, decodable image file", "image file is truncated")),
    Case("image_jpeg_missing_end_marker_only", _spoil_c(lambda p: p.write_bytes(
        p.read_bytes()[:-2])), CLS_KEEP2, 1, _c("a complete, decodable image file", "truncated")),
    Case("image_truncated_png", _spoil_c(_png_named_jpg_truncated), CLS_KEEP2, 1,
         _c("a complete, decodable image file", "truncated")),
    Case("image_jpeg_trailing_bytes_accepted", _spoil_c(_trailing_bytes), CLS_KEEP3),
    Case("image_directory_named_jpg", _spoil_c(_directory_named_jpg), CLS_KEEP2, 1,
         _c("an existing image file", "c.jpg")),
]

CASES = COCO_CASES + TT100K_CASES + BDD_CASES + CLS_CASES + IMAGE_CASES
