"""Evaluation of every task through one interface, and the challenge submission.

Each task's spec gives its `Evaluator` (``update(batch, predictions)`` per evaluation batch,
then ``compute() -> {name: value}``): detection mAP50 with pycocotools, segmentation mIoU at
the original resolution, classification top-1, or a task of your own. A task section may
name another evaluator: ``config.data.<task>.evaluator = "package.module:factory"``, a
callable taking the `EvalContext` and returning an evaluator.

During training the evaluations are the config's ``evals`` (`eval_specs`), big_vision
style: ``config.evals.<name> = {type, task, split, every}``, several per task allowed. A
``type`` is a task's name (that task's own evaluator) or an evaluator type added with
`register_evaluator` (one module defining the evaluator, one registration line).
"""

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping
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


_EVALUATOR_TYPES: dict[str, Callable[[EvalContext], Evaluator]] = {}


def register_evaluator(name: str, factory: Callable[[EvalContext], Evaluator]) -> None:
  """Adds an evaluator type for ``config.evals.<name>.type``.

  Args:
    name: the type's name; must not be a task's name (those are the tasks' own evaluators).
    factory: builds the evaluator of one evaluation from its `EvalContext` (the task's data
      section, the split's source, the split).
  """
  if name in task_names() or name in _EVALUATOR_TYPES:
    raise ValueError(f"evaluator type {name!r} is taken (task names and "
                     f"{sorted(_EVALUATOR_TYPES)})")
  _EVALUATOR_TYPES[name] = factory


def unregister_evaluator(name: str) -> None:
  """Removes an evaluator type added by `register_evaluator`."""
  if name not in _EVALUATOR_TYPES:
    raise KeyError(f"evaluator type {name!r} is not registered; registered: "
                   f"{sorted(_EVALUATOR_TYPES)}")
  del _EVALUATOR_TYPES[name]


def evaluator_types() -> tuple[str, ...]:
  """The ``type`` values of ``config.evals``: registered types, then the task names."""
  return (*sorted(_EVALUATOR_TYPES), *task_names())


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """One evaluation of ``config.evals``: ``type`` on ``task``'s ``split``, every ``every``
  training steps (0: after the last step only)."""

  name: str
  type: str
  task: str
  split: str = "val"
  every: int = 0


def eval_specs(config: Any) -> dict[str, EvalSpec]:
  """``config.evals`` as `EvalSpec` s, checked. Without ``config.evals`` (or with it empty):
  one per task, named after it, its own evaluator on "val" every ``config.eval_every`` steps.

  Raises:
    ValueError: naming the evaluation and field, on an unknown type or task, a task outside
      ``config.tasks``, or a negative ``every``.
  """
  every = int(config.get("eval_every", 0) or 0)
  evals = config.get("evals", None)
  if not evals:
    return {t: EvalSpec(t, t, t, "val", every) for t in config.tasks}
  out = {}
  for name, e in evals.items():
    task = str(e.get("task", name))
    spec = EvalSpec(str(name), str(e.get("type", task)), task, str(e.get("split", "val")),
                    int(e.get("every", every)))
    if spec.task not in tuple(config.tasks):
      raise ValueError(f"config.evals.{name}.task: {spec.task!r} is not one of config.tasks "
                       f"{tuple(config.tasks)}")
    if spec.type not in _EVALUATOR_TYPES and spec.type != spec.task:
      raise ValueError(f"config.evals.{name}.type: expected the task's name ({spec.task!r}) or "
                       f"a registered evaluator type {sorted(_EVALUATOR_TYPES)}, got "
                       f"{spec.type!r}")
    if spec.every < 0:
      raise ValueError(f"config.evals.{name}.every must be >= 0, got {spec.every}")
    out[spec.name] = spec
  return out


def challenge_score(tasks, specs: Mapping[str, EvalSpec], metrics: Mapping[str, float]
                    ) -> float | None:
  """The mean of the tasks' headline metrics (the challenge score) when every task has an
  evaluation named after it with its own evaluator on "val" and its metrics are in
  ``metrics``; else None."""
  keys = [metric_key(t) for t in tasks]
  default = all(t in specs and (specs[t].type, specs[t].task, specs[t].split) == (t, t, "val")
                for t in tasks)
  if default and all(k in metrics for k in keys):
    return float(np.mean([metrics[k] for k in keys]))
  return None


def make_evaluator(task_cfg: Any, task: str, ctx: EvalContext,
                   evaluator_type: str | None = None) -> Evaluator:
  """The evaluator of one evaluation: the registered ``evaluator_type`` if given (and not the
  task's name), else ``task_cfg.evaluator`` ("module:factory") if set, else the task spec's."""
  if evaluator_type is not None and evaluator_type != task:
    return _EVALUATOR_TYPES[evaluator_type](ctx)
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
                 source: Any = None, evaluator_type: str | None = None) -> dict[str, float]:
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
    evaluator_type: a ``config.evals`` type (default: the task's own evaluator).

  Returns:
    ``{name: value}`` as the evaluator computes it (without the ``<task>/`` prefix).
  """
  cfg = config.data[task]
  spec = get_task(task).data
  source = source if source is not None else pipeline.make_source(cfg, spec, split)
  evaluator = make_evaluator(cfg, task, EvalContext(cfg, source, split, submission,
                                                    seg_png_dir), evaluator_type)
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

  def run(self, params: Any, rest: Any, specs: Mapping[str, EvalSpec]) -> dict[str, float]:
    """Runs the evaluations ``specs`` (`eval_specs`); returns ``{<name>/<metric>: value}``.

    With the default evaluations (one named after each task, on "val") the result is what
    ``__call__`` returns on "val": ``<task>/<metric>`` and ``score``, the mean of the tasks'
    headline metrics; ``score`` is there whenever every task has an evaluation named after it
    with its own evaluator on "val".
    """
    metrics = {}
    for name, e in specs.items():
      result = task_metrics(
          self.config, e.task,
          lambda batch, task=e.task: self._predict_host(task, params, rest, batch),
          split=e.split, batch_size=self._batch_size(e.task), source=self._source(e.task, e.split),
          evaluator_type=e.type)
      metrics.update({f"{name}/{k}": v for k, v in result.items()})
    score = challenge_score(self.tasks, specs, metrics)
    if score is not None:
      metrics["score"] = score
    return metrics

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
