"""Readers of the real on-disk formats: tiny fixtures written as real files, both policies."""

import json
import logging
import os

import cv2
import numpy as np
import pytest

from tbgc_jax.data import readers
from tbgc_jax.data.records import DataValidationError, RecordSource
from tbgc_jax.tasks import get_task


def _jpg(path, h=20, w=30, value=100):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))


def _png(path, arr):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  cv2.imwrite(str(path), arr)


# --------------------------------------------------------------------------- COCO

def _coco(tmp_path, bad):
  """Two images: 'good.jpg' (valid) and 'bad.jpg' with the defect ``bad``."""
  d = tmp_path / "images"
  _jpg(d / "good.jpg")
  _jpg(d / "bad.jpg")
  images = [{"id": 1, "file_name": "good.jpg", "height": 20, "width": 30},
            {"id": 2, "file_name": "bad.jpg", "height": 20, "width": 30}]
  anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]},
          {"id": 2, "image_id": 2, "category_id": 9, "bbox": [1, 1, 4, 4]}]
  if bad == "missing_image":
    os.remove(d / "bad.jpg")
  elif bad == "unreadable_image":
    (d / "bad.jpg").write_bytes(b"not a jpeg at all")
  elif bad == "box_outside":
    anns[1]["bbox"] = [25, 1, 10, 4]
  elif bad == "zero_area":
    anns[1]["bbox"] = [5, 5, 0, 4]
  elif bad == "malformed_box":
    anns[1]["bbox"] = [5, 5, 4]
  elif bad == "unknown_category":
    anns[1]["category_id"] = 42
  elif bad == "size_mismatch":
    images[1]["height"] = 99
  ann_file = tmp_path / "instances.json"
  ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
      {"id": 7, "name": "a"}, {"id": 9, "name": "b"}]}))
  return str(ann_file), str(d)


COCO_CASES = {
    "missing_image": ("file_name", "an existing image file"),
    "unreadable_image": ("file_name", "a readable image file"),
    "box_outside": ("bbox", "inside the 30x20"),
    "zero_area": ("bbox", "positive width and height"),
    "malformed_box": ("bbox", "[x, y, w, h]"),
    "unknown_category": ("category_id", "one of [7, 9]"),
    "size_mismatch": ("height", "20, the height of"),
}


def test_coco_valid(tmp_path):
  ann, imgs = _coco(tmp_path, None)
  recs, names = readers.read_coco(ann, imgs, deep_check=True)
  assert names == ["a", "b"]
  assert [r.image_id for r in recs] == [1, 2]
  np.testing.assert_allclose(recs[0].boxes, [[2, 3, 12, 8]])
  assert recs[0].labels.tolist() == [0] and recs[1].labels.tolist() == [1]
  ex = RecordSource(recs, get_task("det").data, 2)[0]
  assert ex["image"].shape == (20, 30, 3) and ex["image"].dtype == np.uint8
  assert ex["orig_hw"].tolist() == [20, 30] and int(ex["image_id"]) == 1


@pytest.mark.parametrize("bad", sorted(COCO_CASES))
def test_coco_strict_and_skip(tmp_path, bad, caplog):
  field, expected = COCO_CASES[bad]
  ann, imgs = _coco(tmp_path, bad)
  with pytest.raises(DataValidationError) as e:
    readers.read_coco(ann, imgs, policy="strict")
  msg = str(e.value)
  assert f"field {field!r}" in msg and expected in msg
  assert ("bad.jpg" in msg) or ("instances.json" in msg)
  with caplog.at_level(logging.WARNING):
    recs, _ = readers.read_coco(ann, imgs, policy="skip")
  assert [r.image_id for r in recs] == [1]
  assert "skipped 1 record" in caplog.text and field in caplog.text


# --------------------------------------------------------------------------- TT100K

