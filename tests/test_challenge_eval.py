"""Evaluation scores what the challenge scores: detection against the annotation file itself
(the file's category and image ids, crowd regions, every box), segmentation at the label's
original resolution; the submission sections agree with those numbers."""

import contextlib
import io
import os

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import tiny
from tbgc_jax.data import pipeline
from tbgc_jax.metrics.detection import coco_map, records_to_coco
from tbgc_jax.metrics.segmentation import scores_to_label_map
from tbgc_jax.tasks import get_task
from tbgc_jax.tasks.detection import ground_truth as detection_ground_truth
from tbgc_jax.trainer.evaluate import evaluate_task, format_table, task_metrics
from tests import real_format_data as rfd

CATEGORIES = [(42, "pl40"), (3, "i5"), (7, "p11")]  # not contiguous, not sorted
NUM_SELECT = 8


def _coco_images():
  return [
      {"id": 1000, "file_name": "b.jpg", "hw": (60, 80),
       "anns": [(3, [4, 6, 20, 14], 0), (42, [40, 30, 30, 25], 0)]},
      # Five boxes (max_boxes is 3) and a crowd region.
      {"id": 17, "file_name": "a.jpg", "hw": (48, 64),
       "anns": [(7, [2, 2, 10, 10], 0), (7, [20, 2, 10, 10], 0), (3, [40, 2, 12, 10], 0),
                (42, [2, 25, 14, 12], 0), (3, [24, 26, 12, 16], 0),
                (7, [44, 30, 18, 16], 1)]},
      {"id": 5, "file_name": "c.jpg", "hw": (64, 64), "anns": []},
  ]


def _det_config(root):
  c = tiny.get_config()
  c.tasks = ("det",)
  det = c.data.det
  det.source.format = "coco"
  det.source.val = {"ann_file": f"{root}/annotations/instances_val.json",
                    "image_dir": f"{root}/images/val"}
  det.num_classes, det.max_boxes = 3, 3
  det.eval_image_size = (32, 40)
  det.eval_augment = "resize_fit(size=(32, 40))"
  return c


def _pycocotools_map50(ann_file, results):
  """mAP50 of results against the file, as the challenge's evaluation computes it."""
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(ann_file)
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[1]


def test_a_perfect_detection_export_scores_one_against_the_annotation_file(tmp_path):
  root = str(tmp_path / "det")
  ann_file = rfd.write_coco(root, "val", _coco_images(), CATEGORIES)
  config = _det_config(root)
  by_id = {im["id"]: im for im in _coco_images()}
  label_of = {cid: i for i, cid in enumerate(sorted(c for c, _ in CATEGORIES))}

  def perfect(batch):
    """Every non-crowd box of the file (not only the max_boxes the batch holds), in network
    pixels, then low-scoring junk boxes up to the head's fixed output size."""
    b = len(batch["image_id"])
    scores = np.full((b, NUM_SELECT), 0.01, np.float32)
    labels = np.zeros((b, NUM_SELECT), np.int32)
    boxes = np.tile(np.float32([0, 0, 1, 1]), (b, NUM_SELECT, 1))
    for i in np.flatnonzero(batch["valid"]):
      scale = batch["image_hw"][i] / batch["orig_hw"][i]
      anns = [a for a in by_id[int(batch["image_id"][i])]["anns"] if not a[2]]
      for k, (cat, (x, y, w, h), _) in enumerate(anns):
        scores[i, k], labels[i, k] = 0.9, label_of[cat]
        boxes[i, k] = np.float32([x, y, x + w, y + h]) * np.tile(scale[::-1], 2)
    return {"scores": scores, "labels": labels, "boxes": boxes}

  sub = {"cls": {}, "dec": [], "seg": {}}
  reported = evaluate_task(config, "det", perfect, batch_size=2, submission=sub)
  assert {r["category_id"] for r in sub["dec"] if r["score"] > 0.5} == {3, 7, 42}
  assert {r["image_id"] for r in sub["dec"]} == {5, 17, 1000}
  scored = _pycocotools_map50(ann_file, sub["dec"])
  assert scored == pytest.approx(1.0)
  assert reported == pytest.approx(scored, abs=1e-12)

  # Every box in its place under the wrong class: no mAP50, full class-agnostic mAP50.
  def wrong_class(batch):
    out = perfect(batch)
    return dict(out, labels=(out["labels"] + 1) % len(CATEGORIES))

  metrics = task_metrics(config, "det", wrong_class, batch_size=2)
  assert metrics["mAP50"] == 0.0
  assert metrics["mAP50_agnostic"] == pytest.approx(1.0)
  table = format_table({"det/mAP50": 0.0, "det/mAP50_agnostic": 1.0, "count/mae": 2.5,
                        "score": 0.0}).splitlines()
  assert [line.split() for line in table] == [
      ["det/mAP50", "0.00"], ["det/mAP50_agnostic", "100.00"], ["count/mae", "2.5000"],
      ["score", "(mean)", "0.00"]]


