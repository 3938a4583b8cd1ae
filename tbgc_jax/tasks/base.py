"""Task specifications and their registry: everything the trainer knows about one task.

A task (detection ``"det"``, segmentation ``"seg"``, classification ``"cls"`` or one of your
own) is a `TaskSpec` registered under its name with `register_task`. The trainer looks a task
up by name (`get_task`) and hands each layer the part it needs; ``config.tasks`` accepts
every registered name. A spec has three parts, each seeing only its own needs:

- **data** (`TaskSpec.data`, a ``tbgc_jax.data.DataSpec``): the source formats it reads, how
  a record becomes the example's fields, the kinds of those fields (``Boxes`` with their
  slots, ``ClassMap``, ``DenseMap``, ``Keypoints``, ``ImageLabel``: the augmentations move
  and batching pads each field by its kind), its embedded data. The data pipeline receives
  this object and never looks a task up.
- **model** (`HeadSpec`): `TaskSpec.build_head` (from ``config.model.<task>``, the class
  count and the backbone's channels) and the keyword arguments of the head's ``predict`` at
  evaluation (`TaskSpec.predict_kwargs`).
- **evaluation** (`EvalSpec`): `TaskSpec.evaluator` (an `Evaluator` built from an
  `EvalContext`), the headline `TaskSpec.metric`, the challenge submission section, and
  `TaskSpec.prediction_example` for the evaluation gallery.

Adding a task of a new kind of target is one module (anywhere, e.g. a test module): a
``DataSpec`` subclass declaring its fields by kind (and, for a new on-disk format, a reader
registered with ``tbgc_jax.data.register_reader``), a head, an evaluator, and one
`register_task` line (docs/data.md, "Adding a task").

This module imports numpy and the data layer; the built-in specs (and the heads and
pycocotools they use) load on the first `get_task` / `task_names` call.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from tbgc_jax.data.spec import DataSpec

# The built-in tasks' modules, imported (in this order) on the first registry look-up.
_BUILTIN_MODULES = ("tbgc_jax.tasks.detection", "tbgc_jax.tasks.segmentation",
                    "tbgc_jax.tasks.classification")


class Evaluator(Protocol):
  """Accumulates one task's metric over evaluation batches (host side, numpy).

  ``update`` is called once per evaluation batch (padding rows have ``valid=False``) with the
  head's predictions for it; ``compute`` returns the metrics keyed by name, the task's
  headline `TaskSpec.metric` (a fraction, higher is better) among them.
  """

  def update(self, batch: Mapping[str, np.ndarray],
             predictions: Mapping[str, np.ndarray]) -> None: ...

  def compute(self) -> dict[str, float]: ...


@dataclasses.dataclass
class EvalContext:
  """What an evaluator is built from (`TaskSpec.evaluator`).

  Attributes:
    task_cfg: the task's data section (``config.data[task]``).
    source: the evaluated split's source (``records``, ``category_ids``, ... as its reader
      gives them).
    split: the split's name.
    submission: the challenge submission being built, or None; the evaluator fills the
      task's section (`TaskSpec.submission_key`).
    output_dir: a folder where the evaluator may write its per-example predictions
      (segmentation: label PNGs), or None.
  """

  task_cfg: Any
  source: Any
  split: str
  submission: dict | None = None
  output_dir: str | None = None


class HeadSpec:
  """The model part of a task: its head and how evaluation calls it."""

  def build_head(self, config: Any, channels: Sequence[int], *, rngs: Any) -> Any:
    """The task's head (an ``nnx.Module`` with ``loss(features, batch, rng) -> (loss,
    {name: scalar})`` and ``predict(features, batch, **kwargs) -> {name: array}``).

    Args:
      config: the trainer config (``config.model.<name>``, ``config.data.<name>``).
      channels: the backbone's output channels per level.
      rngs: the ``nnx.Rngs`` to initialise with.
    """
    raise NotImplementedError(f"{self!r}: build_head is not defined")

  def predict_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of the head's ``predict`` at evaluation."""
    return {}