def _tt100k(tmp_path, bad):
  _jpg(tmp_path / "train" / "10.jpg", 40, 40)
  _jpg(tmp_path / "train" / "11.jpg", 40, 40)
  _jpg(tmp_path / "test" / "12.jpg", 40, 40)
  obj = lambda c, b: {"category": c, "bbox": dict(zip(("xmin", "ymin", "xmax", "ymax"), b,
                                                     strict=True))}
  imgs = {
      "10": {"path": "train/10.jpg", "id": 10, "objects": [obj("pl80", [1, 2, 11, 12])]},
      "11": {"path": "train/11.jpg", "id": 11, "objects": [obj("i5", [3, 3, 9, 9])]},
      "12": {"path": "test/12.jpg", "id": 12, "objects": []},
  }
  if bad == "unknown_category":
    imgs["11"]["objects"][0]["category"] = "zz"
  elif bad == "box_outside":
    imgs["11"]["objects"][0]["bbox"]["xmax"] = 41
  elif bad == "missing_image":
    os.remove(tmp_path / "train" / "11.jpg")
  (tmp_path / "annotations.json").write_text(json.dumps({"types": ["pl80", "i5"],
                                                         "imgs": imgs}))


@pytest.mark.parametrize("bad,field", [(None, None), ("unknown_category", "category"),
                                       ("box_outside", "bbox"), ("missing_image", "path")])
def test_tt100k(tmp_path, bad, field):
  _tt100k(tmp_path, bad)
  if bad is None:
    recs, names = readers.read_tt100k(str(tmp_path), "train")
    assert names == ["pl80", "i5"] and [r.image_id for r in recs] == [10, 11]
    np.testing.assert_allclose(recs[0].boxes, [[1, 2, 11, 12]])
    assert recs[1].labels.tolist() == [1]
    recs, _ = readers.read_tt100k(str(tmp_path), "test")
    assert [r.image_id for r in recs] == [12] and recs[0].boxes.shape == (0, 4)
    return
  with pytest.raises(DataValidationError, match=f"field {field!r}") as e:
    readers.read_tt100k(str(tmp_path), "train")
  assert "annotations.json" in str(e.value) or "11.jpg" in str(e.value)
  recs, _ = readers.read_tt100k(str(tmp_path), "train", policy="skip")
  assert [r.image_id for r in recs] == [10]


# --------------------------------------------------------------------------- BDD100K

def _bdd(tmp_path, bad):
  for name in ("a", "b"):
    _jpg(tmp_path / "images" / "10k" / "train" / f"{name}.jpg", 16, 24)
    lab = np.zeros((16, 24), np.uint8)
    lab[:4] = 255
    lab[4:8] = 3
    _png(tmp_path / "labels" / "sem_seg" / "masks" / "train" / f"{name}.png", lab)
  mask_b = tmp_path / "labels" / "sem_seg" / "masks" / "train" / "b.png"
  if bad == "missing_mask":
    os.remove(mask_b)
  elif bad == "mask_size":
    _png(mask_b, np.zeros((8, 24), np.uint8))
  elif bad == "class_range":
    _png(mask_b, np.full((16, 24), 19, np.uint8))


@pytest.mark.parametrize("bad,expected", [("missing_mask", "an existing image file"),
                                          ("mask_size", "the image size (16, 24)"),
                                          ("class_range", "class ids in [0, 19) or 255")])
def test_bdd100k_strict_and_skip(tmp_path, bad, expected):
  _bdd(tmp_path, bad)
  with pytest.raises(DataValidationError) as e:
    readers.read_bdd100k_seg(str(tmp_path), "train", deep_check=True)
  assert "field 'mask'" in str(e.value) and expected in str(e.value)
  assert "b.png" in str(e.value) or "b.jpg" in str(e.value)
  recs = readers.read_bdd100k_seg(str(tmp_path), "train", policy="skip", deep_check=True)
  assert [os.path.basename(r.image_path) for r in recs] == ["a.jpg"]


def test_bdd100k_valid_and_runtime_check(tmp_path):
  _bdd(tmp_path, None)
  recs = readers.read_bdd100k_seg(str(tmp_path), "train", deep_check=True)
  ex = RecordSource(recs, get_task("seg").data, 19)[1]
  assert ex["label"].shape == (16, 24) and set(np.unique(ex["label"])) == {0, 3, 255}
  # Without deep_check, bad class ids are still caught (strictly) when decoding.
  _png(tmp_path / "labels" / "sem_seg" / "masks" / "train" / "a.png",
       np.full((16, 24), 30, np.uint8))
  recs = readers.read_bdd100k_seg(str(tmp_path), "train")
  with pytest.raises(DataValidationError, match=r"a\.png: field 'label'.*\[30\]"):
    RecordSource(recs, get_task("seg").data, 19)[0]


