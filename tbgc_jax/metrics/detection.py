"""Detection mAP50 with COCO semantics (pycocotools), accumulated batch by batch, and the
challenge's COCO result export.

mAP50 is COCO's AP at IoU 0.5: per category, precision interpolated at 101 recall points
(0, 0.01, ..., 1), at most 100 detections per image, all object sizes; averaged over the
categories that have ground truth (categories with ground truth but no detections count as
0, categories without ground truth are left out). It is read from ``COCOeval.eval
['precision']`` (the number ``stats[1]`` of ``summarize()`` prints).
"""

import contextlib
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tbgc_jax.ops.boxes import rescale_boxes


def to_coco_results(image_ids, scores, labels, boxes_xyxy, valid=None, category_ids=None,
                    score_threshold: float = 0.0) -> list[dict]:
  """Detections as a COCO result list (the challenge's ``dec`` submission section).

  Args:
    image_ids: ``[B]`` COCO image ids.
    scores: ``[B, K]`` detection scores.
    labels: ``[B, K]`` class indices in ``[0, num_classes)``.
    boxes_xyxy: ``[B, K, 4]`` boxes in ORIGINAL image pixels, xyxy.
    valid: optional ``[B]`` bool; False rows (batch padding) are dropped.
    category_ids: optional sequence mapping class index -> COCO ``category_id`` (COCO files
      often number categories from 1 or sparsely); identity when None.
    score_threshold: detections scoring below it are dropped.

  Returns:
    a list of ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score":
    float}`` with plain Python numbers (JSON-ready).
  """
  image_ids = np.asarray(image_ids)
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  boxes = np.asarray(boxes_xyxy, np.float64)
  if boxes.shape != (*scores.shape, 4) or labels.shape != scores.shape:
    raise ValueError(f"to_coco_results: scores {scores.shape}, labels {labels.shape}, boxes "
                     f"{boxes.shape} do not agree (expected [B, K], [B, K], [B, K, 4])")
  cat_map = None if category_ids is None else np.asarray(category_ids)
  if cat_map is not None and labels.size and labels.max() >= len(cat_map):
    raise ValueError(f"to_coco_results: label {labels.max()} has no entry in category_ids "
                     f"(length {len(cat_map)})")
  out = []
  for b in range(scores.shape[0]):
    if valid is not None and not bool(np.asarray(valid)[b]):
      continue
    for k in range(scores.shape[1]):
      if scores[b, k] < score_threshold:
        continue
      x0, y0, x1, y1 = boxes[b, k]
      cat = int(labels[b, k]) if cat_map is None else int(cat_map[labels[b, k]])
      out.append({"image_id": int(image_ids[b]), "category_id": cat,
                  "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                  "score": float(scores[b, k])})
  return out


def load_coco_ground_truth(ann_file: str) -> dict:
  """A COCO annotation file as pycocotools evaluates it: every image, box and crowd region.

  Annotations lacking ``area`` get ``w * h`` and lacking ``iscrowd`` get 0 (pycocotools needs
  both; with the "all" area range used for mAP50 the value does not change the result).
  """
  with open(ann_file) as f:
    data = json.load(f)
  for key in ("images", "annotations", "categories"):
    if not isinstance(data.get(key), list):
      raise ValueError(f"{ann_file}: field {key!r}: expected a list, got "
                       f"{type(data.get(key)).__name__}")
  anns = []
  for a in data["annotations"]:
    a = dict(a)
    if "area" not in a:
      a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
    a.setdefault("iscrowd", 0)
    anns.append(a)
  return {"images": data["images"], "annotations": anns, "categories": data["categories"]}


def records_to_coco(records: Sequence, category_ids: Sequence[int]) -> dict:
  """COCO ground truth from detection records (all their boxes), for sets not read from COCO.

  Args:
    records: ``DetRecord``-like items with ``image_path``, ``image_id``, ``boxes`` (xyxy
      pixels of the image on disk) and contiguous ``labels``.
    category_ids: contiguous label -> category id, the same mapping the export uses.
  """
  images, anns = [], []
  for r in records:
    images.append({"id": int(r.image_id), "file_name": os.path.basename(r.image_path)})
    for (x0, y0, x1, y1), label in zip(np.asarray(r.boxes, np.float64).reshape(-1, 4),
                                       np.asarray(r.labels).reshape(-1), strict=True):
      anns.append({"id": len(anns) + 1, "image_id": int(r.image_id),
                   "category_id": int(category_ids[int(label)]),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                   "iscrowd": 0})
  return {"images": images, "annotations": anns,
          "categories": [{"id": int(c), "name": str(c)} for c in category_ids]}


def _quiet(fn, *args):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def coco_map(ground_truth: Mapping, results: Sequence[Mapping]) -> dict[str, float]:
  """COCO box AP of ``results`` against an in-memory COCO ground-truth dataset.

  Args:
    ground_truth: a COCO dataset dict with ``images``, ``annotations`` (``bbox`` xywh,
      ``area``, ``iscrowd``, ``id`` >= 1) and ``categories``.
    results: COCO result dicts (see `to_coco_results`); their image ids must be in
      ``ground_truth``.

  Returns:
    ``{"mAP50": AP at IoU 0.5, "mAP": AP averaged over IoU 0.5:0.95}`` (all sizes,
    maxDets 100), and the same class-agnostic (``"mAP50_agnostic"``, ``"mAP_agnostic"``:
    COCOeval with ``useCats=0``, every box matched whatever its class), which tells
    localisation from classification errors; NaN when there is no ground-truth box at all.
  """
  gt = COCO()
  gt.dataset = {"images": list(ground_truth["images"]),
                "annotations": list(ground_truth["annotations"]),
                "categories": list(ground_truth["categories"])}
  _quiet(gt.createIndex)
  known = set(gt.getImgIds())
  unknown = {r["image_id"] for r in results} - known
  if unknown:
    raise ValueError(f"coco_map: results name image ids {sorted(unknown)[:5]} that are not in "
                     "the ground truth")
  if results:
    dt = _quiet(gt.loadRes, [dict(r) for r in results])
  else:  # loadRes cannot take an empty list
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "annotations": [],
                  "categories": gt.dataset["categories"]}
    _quiet(dt.createIndex)
  mean = lambda p: float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
  out = {}
  for use_cats, names in ((1, ("mAP50", "mAP")), (0, ("mAP50_agnostic", "mAP_agnostic"))):
    ev = COCOeval(gt, dt, "bbox")
    ev.params.useCats = use_cats
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    precision = ev.eval["precision"]  # [iou thr, recall thr, category, area range, max dets]
    assert np.isclose(ev.params.iouThrs[0], 0.5) and ev.params.maxDets[-1] == 100
    out[names[0]] = mean(precision[0, :, :, 0, -1])
    out[names[1]] = mean(precision[:, :, :, 0, -1])
  return out


class DetectionAccumulator:
  """Collects ground truth and predictions batch by batch; `compute` runs COCOeval.

  Ground truth comes from the batches (boxes rescaled to original pixels, at most
  ``max_boxes`` per image) unless a COCO dataset dict is given, in which case it is used
  whole, as is (every image, box, area and crowd flag of the file; images never added count
  as missed), which is how the challenge scores a submission.

  Args:
    category_ids: class index -> COCO category id (default ``range(num_classes)``).
    num_classes: needed when ``category_ids`` is None.
    ground_truth: optional COCO dataset dict to evaluate against.
  """

  def __init__(self, category_ids: Sequence[int] | None = None, num_classes: int | None = None,
               ground_truth: Mapping | None = None):
    if category_ids is None:
      if num_classes is None:
        raise ValueError("DetectionAccumulator needs category_ids or num_classes")
      category_ids = list(range(num_classes))
    self.category_ids = [int(c) for c in category_ids]
    self._external_gt = ground_truth
    self._images: dict[int, dict] = {}
    self._annotations: list[dict] = []
    self._results: list[dict] = []

  def add(self, batch: Mapping, predictions: Mapping) -> None:
    """Adds one evaluation batch.

    Args:
      batch: a "det" batch (numpy): ``image_id``, ``image_hw``, ``orig_hw``, ``valid`` and,
        unless ground truth was given, ``boxes``, ``labels``, ``box_mask``.
      predictions: `DINOHead.predict` output (``scores``, ``labels``, ``boxes`` xyxy in
        network-input pixels), fetched to host.
    """
    valid = np.asarray(batch["valid"], bool)
    image_ids = np.asarray(batch["image_id"])
    image_hw = np.asarray(batch["image_hw"])
    orig_hw = np.asarray(batch["orig_hw"])
    boxes = rescale_boxes(np.asarray(predictions["boxes"], np.float32), image_hw, orig_hw)
    self._results.extend(to_coco_results(image_ids, predictions["scores"],
                                         predictions["labels"], boxes, valid,
                                         self.category_ids))
    for b in np.flatnonzero(valid):
      img = int(image_ids[b])
      if img in self._images:
        raise ValueError(f"DetectionAccumulator: image_id {img} was added twice")
      self._images[img] = {"id": img, "height": int(orig_hw[b, 0]), "width": int(orig_hw[b, 1])}
    if self._external_gt is not None:
      return
    gt = rescale_boxes(np.asarray(batch["boxes"], np.float32), image_hw, orig_hw)
    labels = np.asarray(batch["labels"])
    mask = np.asarray(batch["box_mask"], bool)
    for b in np.flatnonzero(valid):
      for n in np.flatnonzero(mask[b]):
        x0, y0, x1, y1 = (float(v) for v in gt[b, n])
        self._annotations.append({
            "id": len(self._annotations) + 1,  # COCOeval treats id 0 as "unmatched"
            "image_id": int(image_ids[b]), "category_id": self.category_ids[labels[b, n]],
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})

  @property
  def image_ids(self) -> set[int]:
    """Ids of the images added so far."""
    return set(self._images)

  def results(self) -> list[dict]:
    """The COCO result list of everything added so far (the ``dec`` submission)."""
    return list(self._results)

  def ground_truth(self) -> dict:
    """The COCO dataset dict evaluated against."""
    if self._external_gt is not None:
      return self._external_gt
    return {"images": list(self._images.values()), "annotations": list(self._annotations),
            "categories": [{"id": c, "name": str(c)} for c in self.category_ids]}

  def compute(self) -> dict[str, float]:
    """`coco_map` over the images added so far."""
    return coco_map(self.ground_truth(), self._results)