def test_detection_ground_truth_is_the_whole_file(tmp_path):
  root = str(tmp_path / "det")
  rfd.write_coco(root, "val", _coco_images(), CATEGORIES)
  source = pipeline.make_source(_det_config(root).data.det, get_task("det").data, "val")
  assert list(source.category_ids) == [3, 7, 42]
  gt = detection_ground_truth(source)
  assert len(gt["annotations"]) == 8 and sum(a["iscrowd"] for a in gt["annotations"]) == 1
  # The training records drop the crowd region; they are not what is scored against.
  assert sum(len(r.labels) for r in source.records) == 7


def test_tt100k_ground_truth_has_every_box_with_the_export_ids(tmp_path):
  root = str(tmp_path / "tt100k")
  objects = [("p11", [2, 2, 12, 12]), ("i5", [20, 4, 30, 20]), ("p11", [30, 30, 40, 44]),
             ("pl40", [40, 2, 60, 12])]
  rfd.write_tt100k(root, [{"id": 77, "path": "test/77.jpg", "hw": (48, 64),
                           "objects": objects}], ["i5", "p11", "pl40"])
  cfg = _det_config(root).data.det
  cfg.source = {"format": "tt100k", "val": {"root": root, "split": "test"}}
  source = pipeline.make_source(cfg, get_task("det").data, "val")
  gt = detection_ground_truth(source)
  assert gt == records_to_coco(source.records, source.category_ids)
  assert len(gt["annotations"]) == 4 > cfg.max_boxes
  assert [a["category_id"] for a in gt["annotations"]] == [1, 0, 1, 2]
  perfect = [{"image_id": 77, "category_id": a["category_id"], "bbox": a["bbox"],
              "score": 0.9} for a in gt["annotations"]]
  assert coco_map(gt, perfect)["mAP50"] == pytest.approx(1.0)


def _seg_config(root):
  c = tiny.get_config()
  c.tasks = ("seg",)
  seg = c.data.seg
  seg.source = {"format": "bdd100k", "val": {"root": root, "split": "val"}}
  seg.num_classes = 3
  seg.eval_image_size = (16, 24)
  seg.eval_augment = "resize_fit(size=(16, 24))"
  return c


def test_segmentation_is_scored_at_the_original_resolution(tmp_path):
  root = str(tmp_path / "bdd")
  # 32x48 images, evaluated at 16x24: the 1-pixel row of class 2 (row 10) is lost by the
  # network-size label; at the original size it counts (IoU 0: it cannot be predicted).
  labels = {"img0": rfd.label_with_halves((32, 48), thin_row=10),
            "img1": rfd.label_with_halves((32, 48))}
  rfd.write_bdd100k_seg(root, "val", labels)
  config = _seg_config(root)
  seen = []

  def perfect_at_network_size(batch):
    """One-hot of the (downsampled) batch label: perfect at the network resolution."""
    seen.append(batch["label"][np.asarray(batch["valid"], bool)])
    onehot = np.eye(3, dtype=np.float32)[np.where(batch["label"] == 255, 0, batch["label"])]
    return {"seg": np.argmax(onehot, -1), "seg_scores": onehot}

  sub = {"cls": {}, "dec": [], "seg": {}}
  miou = evaluate_task(config, "seg", perfect_at_network_size, batch_size=2, submission=sub)
  assert not (np.concatenate(seen) == 2).any()  # the premise: downsampling drops the class
  left, line = 2 * 32 * 24, 24  # class-0 pixels of both images; class-2 pixels
  assert miou == pytest.approx(((left - line) / left + 1.0 + 0.0) / 3)

  # The submission polygons are at the original resolution and decode to the prediction.
  assert sorted(sub["seg"]) == ["img0.jpg", "img1.jpg"]
  for name in ("img0", "img1"):
    decoded = np.full((32, 48), 255, np.uint8)
    for cls_id, polys in sub["seg"][f"{name}.jpg"].items():
      for poly in polys:
        cv2.fillPoly(decoded, [np.asarray(poly, np.int32).reshape(-1, 2)], int(cls_id))
    np.testing.assert_array_equal(decoded, rfd.label_with_halves((32, 48)))


def test_scores_to_label_map_crops_the_padding_and_resizes():
  scores = np.zeros((8, 8, 3), np.float32)
  scores[:4, :3, 1] = 1.0  # valid region is 4x6; columns 6.. are padding
  scores[:4, 3:6, 2] = 1.0
  scores[:, 6:, 0] = 5.0
  out = scores_to_label_map(scores, (4, 6), (8, 12))
  assert out.shape == (8, 12) and out.dtype == np.uint8
  assert (out[:, :6] == 1).all() and (out[:, 6:] == 2).all()
  with pytest.raises(ValueError, match="outside scores"):
    scores_to_label_map(scores, (9, 6), (8, 12))


def test_real_format_writers_produce_readable_sets(tmp_path):
  root = str(tmp_path / "cars")
  rfd.write_cls_list(root, "val", [("x.jpg", 4), ("y.jpg", 0)])
  cfg = tiny.get_config().data.cls
  cfg.source = {"format": "cls_list", "val": {"list_file": f"{root}/val.txt",
                                              "image_dir": f"{root}/images"}}
  source = pipeline.make_source(cfg, get_task("cls").data, "val")
  assert [int(source[i]["label"]) for i in range(2)] == [4, 0]
  assert os.path.isfile(f"{root}/images/x.jpg")
