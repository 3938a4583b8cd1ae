"""Task specifications and their registry: everything the trainer knows about one task.

A task (detection ``"det"``, segmentation ``"seg"``, classification ``"cls"`` or one of your
own) is a `TaskSpec` registered under its name with `register_task`. The model factory, the
data pipeline, the evaluation and the preview look a task up by name (`get_task`) and call
its spec; none of them names a task. ``config.tasks`` accepts every registered name.

A spec bundles:

- the head (`TaskSpec.build_head`, from ``config.model.<task>``, the class count and the
  backbone's channels) and the keyword arguments of its ``predict`` at evaluation;
- reading and decoding: `TaskSpec.read` (a source format -> records), `TaskSpec.decode`
  (one record + its decoded image -> the example's task fields);
- augmentation: `TaskSpec.label_maps`, the example keys holding per-pixel label maps that
  geometric transforms warp with the image (nearest neighbour, 255 outside);
- batches: `TaskSpec.pad_targets` (fixed-shape task fields) and `TaskSpec.padding_targets`
  (the empty annotations of an evaluation padding example);
- embedded data: `TaskSpec.embedded_reader_args`, `TaskSpec.write_embedded`;
- evaluation: `TaskSpec.evaluator` (an `Evaluator`), the headline `TaskSpec.metric` and the
  challenge submission section;
- the preview: `TaskSpec.draw`, and for the evaluation gallery
  `TaskSpec.prediction_example` (a prediction in the example's fields).

This module imports only numpy; the built-in specs (and the heads, OpenCV and pycocotools
they use) load on the first `get_task` / `task_names` call.
"""

from __future__ import annotations