def test_bdd100k_missing_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match="images/10k/train"):
    readers.read_bdd100k_seg(str(tmp_path), "train")


# --------------------------------------------------------------------------- list file

@pytest.mark.parametrize("line,field,expected", [
    ("x.jpg 1 2", "line", "'<image_name> <class_id>'"),
    ("x.jpg one", "class_id", "an integer"),
    ("x.jpg 5", "class_id", "an integer in [0, 5)"),
    ("missing.jpg 1", "image_name", "an existing image file"),
])
def test_cls_list_strict_and_skip(tmp_path, line, field, expected):
  _jpg(tmp_path / "img" / "x.jpg")
  _jpg(tmp_path / "img" / "y.jpg")
  lst = tmp_path / "train.txt"
  lst.write_text(f"y.jpg 4\n\n{line}\n")
  with pytest.raises(DataValidationError) as e:
    readers.read_cls_list(str(lst), str(tmp_path / "img"), num_classes=5)
  assert f"train.txt: line 3: field {field!r}" in str(e.value) and expected in str(e.value)
  recs = readers.read_cls_list(str(lst), str(tmp_path / "img"), num_classes=5, policy="skip")
  assert [(os.path.basename(r.image_path), r.label) for r in recs] == [("y.jpg", 4)]
  ex = RecordSource(recs, get_task("cls").data, 5)[0]
  assert int(ex["label"]) == 4 and ex["image"].shape == (20, 30, 3)


def test_bad_policy_name(tmp_path):
  (tmp_path / "x").write_text("")
  with pytest.raises(ValueError, match="validation policy"):
    readers.read_cls_list(str(tmp_path / "x"), str(tmp_path), num_classes=2, policy="lenient")


# --------------------------------------------------------------------------- TFDS

def test_tfds_missing_is_a_clear_error_not_a_download(tmp_path):
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError, match="not prepared.*never downloads.*tfds build"):
    readers.TfdsClsSource("train", data_dir=str(data_dir))
  # Nothing was fetched or written.
  assert not data_dir.exists() or not any(p.is_file() for p in data_dir.rglob("*"))


def test_reduced_decode_scales_boxes(tmp_path):
  img = np.zeros((64, 96, 3), np.uint8)
  img[16:48, 24:56] = 255
  os.makedirs(tmp_path / "i")
  cv2.imwrite(str(tmp_path / "i" / "a.jpg"), img)
  (tmp_path / "a.json").write_text(json.dumps({
      "images": [{"id": 3, "file_name": "a.jpg", "height": 64, "width": 96}],
      "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [24, 16, 32, 32]}],
      "categories": [{"id": 1, "name": "x"}]}))
  recs, _ = readers.read_coco(str(tmp_path / "a.json"), str(tmp_path / "i"))
  full = RecordSource(recs, get_task("det").data, 1)[0]
  # 96 // 2 >= 40, 96 // 4 < 40
  half = RecordSource(recs, get_task("det").data, 1, min_decode_side=40)[0]
  assert full["image"].shape == (64, 96, 3) and half["image"].shape == (32, 48, 3)
  np.testing.assert_allclose(half["boxes"], full["boxes"] / 2)
  np.testing.assert_array_equal(half["orig_hw"], [64, 96])
  ys, xs = np.nonzero(half["image"].max(-1) > 127)
  np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], half["boxes"][0],
                             atol=1)


# --------------------------------------------------------------------------- file's own ids

