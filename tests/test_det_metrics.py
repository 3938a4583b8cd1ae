"""Detection mAP50 (pycocotools), the batch accumulator and the COCO result export."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tbgc_jax.metrics.detection import DetectionAccumulator, coco_map, to_coco_results


def _gt(images, anns, cats):
  return {"images": [{"id": i, "height": 100, "width": 100} for i in images],
          "annotations": [{"id": n + 1, "image_id": im, "category_id": c, "bbox": list(b),
                           "area": b[2] * b[3], "iscrowd": 0}
                          for n, (im, c, b) in enumerate(anns)],
          "categories": [{"id": c, "name": str(c)} for c in cats]}


def _det(im, c, b, s):
  return {"image_id": im, "category_id": c, "bbox": list(b), "score": s}


def test_perfect_predictions_give_one_with_sparse_ids_and_empty_images():
  anns = [(1, 3, (10, 10, 20, 20)), (1, 7, (50, 50, 10, 30)), (4, 3, (0, 0, 99, 99))]
  gt = _gt([1, 2, 4], anns, [3, 7, 9])  # image 2 has no boxes, category 9 none at all
  dets = [_det(im, c, b, 0.9) for im, c, b in anns]
  out = coco_map(gt, dets)
  assert out["mAP50"] == pytest.approx(1.0) and out["mAP"] == pytest.approx(1.0)
  assert coco_map(gt, [])["mAP50"] == 0.0


def test_hand_checked_average_precision():
  # Category 3: two boxes in image 1. Ranked detections: TP (0.9), FP in the empty image 2
  # (0.8), TP with IoU 0.6 (0.7), and a box at IoU 0.4 (0.6) that stays a FP.
  # Precision envelope: 1 up to recall 0.5, then 2/3 up to recall 1 -> 101-point AP =
  # (51 * 1 + 50 * 2/3) / 101. Category 7 has ground truth but no detections: AP 0.
  # Category 9 has neither and is left out of the mean.
  gt = _gt([1, 2], [(1, 3, (0, 0, 10, 10)), (1, 3, (50, 50, 10, 10)),
                    (1, 7, (20, 20, 10, 10))], [3, 7, 9])
  dets = [_det(1, 3, (0, 0, 10, 10), 0.9), _det(2, 3, (0, 0, 10, 10), 0.8),
          _det(1, 3, (50, 50, 10, 6), 0.7), _det(1, 3, (50, 50, 10, 4), 0.6)]
  ap3 = (51 + 50 * 2 / 3) / 101
  assert coco_map(gt, dets)["mAP50"] == pytest.approx(ap3 / 2, abs=1e-9)


def test_class_agnostic_ap_counts_boxes_whatever_their_class():
  # Two boxes, both found where they are but each given the other's class: no class-aware AP,
  # full class-agnostic AP. A box in the wrong place stays a miss either way.
  gt = _gt([1], [(1, 3, (0, 0, 10, 10)), (1, 7, (50, 50, 10, 10))], [3, 7])
  swapped = [_det(1, 7, (0, 0, 10, 10), 0.9), _det(1, 3, (50, 50, 10, 10), 0.8)]
  out = coco_map(gt, swapped)
  assert out["mAP50"] == 0.0 and out["mAP"] == 0.0
  assert out["mAP50_agnostic"] == pytest.approx(1.0)
  assert out["mAP_agnostic"] == pytest.approx(1.0)
  # One box right, one at IoU 0.4: recall 1/2 at precision 1 -> (51 * 1) / 101.
  half = [_det(1, 3, (0, 0, 10, 10), 0.9), _det(1, 7, (50, 50, 10, 4), 0.8)]
  assert coco_map(gt, half)["mAP50_agnostic"] == pytest.approx(51 / 101, abs=1e-9)
  # With the right classes, both agree.
  right = [_det(1, 3, (0, 0, 10, 10), 0.9), _det(1, 7, (50, 50, 10, 10), 0.8)]
  out = coco_map(gt, right)
  assert out["mAP50"] == pytest.approx(1.0) and out["mAP50_agnostic"] == pytest.approx(1.0)


def test_map50_equals_cocoeval_summary_on_random_predictions():
  rng = np.random.default_rng(0)
  anns = [(int(rng.integers(1, 6)), int(rng.choice([1, 2, 5])),
           tuple(rng.uniform(0, 60, 2).tolist() + rng.uniform(5, 40, 2).tolist()))
          for _ in range(20)]
  gt = _gt(range(1, 8), anns, [1, 2, 5, 6])
  dets = [_det(int(rng.integers(1, 8)), int(rng.choice([1, 2, 5, 6])),
               rng.uniform(0, 60, 2).tolist() + rng.uniform(5, 40, 2).tolist(), float(s))
          for s in rng.uniform(size=60)]
  dets += [_det(im, c, (np.asarray(b) + rng.normal(0, 2, 4)).tolist(), float(rng.uniform()))
           for im, c, b in anns]
  with contextlib.redirect_stdout(io.StringIO()):
    g = COCO()
    g.dataset = gt
    g.createIndex()
    ev = COCOeval(g, g.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  out = coco_map(gt, dets)
  assert out["mAP50"] == pytest.approx(ev.stats[1], abs=1e-12)
  assert out["mAP"] == pytest.approx(ev.stats[0], abs=1e-12)
  assert 0.05 < out["mAP50"] < 1.0


def test_accumulator_rescales_respects_valid_and_exports():
  # Network input is half the original size: boxes double on the way out.
  batch1 = {
      "image_id": np.array([11, 12], np.int32), "valid": np.array([True, True]),
      "image_hw": np.array([[50, 40], [50, 50]], np.int32),
      "orig_hw": np.array([[100, 80], [100, 100]], np.int32),
      "boxes": np.array([[[5, 5, 15, 25], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]],
                        np.float32),
      "labels": np.array([[1, 0], [0, 0]], np.int32),
      "box_mask": np.array([[True, False], [False, False]]),  # image 12 has no boxes
  }
  batch2 = {k: v.copy() for k, v in batch1.items()}
  batch2["image_id"] = np.array([13, 0], np.int32)
  batch2["valid"] = np.array([True, False])  # padding example: nothing from it counts
  batch2["box_mask"] = np.array([[True, False], [True, True]])
  batch2["labels"] = np.array([[0, 0], [1, 1]], np.int32)
  preds1 = {"scores": np.array([[0.9, 0.1], [0.5, 0.2]], np.float32),
            "labels": np.array([[1, 0], [0, 1]], np.int32),
            "boxes": np.array([[[5, 5, 15, 25], [30, 30, 39, 49]],
                               [[1, 1, 2, 2], [3, 3, 4, 4]]], np.float32)}
  preds2 = {"scores": np.array([[0.8, 0.3], [0.99, 0.99]], np.float32),
            "labels": np.array([[0, 1], [1, 1]], np.int32),
            "boxes": np.array([[[5, 5, 15, 25], [0, 0, 5, 5]],
                               [[5, 5, 15, 25], [5, 5, 15, 25]]], np.float32)}
  acc = DetectionAccumulator(category_ids=[4, 8])
  acc.add(batch1, preds1)
  acc.add(batch2, preds2)
  res = acc.results()
  assert len(res) == 6 and {r["image_id"] for r in res} == {11, 12, 13}
  assert res[0] == {"image_id": 11, "category_id": 8, "bbox": [10.0, 10.0, 20.0, 40.0],
                    "score": pytest.approx(0.9)}
  gt = acc.ground_truth()
  assert [a["bbox"] for a in gt["annotations"]] == [[10.0, 10.0, 20.0, 40.0]] * 2
  assert [a["category_id"] for a in gt["annotations"]] == [8, 4]
  # Each category: its one box found at the top of its ranking -> AP 1 for both.
  assert acc.compute()["mAP50"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="added twice"):
    acc.add(batch1, preds1)


def test_export_filters_and_validates():
  out = to_coco_results([5], [[0.7, 0.05]], [[2, 0]], [[[1, 2, 4, 8], [0, 0, 1, 1]]],
                        category_ids=[10, 20, 30], score_threshold=0.1)
  assert out == [{"image_id": 5, "category_id": 30, "bbox": [1.0, 2.0, 3.0, 6.0],
                  "score": pytest.approx(0.7)}]
  with pytest.raises(ValueError, match="category_ids"):
    to_coco_results([5], [[0.7]], [[3]], [[[1, 2, 4, 8]]], category_ids=[10, 20, 30])
