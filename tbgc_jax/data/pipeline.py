"""grain pipelines per task: source -> per-epoch shuffle -> augmentation -> fixed-shape batch.

What differs between tasks (formats and records, decoding, the kinds of the example fields)
is the task's data spec (``tbgc_jax.data.spec.DataSpec``, the ``data`` part of a task in
``tbgc_jax.tasks``); every function here takes it with the task's data section
(``config.data.<task>``).

Training: ``train_dataset`` builds a ``grain.MapDataset`` of batches over ``num_epochs``
epochs (reshuffled every epoch, batches may straddle epoch ends);
``train_iterator`` adds ``grain`` worker processes and returns a checkpointable iterator
(``it.get_state()`` / ``it.set_state(state)``; restoring needs the same worker count).

Determinism: the augmentation of record ``i`` in epoch ``e`` draws only from
``np.random.default_rng([seed, e, i])``, so a sample is a function of (seed, epoch, index),
whatever the worker count or the position in the shuffled order. Branch probabilities
follow the training progress ``e / num_epochs``.

Evaluation: ``eval_dataset`` / ``eval_iterator``: deterministic resize, file order, the last
batch padded with ``valid=False`` examples.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import grain
import numpy as np

from tbgc_jax.data import embedded, readers  # noqa: F401 - they register their formats
from tbgc_jax.data.augment import build_augment, build_chain
from tbgc_jax.data.batching import pad_example, padding_example
from tbgc_jax.data.fields import Fields, as_fields
from tbgc_jax.data.formats import ReadContext, get_reader, reads
from tbgc_jax.data.records import DataValidationError, RecordSource
from tbgc_jax.data.spec import DataSpec, RecordSet
from tbgc_jax.presets import config_value

_log = logging.getLogger(__name__)


def _spec(spec: Any) -> DataSpec:
  if not isinstance(spec, DataSpec):
    raise TypeError(f"expected a task's DataSpec (tbgc_jax.tasks: get_task(name).data), got "
                    f"{spec!r}")
  return spec


def fields(task_cfg: Any, spec: DataSpec) -> Fields:
  """The task's example fields and their kinds for its data section, as ``(key, kind)``."""
  return as_fields(_spec(spec).fields(task_cfg))


def make_source(task_cfg: Any, spec: DataSpec, split: str) -> Any:
  """Reads (and validates) the records of one task and split; returns a random-access source.

  Args:
    task_cfg: a task section (``data.det`` / ``data.seg`` / ``data.cls`` / ...).
    spec: the task's data spec; the format (``task_cfg.source.format``) must be one of its
      ``formats`` (or registered ``like`` one of them) or ``"embedded"``; the registered
      reader reads it (``tbgc_jax.data.formats``).
    split: key under ``task_cfg.source`` ("train" or "val").

  Returns:
    A ``RecordSource`` (or ``TfdsClsSource``) with ``__len__``/``__getitem__`` -> example.
    A detection source also has ``category_ids`` (``category_ids[label]`` = the annotation
    file's category id, for ``category_id`` in exports), ``category_map``, ``class_names``
    and, for COCO files, ``annotation_file`` (evaluation scores against it).
  """
  spec = _spec(spec)
  task = spec.name
  src = task_cfg["source"]
  fmt = src["format"]
  if fmt != "embedded" and not reads(spec.formats, fmt):
    raise ValueError(f"source format {fmt!r} is not available for task {task!r} (its "
                     f"formats: {('embedded', *spec.formats)})")
  kwargs = dict(config_value(src, split, None) or {})
  nc = int(task_cfg["num_classes"])
  ctx = ReadContext(spec, split, src, nc, policy=config_value(task_cfg, "policy", "strict"),
                    deep_check=bool(config_value(task_cfg, "deep_check", False)),
                    allow_outside_root=bool(config_value(task_cfg, "allow_outside_root", False)))
  result = get_reader(fmt)(kwargs, ctx)
  if not isinstance(result, RecordSet):
    return result  # a ready source (e.g. TFDS)
  if result.class_names is not None and len(result.class_names) != nc:
    raise ValueError(f"{kwargs}: expected {nc} categories (data.{task}.num_classes), got "
                     f"{len(result.class_names)}")
  if not result.records:
    raise ValueError(f"{task}/{split}: no records left after reading {kwargs}")
  source = RecordSource(result.records, spec, nc,
                        int(config_value(task_cfg, "min_decode_side", 0) or 0),
                        category_ids=result.category_ids, class_names=result.class_names,
                        annotation_file=result.annotation_file)
  spec.check_source(source, task_cfg, split)
  return source


def augmentation(task_cfg: Any, spec: DataSpec, source: Any = None
                 ) -> grain.transforms.RandomMap:
  """The training augmentation of a task section (``task_cfg.augment``) for its fields."""
  return build_augment(task_cfg["augment"], source, fields=fields(task_cfg, spec))