def _sparse_coco(tmp_path):
  """Category ids 42, 3, 7 (unsorted, sparse) and image ids 1000, 5, 77."""
  d = tmp_path / "images"
  for name in ("a.jpg", "b.jpg", "c.jpg"):
    _jpg(d / name)
  images = [{"id": 1000, "file_name": "a.jpg", "height": 20, "width": 30},
            {"id": 5, "file_name": "b.jpg", "height": 20, "width": 30},
            {"id": 77, "file_name": "c.jpg", "height": 20, "width": 30}]
  anns = [{"id": 1, "image_id": 1000, "category_id": 42, "bbox": [1, 1, 4, 4]},
          {"id": 2, "image_id": 5, "category_id": 3, "bbox": [2, 2, 4, 4]},
          {"id": 3, "image_id": 77, "category_id": 7, "bbox": [3, 3, 4, 4]},
          {"id": 4, "image_id": 77, "category_id": 42, "bbox": [5, 5, 4, 4]}]
  cats = [{"id": 42, "name": "forty-two"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
  ann = tmp_path / "instances.json"
  ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
  return str(ann), str(d)


def test_coco_keeps_file_ids(tmp_path):
  ann, imgs = _sparse_coco(tmp_path)
  result = readers.read_coco(ann, imgs)
  recs, names = result  # still unpacks as before
  assert names == ["three", "seven", "forty-two"] == result.class_names
  assert result.category_ids == (3, 7, 42)
  assert result.category_map == {0: 3, 1: 7, 2: 42}
  assert [(r.image_id, r.file_image_id) for r in recs] == [(1000, 1000), (5, 5), (77, 77)]
  # Labels are contiguous, sorted by category id; mapping back gives the file's ids.
  assert [[result.category_ids[lab] for lab in r.labels] for r in recs] == [[42], [3], [7, 42]]
  assert result.num_skipped == 0


def test_make_source_exposes_category_ids(tmp_path):
  from tbgc_jax.data import pipeline

  ann, imgs = _sparse_coco(tmp_path)
  cfg = {"source": {"format": "coco", "train": {"ann_file": ann, "image_dir": imgs}},
         "num_classes": 3, "max_boxes": 4}
  src = pipeline.make_source(cfg, get_task("det").data, "train")
  assert src.category_ids == (3, 7, 42) and src.category_map == {0: 3, 1: 7, 2: 42}
  assert src.class_names == ("three", "seven", "forty-two")
  ex = src[2]
  assert int(ex["image_id"]) == 77 and ex["labels"].tolist() == [1, 2]
  # Survives pickling (grain worker processes).
  import pickle

  assert pickle.loads(pickle.dumps(src)).category_ids == (3, 7, 42)
  assert pickle.loads(pickle.dumps(readers.read_coco(ann, imgs))).category_ids == (3, 7, 42)


def test_tt100k_export_ids(tmp_path):
  """TT100K: category id = index in the reader's category list; image id = the file's id,
  with the ``imgs`` key (a string) when the entry has no ``id``."""
  _jpg(tmp_path / "train" / "a.jpg", 40, 40)
  _jpg(tmp_path / "train" / "b.jpg", 40, 40)
  box = {"xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9}
  imgs = {"90001": {"path": "train/a.jpg", "objects": [{"category": "i5", "bbox": box}]},
          "17": {"path": "train/b.jpg", "id": 17, "objects": [{"category": "pl80", "bbox": box}]}}
  (tmp_path / "annotations.json").write_text(json.dumps({"types": ["pl80", "w13", "i5"],
                                                         "imgs": imgs}))
  result = readers.read_tt100k(str(tmp_path), "train")
  assert result.category_ids == (0, 1, 2) and result.class_names == ["pl80", "w13", "i5"]
  assert [(r.image_id, r.file_image_id) for r in result.records] == [(17, 17), (90001, "90001")]
  assert [r.labels.tolist() for r in result.records] == [[0], [2]]
  sub = readers.read_tt100k(str(tmp_path), "train", categories=["i5", "pl80"])
  assert sub.category_ids == (0, 1) and [r.labels.tolist() for r in sub.records] == [[1], [0]]


def test_exif_orientation_is_ignored(tmp_path):
  """Annotations refer to the stored pixels: the decode must not rotate by EXIF orientation
  (OpenCV's default does), or boxes and the header size stop matching the image."""
  from PIL import Image

  from tbgc_jax.data.records import image_size, read_image

  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  Image.new("RGB", (16, 8), (200, 10, 10)).save(tmp_path / "r.jpg", exif=exif)
  assert image_size(str(tmp_path / "r.jpg")) == (8, 16)
  assert read_image(str(tmp_path / "r.jpg")).shape == (8, 16, 3)
  assert read_image(str(tmp_path / "r.jpg"), reduce=2).shape == (4, 8, 3)


def test_allow_outside_root_from_config(tmp_path):
  from tbgc_jax.data import pipeline

  _jpg(tmp_path / "elsewhere" / "x.jpg")
  _jpg(tmp_path / "root" / "y.jpg")
  lst = tmp_path / "list.txt"
  lst.write_text("../elsewhere/x.jpg 1\ny.jpg 0\n")
  cfg = {"source": {"format": "cls_list",
                    "train": {"list_file": str(lst), "image_dir": str(tmp_path / "root")}},
         "num_classes": 2}
  with pytest.raises(DataValidationError, match="a path inside the dataset root"):
    pipeline.make_source(cfg, get_task("cls").data, "train")
  assert len(pipeline.make_source({**cfg, "policy": "skip"}, get_task("cls").data, "train")) == 1
  assert len(pipeline.make_source({**cfg, "allow_outside_root": True}, get_task("cls").data,
                                          "train")) == 2


def test_truncated_loading_switched_on_is_refused(tmp_path, monkeypatch):
  """PIL's global LOAD_TRUNCATED_IMAGES would hide truncation: the check refuses to run."""
  from PIL import ImageFile

  _jpg(tmp_path / "img" / "a.jpg")
  (tmp_path / "l.txt").write_text("a.jpg 0\n")
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
    readers.read_cls_list(str(tmp_path / "l.txt"), str(tmp_path / "img"), num_classes=1,
                          deep_check=True)


@pytest.mark.parametrize("image,label,field,got", [
    (np.zeros((4, 4, 3), np.float32), 1, "image", "float32 (4, 4, 3)"),
    (np.zeros((4, 4, 4), np.uint8), 1, "image", "uint8 (4, 4, 4)"),
    (np.zeros((4, 4, 3), np.uint8), 196, "label", "196"),
    (np.zeros((4, 4, 3), np.uint8), -1, "label", "-1"),
    (np.zeros((4, 4, 3), np.uint8), 1.5, "label", "1.5"),
])
def test_tfds_source_rejects_malformed_examples(image, label, field, got):
  """The TFDS source checks every example it decodes (a prepared set is read, not scanned)."""
  src = object.__new__(readers.TfdsClsSource)
  src.split, src.data_dir, src.name, src.num_classes = "train", "/d", "cars196", 196
  src._src = [{"image": np.zeros((4, 4), np.uint8), "label": np.int64(3)},
              {"image": image, "label": label}]
  ex = src[0]
  assert ex["image"].shape == (4, 4, 3) and int(ex["label"]) == 3
  with pytest.raises(DataValidationError) as e:
    src[1]
  assert str(e.value).startswith(f"/d: cars196 train[1]: field {field!r}: expected ")
  assert got in str(e.value).partition(", got ")[2]


def test_decode_refuses_an_image_truncated_after_reading(tmp_path):
  """A file cut after the read pass: the decode fails instead of returning grey pixels."""
  img = cv2.resize(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8), (64, 64))
  _png(tmp_path / "i" / "a.jpg", img)  # cv2.imwrite picks JPEG from the name
  (tmp_path / "l.txt").write_text("a.jpg 0\n")
  recs = readers.read_cls_list(str(tmp_path / "l.txt"), str(tmp_path / "i"), num_classes=1)
  src = RecordSource(recs, get_task("cls").data, 1)
  assert src[0]["image"].shape == (64, 64, 3)
  data = (tmp_path / "i" / "a.jpg").read_bytes()
  (tmp_path / "i" / "a.jpg").write_bytes(data[:int(len(data) * 0.7)])
  with pytest.raises(DataValidationError, match=r"a\.jpg: field 'image': expected a readable"):
    src[0]


def test_missing_image_folder_is_one_clear_error(tmp_path):
  """A wrong image_dir is a file-level error (not one skip per image, which would read as
  "every image is bad")."""
  ann, _ = _sparse_coco(tmp_path)
  for policy in ("strict", "skip"):
    with pytest.raises(FileNotFoundError, match=r"nowhere: image folder \(image_dir\) not found"):
      readers.read_coco(ann, str(tmp_path / "nowhere"), policy=policy)
  (tmp_path / "l.txt").write_text("a.jpg 0\n")
  with pytest.raises(FileNotFoundError, match="nowhere: image folder"):
    readers.read_cls_list(str(tmp_path / "l.txt"), str(tmp_path / "nowhere"), num_classes=1,
                          policy="skip")