import dataclasses
import importlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

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
    label_png_dir: tasks predicting label maps write them here as PNGs, or None.
  """

  task_cfg: Any
  source: Any
  split: str
  submission: dict | None = None
  label_png_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class RecordSet:
  """What `TaskSpec.read` returns: the records and, for detection, the file's categories.

  Attributes:
    records: one record per example (what `TaskSpec.decode` takes).
    category_ids: the file's category id of each contiguous label, or None (``range``).
    class_names: the name of each label, or None.
    annotation_file: the annotation file evaluation scores against, or None.
  """

  records: Sequence[Any]
  category_ids: Sequence[int] | None = None
  class_names: Sequence[str] | None = None
  annotation_file: str | None = None


class EmbeddedPool(NamedTuple):
  """Material of the embedded data (`TaskSpec.write_embedded`): background photos (uint8
  RGB), 8x8 digits (0..16) of the split and their classes."""

  backgrounds: list[np.ndarray]
  digits: np.ndarray
  targets: np.ndarray


class TaskSpec:
  """One task: subclass, set the attributes, override the methods the task needs.

  Attributes:
    name: the task's name (``config.tasks``, ``config.data.<name>``, ``config.model.<name>``,
      ``config.loss_weights.<name>``, metric and log prefixes).
    metric: the headline key of the evaluator's ``compute()``: a fraction, higher is better;
      it is reported as ``<name>/<metric>`` and enters the mean ``score``.
    label_maps: example keys holding per-pixel label maps (uint8 [H, W], 255 = ignore) that
      geometric augmentations warp with the image and batches pad with 255.
    reduced_decode: the source may decode large images at 1/2, 1/4 or 1/8 size
      (``min_decode_side``); `decode` then scales the annotations to the decoded image.
    rng_stream: the task's index in the random streams (data seed ``seed + 1000 * (stream +
      1)``, embedded data); default: derived from the name.
    submission_key: the task's section of the challenge submission, or None.
    embedded_format: the reader format of the task's embedded data (``source.format:
      "embedded"``), or None when the task has none.
    embedded_data: `write_embedded` writes data of the task's own (else its embedded data,
      if any, is another task's: `embedded_reader_args` points there).
  """

  name: str = ""
  metric: str = ""
  label_maps: tuple[str, ...] = ()
  reduced_decode: bool = False
  rng_stream: int | None = None
  submission_key: str | None = None
  embedded_format: str | None = None
  embedded_data: bool = False

  @property
  def stream(self) -> int:
    """`rng_stream`, or a number in [1000, 10000) derived from the name."""
    if self.rng_stream is not None:
      return int(self.rng_stream)
    return 1000 + zlib.crc32(self.name.encode()) % 9000

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r})"

  # ------------------------------------------------------------------------ model

  def build_head(self, config: Any, channels: Sequence[int], *, rngs: Any) -> Any:
    """The task's head (an ``nnx.Module`` with ``loss(features, batch, rng) -> (loss,
    {name: scalar})`` and ``predict(features, batch, **kwargs) -> {name: array}``).

    Args:
      config: the trainer config (``config.model.<name>``, ``config.data.<name>``).
      channels: the backbone's output channels per level.
      rngs: the ``nnx.Rngs`` to initialise with.
    """
    raise NotImplementedError(f"task {self.name!r}: build_head is not defined")

  def predict_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of the head's ``predict`` at evaluation."""
    return {}

  # ------------------------------------------------------------------------ reading

  def read(self, fmt: str, kwargs: Mapping[str, Any], *, num_classes: int, policy: str,
           deep_check: bool, allow_outside_root: bool) -> RecordSet | Any:
    """Reads and validates the records of one split.

    Args:
      fmt: ``config.data.<name>.source.format``.
      kwargs: the split's reader arguments (``source.<split>``).
      num_classes, policy, deep_check, allow_outside_root: the task section's fields.

    Returns:
      A `RecordSet` (a ``RecordSource`` decodes it with `decode`), or a ready random-access
      source (``__len__``, ``__getitem__`` -> example).
    """
    del kwargs, num_classes, policy, deep_check, allow_outside_root
    raise self.unsupported_format(fmt)

  def unsupported_format(self, fmt: str) -> ValueError:
    """The error for a source format `read` does not read."""
    return ValueError(f"source format {fmt!r} is not available for task {self.name!r}")

  def check_source(self, source: Any, task_cfg: Any, split: str) -> None:
    """Checks (or warns about) a freshly read source against the task's config."""
    del source, task_cfg, split

  def decode(self, record: Any, image: np.ndarray, orig_hw: tuple[int, int],
             num_classes: int) -> dict[str, Any]:
    """The task fields of an example (besides ``image``, ``index``, ``orig_hw``).

    Args:
      record: one record of `read`.
      image: the decoded image (uint8 [h, w, 3]; smaller than ``orig_hw`` under
        `reduced_decode`).
      orig_hw: the image's size on disk.
      num_classes: the task's class count.
    """
    raise NotImplementedError(f"task {self.name!r}: decode is not defined")

  # ------------------------------------------------------------------------ batches

  def pad_targets(self, ex: Mapping[str, Any], image_hw: tuple[int, int], *,
                  max_boxes: int) -> dict[str, np.ndarray]:
    """The fixed-shape task fields of one example (no batch dimension).

    Label maps (`label_maps`) are padded to ``image_hw`` with 255 by the caller; return the
    other fields.

    Args:
      ex: the augmented example, resized to fit ``image_hw`` (its image is at the top left).
      image_hw: the batch's (H, W).
      max_boxes: slots for per-object annotations (``config.data.<name>.max_boxes``).
    """
    del ex, image_hw, max_boxes
    return {}

  def padding_targets(self) -> dict[str, Any]:
    """The task fields of an empty example (before `pad_targets`), for padding examples.

    Label maps are added empty by the caller.
    """
    return {}

  # ------------------------------------------------------------------------ embedded data

  def embedded_reader_args(self, root: str, split: str) -> dict[str, Any]:
    """Reader arguments (for `embedded_format`) of the embedded data of ``split`` under
    ``root`` (the embedded data folder)."""
    del root, split
    raise ValueError(f"task {self.name!r} has no embedded data")

  def write_embedded(self, root: str, split: str, rng: np.random.Generator,
                     pool: EmbeddedPool) -> None:
    """Writes the task's embedded data of ``split`` under ``root/<name>`` (when
    `embedded_data`); draws only from ``rng``."""
    del root, split, rng, pool
    raise NotImplementedError(f"task {self.name!r} writes no embedded data")

  # ------------------------------------------------------------------------ evaluation

  def evaluator(self, ctx: EvalContext) -> Evaluator:
    """A fresh `Evaluator` of one split."""
    raise NotImplementedError(f"task {self.name!r}: evaluator is not defined")

  def empty_submission(self) -> Any:
    """The task's empty submission section (when `submission_key` is set)."""
    return None

  # ------------------------------------------------------------------------ preview

  def prediction_example(self, ex: Mapping[str, np.ndarray],
                         prediction: Mapping[str, np.ndarray]) -> dict | None:
    """One fixed-shape example with its annotations replaced by the head's prediction for it
    (one row of ``predict``'s output), so `draw` shows the prediction (the evaluation gallery,
    ``tbgc_jax.trainer.evaluate.Evaluation.gallery``); None: the task is left out of it."""
    del ex, prediction
    return None

  def draw(self, image: np.ndarray, ex: Mapping[str, np.ndarray],
           num_classes: int) -> np.ndarray:
    """Draws the annotations of a fixed-shape example on ``image`` (uint8 RGB, padding
    already dimmed, label maps already overlaid) for the preview."""
    del ex, num_classes
    return image


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