def eval_transform(task_cfg: Any, spec: DataSpec) -> grain.transforms.RandomMap:
  """The evaluation transform of a task section (``task_cfg.eval_augment``)."""
  return build_chain(task_cfg["eval_augment"], fields=fields(task_cfg, spec))


def _describe(source: Any, record: int) -> str:
  """``"record <i> (<file>)"``: where an example comes from, for error messages."""
  rec = getattr(source, "records", None)
  path = getattr(rec[record], "image_path", None) if rec is not None else None
  return f"record {record}" + (f" ({path})" if path else "")


@dataclasses.dataclass(frozen=True)
class TrainExample(grain.transforms.Map):
  """(stream position, record index) -> augmented fixed-shape example, rng from (seed, epoch,
  record index).

  A record that fails to read or augment raises an error naming the task, the record and its
  file (``policy="strict"``), or (``policy="skip"``) is replaced by the next record that
  works, deterministically; the example's ``skipped`` field counts the records passed over
  (0 for most), so the trainer can count skips across grain worker processes.

  ``task`` names the task in messages; ``fields`` are its fields and their kinds.
  """

  source: Any
  augment: Any
  task: str
  image_size: tuple[int, int]
  fields: Fields
  seed: int
  epoch_len: int
  num_epochs: int
  policy: str = "strict"

  def example(self, epoch: int, record: int) -> dict[str, Any]:
    """The augmented (variable-shape) example of ``record`` in ``epoch``."""
    rng = np.random.default_rng([self.seed, epoch, record])
    ex = self.source[record]
    ex["progress"] = epoch / max(self.num_epochs, 1)
    return self.augment.random_map(ex, rng)

  def map(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
    """``(position in the global stream, record index)`` -> fixed-shape example."""
    position, first = element
    epoch, n = position // self.epoch_len, len(self.source)
    for skipped in range(n):
      record = (int(first) + skipped) % n
      try:
        ex = pad_example(self.example(epoch, record), self.fields, self.image_size)
      except Exception as e:  # noqa: BLE001 - any reader or augmentation error
        where = f"{self.task}: {_describe(self.source, record)}, epoch {epoch}"
        if self.policy != "skip":
          raise DataValidationError(f"{where}: {type(e).__name__}: {e}") from e
        _log.warning("%s skipped (policy 'skip'): %s: %s", where, type(e).__name__, e)
        continue
      ex["skipped"] = np.int32(skipped)
      return ex
    raise DataValidationError(f"{self.task}: every one of the {n} records failed to load")


@dataclasses.dataclass(frozen=True)
class _GlobalPosition(grain.transforms.Map):
  """This host's ``q``-th example -> ``(p, record)``: its position ``p`` in the global stream.

  The global batch ``k`` is positions ``[k * G, (k + 1) * G)`` of one shuffled stream, with
  ``G = local_batch * shard_count``; host ``i`` takes the ``local_batch`` positions from
  ``k * G + i * local_batch``. So the global batches, and every example in them, do not
  depend on how many hosts share them.
  """

  stream: Any  # MapDataset of record indices in global order
  local_batch: int
  shard_index: int
  shard_count: int

  def map(self, element: int) -> tuple[int, int]:
    k, j = divmod(int(element), self.local_batch)
    p = (k * self.shard_count + self.shard_index) * self.local_batch + j
    return p, int(self.stream[p])


@dataclasses.dataclass(frozen=True)
class EvalExample(grain.transforms.Map):
  """Position -> deterministic fixed-shape example (``valid=False`` past the end)."""

  source: Any
  transform: Any
  task: str
  image_size: tuple[int, int]
  fields: Fields

  def map(self, element: int) -> dict[str, np.ndarray]:
    i = int(element)
    if i >= len(self.source):
      return padding_example(self.fields, self.image_size)
    try:
      ex = self.transform.random_map(self.source[i], np.random.default_rng(0))
    except Exception as e:  # noqa: BLE001 - name the record whatever the error
      raise DataValidationError(
          f"{self.task} eval: {_describe(self.source, i)}: {type(e).__name__}: {e}") from e
    return pad_example(ex, self.fields, self.image_size)


def train_dataset(task_cfg: Any, spec: DataSpec, *, seed: int, num_epochs: int,
                  batch_size: int | None = None, shard_index: int = 0, shard_count: int = 1,
                  source: Any = None) -> grain.MapDataset:
  """Training batches of one task over ``num_epochs`` epochs, as a ``grain.MapDataset``.

  Args:
    task_cfg: the task section of the data config.
    spec: the task's data spec.
    seed: data seed (shuffle and augmentation).
    num_epochs: epochs to run (also the curriculum horizon).
    batch_size: examples per batch on this host (default ``task_cfg.batch_size``).
    shard_index: this host's part of each global batch (multi-host data parallelism).
    shard_count: number of hosts; the global batch (``batch_size * shard_count`` examples)
      is the same whatever the number of hosts.
    source: a ready source (default ``make_source(task_cfg, spec, "train")``).

  Returns:
    ``len(ds)`` batches (``drop_remainder``) of fixed-shape numpy dicts, with ``skipped``
    (int32 per example: unreadable records passed over under ``task_cfg.policy == "skip"``)
    and the drop counters of the fields (``num_dropped_<field>``).
  """
  spec = _spec(spec)
  source = source if source is not None else make_source(task_cfg, spec, "train")
  batch_size = int(batch_size or task_cfg["batch_size"])
  aug = augmentation(task_cfg, spec, source)
  epoch_len = len(source)
  fn = TrainExample(source, aug, spec.name, tuple(task_cfg["image_size"]),
                    fields(task_cfg, spec), int(seed), epoch_len, int(num_epochs),
                    config_value(task_cfg, "policy", "strict"))
  stream = grain.MapDataset.range(epoch_len).shuffle(seed=int(seed)).repeat(int(num_epochs))
  global_batches = len(stream) // (batch_size * shard_count)
  ds = grain.MapDataset.range(global_batches * batch_size).map(
      _GlobalPosition(stream, batch_size, shard_index, shard_count)).map(fn)
  return ds.batch(batch_size, drop_remainder=True)


def _init_worker(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: one OpenCV thread per worker process (workers ~ cores)."""
  del worker_index, worker_count
  import cv2

  cv2.setNumThreads(1)


def _iterate(ds: grain.MapDataset, num_workers: int, read_threads: int | None,
             prefetch: int | None) -> grain.DatasetIterator:
  # grain's defaults (16 threads, 500 prefetched elements per process) would hold up to 500
  # *batches* per process here (~2 GB at the challenge seg size).
  opts = grain.ReadOptions(num_threads=read_threads or 2, prefetch_buffer_size=prefetch or 8)
  it_ds = ds.to_iter_dataset(opts)
  if num_workers > 0:
    # grain's worker processes read absl flags; outside ``absl.app.run`` they are unparsed
    # and grain raises UnparsedFlagAccessError. Use the defaults in that case.
    from absl import flags

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                              worker_init_fn=_init_worker)
  return iter(it_ds)


def train_iterator(task_cfg: Any, spec: DataSpec, *, seed: int, num_epochs: int,
                   batch_size: int | None = None, num_workers: int = 0,
                   read_threads: int | None = None, prefetch: int | None = None,
                   shard_index: int = 0, shard_count: int = 1, source: Any = None
                   ) -> grain.DatasetIterator:
  """Checkpointable iterator over ``train_dataset(...)`` with ``num_workers`` processes.

  Save ``it.get_state()`` beside the model; ``it.set_state(state)`` on a fresh iterator
  built with the same arguments (same ``num_workers``) resumes with exactly the batches an
  uninterrupted run would have produced. ``read_threads`` (default 2) and ``prefetch``
  (default 8 batches) set grain's per-process read threads and prefetch buffer.
  """
  ds = train_dataset(task_cfg, spec, seed=seed, num_epochs=num_epochs, batch_size=batch_size,
                     shard_index=shard_index, shard_count=shard_count, source=source)
  return _iterate(ds, num_workers, read_threads, prefetch)


def eval_dataset(task_cfg: Any, spec: DataSpec, *, split: str = "val",
                 batch_size: int | None = None, source: Any = None) -> grain.MapDataset:
  """Evaluation batches: file order, deterministic resize, last batch padded (valid=False)."""
  spec = _spec(spec)
  source = source if source is not None else make_source(task_cfg, spec, split)
  batch_size = int(batch_size or task_cfg["batch_size"])
  n = len(source)
  padded = math.ceil(n / batch_size) * batch_size
  fn = EvalExample(source, eval_transform(task_cfg, spec), spec.name,
                   tuple(task_cfg["eval_image_size"]), fields(task_cfg, spec))
  return grain.MapDataset.range(padded).map(fn).batch(batch_size, drop_remainder=True)


def eval_iterator(task_cfg: Any, spec: DataSpec, *, split: str = "val",
                  batch_size: int | None = None, num_workers: int = 0,
                  read_threads: int | None = None, prefetch: int | None = None,
                  source: Any = None) -> grain.DatasetIterator:
  """Iterator over ``eval_dataset(...)`` with ``num_workers`` processes (order preserved)."""
  ds = eval_dataset(task_cfg, spec, split=split, batch_size=batch_size, source=source)
  return _iterate(ds, num_workers, read_threads, prefetch)
