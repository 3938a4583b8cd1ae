"""Evaluation of every task through one interface, and the challenge submission.

Each task's spec gives its `Evaluator` (``update(batch, predictions)`` per evaluation batch,
then ``compute() -> {name: value}``): detection mAP50 with pycocotools, segmentation mIoU at
the original resolution, classification top-1, or a task of your own. A task section may
name another evaluator: ``config.data.<task>.evaluator = "package.module:factory"``, a
callable taking the `EvalContext` and returning an evaluator.
"""

import importlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from tbgc_jax.data import pipeline
from tbgc_jax.tasks import EvalContext, Evaluator, get_task, metric_key, task_names
from tbgc_jax.trainer import sharding


def metric_names() -> dict[str, str]:
  """``{task: key of its headline metric}`` of every registered task (``det/mAP50``, ...)."""
  return {t: metric_key(t) for t in task_names()}


def make_predict_fn(graphdef: nnx.GraphDef, task: str, mesh: jax.sharding.Mesh):
  """Jitted ``(params, rest, batch) -> predictions`` of one task, replicated output.

  The head's ``predict`` gets the spec's ``predict_kwargs()`` (segmentation: ``seg_scores``,
  per-class scores, for evaluation at the original resolution).
  """
  kwargs = get_task(task).predict_kwargs()

  def predict(params, rest, batch):
    return nnx.merge(graphdef, params, rest, copy=True).task_predict(task, batch, **kwargs)

  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def make_evaluator(task_cfg: Any, task: str, ctx: EvalContext) -> Evaluator:
  """The task's evaluator: ``task_cfg.evaluator`` ("module:factory") if set, else its spec's."""
  name = task_cfg.get("evaluator", None)
  if not name:
    return get_task(task).evaluator(ctx)
  module, _, attr = str(name).partition(":")
  try:
    factory = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(f"config.data.{task}.evaluator: expected 'package.module:factory', got "
                     f"{name!r} ({type(e).__name__}: {e})") from e
  return factory(ctx)


def task_metrics(config: Any, task: str, predict: Callable[[dict], dict], *,
                 split: str = "val", batch_size: int | None = None,
                 submission: dict | None = None, seg_png_dir: str | None = None,
                 source: Any = None) -> dict[str, float]:
  """The metrics of one task on ``split``: its evaluator over every evaluation batch.

  Args:
    config: the trainer config (uses ``config.data[task]`` and ``config.num_workers``).
    task: a registered task's name.
    predict: host batch -> host (numpy) predictions of the task's head (with its spec's
      ``predict_kwargs``).
    split: data split to evaluate.
    batch_size: examples per evaluation batch (default the task's batch size).
    submission: if given, the task's section (its spec's ``submission_key``) is filled in.
    seg_png_dir: tasks predicting label maps (segmentation) also write each predicted map
      (original resolution) as ``<image stem>.png`` here, BDD100K's mask format.
    source: the split's source, if already read.

  Returns:
    ``{name: value}`` as the evaluator computes it (without the ``<task>/`` prefix).
  """
  cfg = config.data[task]
  spec = get_task(task).data
  source = source if source is not None else pipeline.make_source(cfg, spec, split)
  evaluator = make_evaluator(cfg, task, EvalContext(cfg, source, split, submission,
                                                    seg_png_dir))
  for batch in pipeline.eval_iterator(cfg, spec, split=split, batch_size=batch_size,
                                      source=source, num_workers=int(config.num_workers)):
    evaluator.update(batch, predict(batch))
  return {k: float(v) for k, v in evaluator.compute().items()}


def evaluate_task(config: Any, task: str, predict: Callable[[dict], dict], *,
                  split: str = "val", batch_size: int | None = None,
                  submission: dict | None = None, seg_png_dir: str | None = None) -> float:
  """The headline metric of one task (det mAP50, seg mIoU, cls top-1, ...), a fraction.

  See `task_metrics` for the arguments.
  """
  metrics = task_metrics(config, task, predict, split=split, batch_size=batch_size,
                         submission=submission, seg_png_dir=seg_png_dir)
  return metrics[get_task(task).metric]


def empty_submission() -> dict:
  """The challenge submission with every registered task's section empty."""
  specs = sorted((get_task(t) for t in task_names() if get_task(t).submission_key),
                 key=lambda s: s.submission_key)
  return {s.submission_key: s.empty_submission() for s in specs}


