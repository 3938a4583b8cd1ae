"""Segmentation mIoU accumulator and exports, against independent numpy loops."""

import json

import cv2
import jax
import numpy as np
import pytest

from tbgc_jax.metrics.segmentation import (
    ConfusionMatrix,
    confusion_matrix,
    iou_from_confusion,
    label_map_to_polygons,
    restore_label_map,
    save_label_png,
    seg_submission,
)


def _reference_miou(preds, labels, valids, num_classes):
  """Per-class IoU by pixel loops over the whole set; classes with empty union excluded."""
  inter = np.zeros(num_classes)
  union = np.zeros(num_classes)
  for pred, label, valid in zip(preds, labels, valids, strict=True):
    for p, g, v in zip(pred.reshape(-1), label.reshape(-1), np.broadcast_to(
        valid[:, None, None], label.shape).reshape(-1), strict=True):
      if not v or g == 255:
        continue
      if p == g:
        inter[g] += 1
        union[g] += 1
      else:
        union[g] += 1
        union[p] += 1
  ious = [inter[c] / union[c] for c in range(num_classes) if union[c] > 0]
  return np.mean(ious), inter, union


def test_accumulated_miou_matches_pixel_loop():
  rng = np.random.default_rng(0)
  c = 6
  acc = ConfusionMatrix(num_classes=c)
  preds, labels, valids = [], [], []
  for _ in range(3):
    # Classes 0..3 only in labels, 0..4 in predictions: class 5 absent from both (excluded),
    # class 4 predicted but never in ground truth (IoU 0, counted).
    label = rng.integers(0, 4, size=(2, 7, 9)).astype(np.uint8)
    label[rng.uniform(size=label.shape) < 0.2] = 255
    pred = np.where(rng.uniform(size=label.shape) < 0.6, label, rng.integers(0, 5, label.shape))
    pred = np.where(pred == 255, 0, pred).astype(np.int32)
    valid = np.array([True, rng.uniform() < 0.5])
    acc.update(pred, label, valid)
    preds.append(pred)
    labels.append(label)
    valids.append(valid)
  ref_miou, inter, union = _reference_miou(preds, labels, valids, c)
  got = acc.compute()
  np.testing.assert_allclose(got["miou"], ref_miou, rtol=1e-12)
  np.testing.assert_array_equal(got["present"], union > 0)
  assert not got["present"][5] and got["present"][4] and got["iou"][4] == 0.0
  assert np.isnan(got["iou"][5])
  np.testing.assert_allclose(got["iou"][:5], inter[:5] / union[:5])


def test_padding_examples_and_ignore_are_not_counted():
  label = np.full((2, 4, 4), 3, np.uint8)
  label[0, :2] = 255
  pred = np.zeros((2, 4, 4), np.int32)
  m = np.asarray(confusion_matrix(pred, label, np.array([True, False]), num_classes=4))
  assert m.sum() == 8 and m[3, 0] == 8
  assert np.isnan(iou_from_confusion(np.zeros((4, 4)))["miou"])


def test_confusion_jits_once_with_fixed_shapes():
  traces = []

  def counted(*args):
    traces.append(1)
    return confusion_matrix(*args, num_classes=3)

  f = jax.jit(counted)
  x = np.zeros((1, 3, 3), np.int32)
  f(x, x.astype(np.uint8), np.array([True]))
  f(x + 1, x.astype(np.uint8) + 1, np.array([False]))
  assert len(traces) == 1


def test_update_rejects_bad_shapes():
  with pytest.raises(ValueError, match="must both be"):
    ConfusionMatrix(3).update(np.zeros((2, 3)), np.zeros((2, 3)))


def test_png_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  lab = rng.integers(0, 19, (5, 7)).astype(np.uint8)
  save_label_png(tmp_path / "a.png", lab)
  back = cv2.imread(str(tmp_path / "a.png"), cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(back, lab)


def test_rectangle_round_trips_to_a_covering_polygon():
  lab = np.full((20, 30), 255, np.uint8)
  lab[3:11, 5:21] = 7
  lab[14:18, 2:6] = 2
  polys = label_map_to_polygons(lab)
  assert sorted(polys) == [2, 7] and len(polys[7]) == 1
  pts = np.asarray(polys[7][0]).reshape(-1, 2)
  assert pts[:, 0].min() == 5 and pts[:, 0].max() == 20
  assert pts[:, 1].min() == 3 and pts[:, 1].max() == 10
  filled = np.zeros_like(lab)
  cv2.fillPoly(filled, [pts.astype(np.int32)], 1)
  np.testing.assert_array_equal(filled.astype(bool), lab == 7)


def test_submission_restores_original_size_and_is_json():
  pred = np.zeros((8, 8), np.int32)
  pred[:4, :4] = 1  # valid region is 4x6 of the padded 8x8 prediction
  pred[:, 6:] = 5   # padding: must not be exported
  sub = seg_submission([pred], ["x.jpg"], image_hw=[(4, 6)], orig_hw=[(8, 12)])
  assert sorted(sub["x.jpg"]) == [0, 1]
  full = restore_label_map(pred, (4, 6), (8, 12))
  assert full.shape == (8, 12) and (full[:, :8] == 1).all() and (full[:, 8:] == 0).all()
  json.dumps(sub)