class EvalSpec:
  """The evaluation part of a task.

  Attributes:
    metric: the headline key of the evaluator's ``compute()``: a fraction, higher is better;
      it is reported as ``<name>/<metric>`` and enters the mean ``score``.
    submission_key: the task's section of the challenge submission, or None.
  """

  metric: str = ""
  submission_key: str | None = None

  def evaluator(self, ctx: EvalContext) -> Evaluator:
    """A fresh `Evaluator` of one split."""
    raise NotImplementedError(f"{self!r}: evaluator is not defined")

  def empty_submission(self) -> Any:
    """The task's empty submission section (when `submission_key` is set)."""
    return None

  def prediction_example(self, ex: Mapping[str, np.ndarray],
                         prediction: Mapping[str, np.ndarray]) -> dict | None:
    """One fixed-shape example with its fields replaced by the head's prediction for it
    (one row of ``predict``'s output), so the preview's drawing shows the prediction (the
    evaluation gallery, ``tbgc_jax.trainer.evaluate.Evaluation.gallery``); None: the task is
    left out of it."""
    del ex, prediction
    return None


class TaskSpec(HeadSpec, EvalSpec):
  """One task: its name, its data part (`data`), its model and evaluation parts (the methods
  of `HeadSpec` and `EvalSpec`). Subclass, set the attributes, override what the task needs.

  Attributes:
    name: the task's name (``config.tasks``, ``config.data.<name>``, ``config.model.<name>``,
      ``config.loss_weights.<name>``, metric and log prefixes); its data spec has the same.
    data: the task's ``DataSpec``.
  """

  name: str = ""
  data: DataSpec | None = None

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r})"


_TASKS: dict[str, TaskSpec] = {}
_builtins_loaded = False


def _load_builtins() -> None:
  global _builtins_loaded
  if not _builtins_loaded:
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
      importlib.import_module(module)


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
  """Adds a task to the registry (its name then works in ``config.tasks``).

  Args:
    spec: the task's specification.
    replace: allow replacing a task of the same name.

  Returns:
    ``spec``.
  """
  if not isinstance(spec, TaskSpec):
    raise TypeError(f"register_task: expected a TaskSpec, got {type(spec).__name__}")
  if not spec.name or not spec.name.isidentifier():
    raise ValueError(f"register_task: the task name must be an identifier, got {spec.name!r}")
  if not spec.metric:
    raise ValueError(f"register_task: task {spec.name!r} has no headline metric")
  if not isinstance(spec.data, DataSpec) or spec.data.name != spec.name:
    raise ValueError(f"register_task: task {spec.name!r} needs a DataSpec named "
                     f"{spec.name!r} as its data part, got {spec.data!r}")
  _load_builtins()  # a built-in name is taken before anyone else registers it
  if spec.name in _TASKS and not replace:
    raise ValueError(f"task {spec.name!r} is already registered (replace=True to replace it)")
  _TASKS[spec.name] = spec
  return spec


def unregister_task(name: str) -> None:
  """Removes a task from the registry."""
  _load_builtins()
  if name not in _TASKS:
    raise KeyError(f"task {name!r} is not registered")
  del _TASKS[name]


def get_task(task: str | TaskSpec) -> TaskSpec:
  """The spec of a registered task (a spec passed in is returned as is)."""
  if isinstance(task, TaskSpec):
    return task
  _load_builtins()
  try:
    return _TASKS[task]
  except (KeyError, TypeError):
    raise ValueError(f"unknown task {task!r}; registered tasks: {task_names()}") from None


def task_names() -> tuple[str, ...]:
  """The registered tasks' names: the built-in ones (det, seg, cls), then the others in
  registration order."""
  _load_builtins()
  rank = {module: i for i, module in enumerate(_BUILTIN_MODULES)}
  names = list(_TASKS)
  return tuple(sorted(names, key=lambda n: (rank.get(type(_TASKS[n]).__module__, len(rank)),
                                            names.index(n))))


def metric_key(task: str | TaskSpec) -> str:
  """The key of a task's headline metric in evaluation results: ``<name>/<metric>``."""
  spec = get_task(task)
  return f"{spec.name}/{spec.metric}"