class Evaluation:
  """Evaluates the tasks of ``config.tasks``; call it again and again (during training):
  the prediction functions compile once and the sources are read once per split.

  Args:
    config: the trainer config.
    graphdef: the model's graph in eval mode (``model.eval()`` before ``nnx.split``).
    mesh: the device mesh (batches are sharded over its "data" axis).
  """

  def __init__(self, config: Any, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.tasks = tuple(config.tasks)
    self._data_sharding = sharding.data_sharding(mesh)
    self._predict = {t: make_predict_fn(graphdef, t, mesh) for t in self.tasks}
    self._sources: dict[tuple[str, str], Any] = {}

  def __call__(self, params: Any, rest: Any, *, split: str = "val", submission: bool = False,
               seg_png_dir: str | None = None) -> tuple[dict[str, float], dict | None]:
    """Runs `task_metrics` for every task on ``split``.

    Args:
      params, rest: the model's parameters and other state.
      split: data split to evaluate.
      submission: also build the challenge submission (``cls``, ``dec``, ``seg`` sections).
      seg_png_dir: also write the segmentation predictions as label PNGs here.

    Returns:
      ``(metrics, submission_or_None)``; metrics has ``<task>/<name>`` for what each task's
      evaluator computes (``det/mAP50``, ``seg/mIoU``, ``cls/top1``, ...) and ``score``, the
      mean of the tasks' headline metrics (the challenge score).
    """
    metrics, sub = {}, empty_submission() if submission else None
    for task in self.tasks:
      result = task_metrics(
          self.config, task, lambda batch, task=task: self._predict_host(task, params, rest, batch),
          split=split, batch_size=self._batch_size(task), submission=sub,
          seg_png_dir=seg_png_dir, source=self._source(task, split))
      metrics.update({f"{task}/{k}": v for k, v in result.items()})
    metrics["score"] = float(np.mean([metrics[metric_key(t)] for t in self.tasks]))
    return metrics, sub

  def _source(self, task: str, split: str) -> Any:
    """The split's source, read once per `Evaluation`."""
    if (task, split) not in self._sources:
      self._sources[task, split] = pipeline.make_source(self.config.data[task],
                                                        get_task(task).data, split)
    return self._sources[task, split]

  def _batch_size(self, task: str) -> int:
    return int(self.config.data[task].batch_size) * self.mesh.size

  def _predict_host(self, task: str, params: Any, rest: Any, batch: dict) -> dict:
    """Host predictions of one global batch. Every host reads the same batches and keeps the
    same accumulators; the predictions are computed once, sharded over all devices."""
    return jax.device_get(self._predict[task](
        params, rest, sharding.shared_batch(batch, self._data_sharding)))

  def gallery(self, params: Any, rest: Any, path: str, *, split: str = "val",
              num: int = 8) -> str:
    """Writes a PNG of the first ``num`` examples of ``split`` per task, each as the ground
    truth beside the prediction (`TaskSpec.prediction_example`, drawn as the preview draws
    examples: boxes with their class, label maps overlaid, class labels); returns ``path``.

    Uses the evaluation's compiled prediction functions and batch sizes (no new compile).
    Every host must call it (the predictions are sharded); process 0 writes the file.
    """
    import cv2

    from tbgc_jax.data.preview import draw, grid

    sections = []
    for task in self.tasks:
      spec, cfg = get_task(task), self.config.data[task]
      fields = pipeline.fields(cfg, spec.data)
      pairs = []
      for batch in pipeline.eval_iterator(cfg, spec.data, split=split,
                                          batch_size=self._batch_size(task),
                                          source=self._source(task, split)):
        preds = self._predict_host(task, params, rest, batch)
        for i in np.flatnonzero(batch["valid"])[:num - len(pairs)]:
          ex = {k: v[i] for k, v in batch.items()}
          shown = spec.prediction_example(ex, {k: v[i] for k, v in preds.items()})
          if shown is None:
            break
          truth, pred = (draw(e, fields, int(cfg.num_classes)) for e in (ex, shown))
          gap = np.full((truth.shape[0], 4, 3), 255, np.uint8)
          pairs.append(np.concatenate([truth, gap, pred], axis=1))
        if len(pairs) >= num or not pairs:
          break
      if pairs:
        body = grid(pairs, cols=min(4, len(pairs)), gap=6)
        title = np.full((18, body.shape[1], 3), 255, np.uint8)
        cv2.putText(title, f"{task}: truth | prediction", (4, 13), cv2.FONT_HERSHEY_PLAIN,
                    1.0, (0, 0, 0), 1)
        sections.append(np.concatenate([title, body], axis=0))
    if not sections:
      raise ValueError(f"no task of {list(self.tasks)} draws its predictions "
                       "(TaskSpec.prediction_example)")
    width = max(x.shape[1] for x in sections)
    image = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)),
                                   constant_values=255) for x in sections], axis=0)
    if jax.process_index() == 0:  # every host predicts (sharded); one writes
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write the gallery PNG")
    return path


def evaluate(config: Any, graphdef: nnx.GraphDef, params: Any, rest: Any,
             mesh: jax.sharding.Mesh, *, split: str = "val", submission: bool = False,
             seg_png_dir: str | None = None) -> tuple[dict[str, float], dict | None]:
  """One `Evaluation` of every task of ``config.tasks`` on ``split`` (see its ``__call__``)."""
  return Evaluation(config, graphdef, mesh)(params, rest, split=split, submission=submission,
                                            seg_png_dir=seg_png_dir)


def format_table(metrics: dict[str, float]) -> str:
  """A small text table: headline metrics, their variants (``det/mAP50_agnostic``) and the
  score in percent (as the challenge reports them), other metrics as they are."""
  percent = (*metric_names().values(), "score (mean)")
  rows = [(k, v) for k, v in metrics.items() if k != "score"] + [("score (mean)", metrics["score"])]
  width = max(len(k) for k, _ in rows)
  return "\n".join(
      f"{k:<{width}}  {100 * v:6.2f}" if k.startswith(percent) else f"{k:<{width}}  {v:8.4f}"
      for k, v in rows)
