"""Evaluation of the three tasks (det mAP50, seg mIoU, cls top-1) and the challenge submission."""

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from tbgc_jax.data import pipeline
from tbgc_jax.data.records import read_label_map
from tbgc_jax.metrics.classification import Top1Accuracy
from tbgc_jax.metrics.detection import (
    DetectionAccumulator,
    load_coco_ground_truth,
    records_to_coco,
)
from tbgc_jax.metrics.segmentation import (
    ConfusionMatrix,
    save_label_png,
    scores_to_label_map,
    seg_submission,
)
from tbgc_jax.trainer import sharding

_log = logging.getLogger(__name__)
METRIC_NAMES = {"det": "det/mAP50", "seg": "seg/mIoU", "cls": "cls/top1"}


def make_predict_fn(graphdef: nnx.GraphDef, task: str, mesh: jax.sharding.Mesh):
  """Jitted ``(params, rest, batch) -> predictions`` of one task, replicated output.

  Segmentation also returns ``seg_scores`` (per-class scores), for evaluation at the
  original resolution.
  """
  kwargs = {"return_scores": True} if task == "seg" else {}

  def predict(params, rest, batch):
    return nnx.merge(graphdef, params, rest, copy=True).task_predict(task, batch, **kwargs)

  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def _names(source) -> list[str]:
  return [os.path.basename(r.image_path) for r in source.records]


def detection_ground_truth(source) -> dict:
  """The COCO ground truth a detection source is scored against.

  The annotation file itself for COCO sources (every box and crowd region, the file's ids);
  otherwise (TT100K's own format) all boxes of the reader's records, with the category ids
  the export writes.
  """
  if getattr(source, "annotation_file", None):
    return load_coco_ground_truth(source.annotation_file)
  return records_to_coco(source.records, source.category_ids)


def evaluate_task(config: Any, task: str, predict: Callable[[dict], dict], *,
                  split: str = "val", batch_size: int | None = None,
                  submission: dict | None = None, seg_png_dir: str | None = None) -> float:
  """Metric of one task: det mAP50, seg mIoU or cls top-1, as the challenge computes them.

  Detection is scored with pycocotools against the annotation file (`detection_ground_truth`)
  with the file's category and image ids. Segmentation is scored at the original resolution
  against the label PNG on disk (`scores_to_label_map`), one image at a time.

  Args:
    config: the trainer config (uses ``config.data[task]`` and ``config.num_workers``).
    task: "det", "seg" or "cls".
    predict: host batch -> host (numpy) predictions of the task's head (``seg_scores`` for
      segmentation).
    split: data split to evaluate.
    batch_size: examples per evaluation batch (default the task's batch size).
    submission: if given, this task's section (``dec``, ``seg`` or ``cls``) is filled in.
    seg_png_dir: segmentation: also write each predicted label map (original resolution) as
      ``<image stem>.png`` here, BDD100K's mask format.

  Returns:
    The metric, a fraction.
  """
  cfg = config.data[task]
  source = pipeline.make_source(cfg, task, split)
  batches = pipeline.eval_iterator(cfg, task, split=split, batch_size=batch_size,
                                   source=source, num_workers=int(config.num_workers))
  names = _names(source)
  num_classes = int(cfg.num_classes)
  if task == "det":
    ground_truth = detection_ground_truth(source)
    acc = DetectionAccumulator(category_ids=source.category_ids, ground_truth=ground_truth)
  elif task == "seg":
    acc = ConfusionMatrix(num_classes=num_classes)
  else:
    acc = Top1Accuracy()
  for batch in batches:
    preds = predict(batch)
    rows = np.flatnonzero(np.asarray(batch["valid"], bool))
    if task == "det":
      acc.add(batch, preds)
    elif task == "seg":
      for i in rows:
        record = source.records[int(batch["index"][i])]
        label = read_label_map(record.label_path)
        if label.shape != tuple(batch["orig_hw"][i]):
          raise ValueError(f"{record.label_path}: field 'label': expected the image size "
                           f"{tuple(batch['orig_hw'][i])}, got {label.shape}")
        pred = scores_to_label_map(preds["seg_scores"][i], batch["image_hw"][i], label.shape)
        acc.update(pred[None], label[None])
        name = names[int(batch["index"][i])]
        if submission is not None:
          submission["seg"].update(seg_submission([pred], [name], num_classes=num_classes))
        if seg_png_dir:
          save_label_png(os.path.join(seg_png_dir, os.path.splitext(name)[0] + ".png"), pred)
    else:
      acc.update(preds, batch)
      if submission is not None:
        for i in rows:
          submission["cls"][names[int(batch["index"][i])]] = int(preds["label"][i])
  if task == "det":
    missing = {int(im["id"]) for im in ground_truth["images"]} - acc.image_ids
    if missing:
      _log.warning("det/%s: %d image(s) of the ground truth were not evaluated (skipped by "
                   "the reader); they count as missed, e.g. ids %s", split, len(missing),
                   sorted(missing)[:5])
    if submission is not None:
      submission["dec"] = acc.results()
    return float(acc.compute()["mAP50"])
  if task == "seg":
    return float(acc.compute()["miou"])
  return float(acc.result())


def evaluate(config: Any, graphdef: nnx.GraphDef, params: Any, rest: Any,
             mesh: jax.sharding.Mesh, *, split: str = "val", submission: bool = False,
             seg_png_dir: str | None = None) -> tuple[dict[str, float], dict | None]:
  """Runs `evaluate_task` for every task of ``config.tasks`` on ``split``.

  Args:
    config: the trainer config.
    graphdef: the model's graph in eval mode (``model.eval()`` before ``nnx.split``).
    params, rest: the model's parameters and other state.
    mesh: the device mesh (batches are sharded over its "data" axis).
    split: data split to evaluate.
    submission: also build the challenge submission (``cls``, ``dec``, ``seg`` sections).
    seg_png_dir: also write the segmentation predictions as label PNGs here.

  Returns:
    ``(metrics, submission_or_None)``; metrics has ``det/mAP50``, ``seg/mIoU``, ``cls/top1``
    (fractions) for the tasks present and ``score``, their mean (the challenge score).
  """
  data_sharding = sharding.data_sharding(mesh)
  metrics, sub = {}, {"cls": {}, "dec": [], "seg": {}} if submission else None
  for task in config.tasks:
    # Every host reads the same (global) batches and keeps the same accumulators; the
    # predictions are computed once, sharded over all devices of all hosts.
    on_device = make_predict_fn(graphdef, task, mesh)

    def predict(batch, on_device=on_device):
      return jax.device_get(on_device(params, rest, sharding.shared_batch(batch, data_sharding)))

    metrics[METRIC_NAMES[task]] = evaluate_task(
        config, task, predict, split=split,
        batch_size=int(config.data[task].batch_size) * mesh.size, submission=sub,
        seg_png_dir=seg_png_dir)
  metrics["score"] = float(np.mean([metrics[METRIC_NAMES[t]] for t in config.tasks]))
  return metrics, sub


def format_table(metrics: dict[str, float]) -> str:
  """A small text table, percentages, as the challenge reports them."""
  rows = [(k, v) for k, v in metrics.items() if k != "score"] + [("score (mean)", metrics["score"])]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {100 * v:6.2f}" for k, v in rows)
