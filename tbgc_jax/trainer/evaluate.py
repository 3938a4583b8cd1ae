"""Evaluation of the three tasks (det mAP50, seg mIoU, cls top-1) and the challenge submission."""

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from tbgc_jax.data import pipeline
from tbgc_jax.metrics.classification import Top1Accuracy
from tbgc_jax.metrics.detection import DetectionAccumulator
from tbgc_jax.metrics.segmentation import ConfusionMatrix, seg_submission

METRIC_NAMES = {"det": "det/mAP50", "seg": "seg/mIoU", "cls": "cls/top1"}


def global_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Host numpy batch (this process's rows) -> arrays sharded over the mesh's data axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def shared_batch(batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Host numpy batch that every process holds whole -> the same rows, sharded over the mesh.

  Each process places only the rows of its own devices, so the global array is ``batch``
  (not one copy per host) and the work is split over all devices.
  """
  def put(v):
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])
  return {k: put(v) for k, v in batch.items()}


def make_predict_fn(graphdef: nnx.GraphDef, task: str, mesh: jax.sharding.Mesh):
  """Jitted ``(params, rest, batch) -> predictions`` of one task, replicated output."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def predict(params, rest, batch):
    return nnx.merge(graphdef, params, rest, copy=True).task_predict(task, batch)

  return jax.jit(predict, out_shardings=replicated)


def _names(source) -> list[str]:
  return [os.path.basename(r.image_path) for r in source.records]


def evaluate(config: Any, graphdef: nnx.GraphDef, params: Any, rest: Any,
             mesh: jax.sharding.Mesh, *, split: str = "val", submission: bool = False
             ) -> tuple[dict[str, float], dict | None]:
  """Runs the evaluator of every task of ``config.tasks`` on ``split``.

  Args:
    config: the trainer config.
    graphdef: the model's graph in eval mode (``model.eval()`` before ``nnx.split``).
    params, rest: the model's parameters and other state.
    mesh: the device mesh (batches are sharded over its "data" axis).
    split: data split to evaluate.
    submission: also build the challenge submission (``cls``, ``dec``, ``seg`` sections).

  Returns:
    ``(metrics, submission_or_None)``; metrics has ``det/mAP50``, ``seg/mIoU``, ``cls/top1``
    (fractions) for the tasks present and ``score``, their mean (the challenge score).
  """
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  metrics, sub = {}, {"cls": {}, "dec": [], "seg": {}} if submission else None
  for task in config.tasks:
    cfg = config.data[task]
    source = pipeline.make_source(cfg, task, split)
    # Every host reads the same (global) batches and keeps the same accumulators; the
    # predictions are computed once, sharded over all devices of all hosts.
    batch_size = int(cfg.batch_size) * mesh.size
    batches = pipeline.eval_iterator(cfg, task, split=split, batch_size=batch_size,
                                     source=source, num_workers=int(config.num_workers))
    predict = make_predict_fn(graphdef, task, mesh)
    names = _names(source) if submission else None
    if task == "det":
      acc = DetectionAccumulator(num_classes=int(cfg.num_classes))
    elif task == "seg":
      acc = ConfusionMatrix(num_classes=int(cfg.num_classes))
    else:
      acc = Top1Accuracy()
    for batch in batches:
      preds = jax.device_get(predict(params, rest, shared_batch(batch, data_sharding)))
      valid = np.asarray(batch["valid"], bool)
      if task == "det":
        acc.add(batch, preds)
      elif task == "seg":
        acc.update(preds["seg"], batch["label"], valid)
        if submission:
          rows = np.flatnonzero(valid)
          sub["seg"].update(seg_submission(
              [preds["seg"][i] for i in rows], [names[batch["index"][i]] for i in rows],
              batch["image_hw"][rows], batch["orig_hw"][rows], int(cfg.num_classes)))
      else:
        acc.update(preds, batch)
        if submission:
          for i in np.flatnonzero(valid):
            sub["cls"][names[batch["index"][i]]] = int(preds["label"][i])
    if task == "det":
      metrics[METRIC_NAMES[task]] = float(acc.compute()["mAP50"])
      if submission:
        sub["dec"] = acc.results()
    elif task == "seg":
      metrics[METRIC_NAMES[task]] = float(acc.compute()["miou"])
    else:
      metrics[METRIC_NAMES[task]] = float(acc.result())
  metrics["score"] = float(np.mean([metrics[METRIC_NAMES[t]] for t in config.tasks]))
  return metrics, sub


def format_table(metrics: dict[str, float]) -> str:
  """A small text table, percentages, as the challenge reports them."""
  rows = [(k, v) for k, v in metrics.items() if k != "score"] + [("score (mean)", metrics["score"])]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {100 * v:6.2f}" for k, v in rows)
