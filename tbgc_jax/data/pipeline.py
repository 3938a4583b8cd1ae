"""grain pipelines per task: source -> per-epoch shuffle -> augmentation -> fixed-shape batch.

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

from tbgc_jax.data import embedded, readers
from tbgc_jax.data.augment import build_augment, build_chain
from tbgc_jax.data.batching import pad_example, padding_example
from tbgc_jax.data.records import DataValidationError, RecordSource
from tbgc_jax.schema import TASKS

_log = logging.getLogger(__name__)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  try:
    return cfg[key]
  except (KeyError, AttributeError):
    return default


def make_source(task_cfg: Any, task: str, split: str) -> Any:
  """Reads (and validates) the records of one task and split; returns a random-access source.

  Args:
    task_cfg: a task section (``data.det`` / ``data.seg`` / ``data.cls``).
    task: "det", "seg" or "cls".
    split: key under ``task_cfg.source`` ("train" or "val").

  Returns:
    A ``RecordSource`` (or ``TfdsClsSource``) with ``__len__``/``__getitem__`` -> example.
    A detection source also has ``category_ids`` (``category_ids[label]`` = the annotation
    file's category id, for ``category_id`` in exports), ``category_map``, ``class_names``
    and, for COCO files, ``annotation_file`` (evaluation scores against it).
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  src = task_cfg["source"]
  fmt = src["format"]
  kwargs = dict(_get(src, split, None) or {})
  policy = _get(task_cfg, "policy", "strict")
  deep = bool(_get(task_cfg, "deep_check", False))
  outside = bool(_get(task_cfg, "allow_outside_root", False))
  nc = int(task_cfg["num_classes"])
  if fmt == "embedded":
    kwargs = embedded.reader_args(task, split, _get(src, "root", "") or None)
    fmt = {"det": "coco", "seg": "bdd100k", "cls": "cls_list"}[task]
  if fmt == "tfds":
    if task != "cls":
      raise ValueError(f"source format 'tfds' is for task 'cls', got task {task!r}")
    return readers.TfdsClsSource(**kwargs)
  cat_ids = names = annotation_file = None
  if task == "det" and fmt in ("coco", "tt100k"):
    reader = readers.read_coco if fmt == "coco" else readers.read_tt100k
    result = reader(**kwargs, policy=policy, deep_check=deep, allow_outside_root=outside)
    records, names, cat_ids = result.records, result.class_names, result.category_ids
    if len(names) != nc:
      raise ValueError(f"{kwargs}: expected {nc} categories (data.det.num_classes), "
                       f"got {len(names)}")
    if fmt == "coco":
      annotation_file = kwargs["ann_file"]
  elif task == "seg" and fmt == "bdd100k":
    records = readers.read_bdd100k_seg(**kwargs, num_classes=nc, policy=policy, deep_check=deep,
                                       allow_outside_root=outside)
  elif task == "cls" and fmt == "cls_list":
    records = readers.read_cls_list(**kwargs, num_classes=nc, policy=policy, deep_check=deep,
                                    allow_outside_root=outside)
  else:
    raise ValueError(f"source format {fmt!r} is not available for task {task!r}")
  if not records:
    raise ValueError(f"{task}/{split}: no records left after reading {kwargs}")
  source = RecordSource(records, task, nc, int(_get(task_cfg, "min_decode_side", 0) or 0),
                        category_ids=cat_ids, class_names=names,
                        annotation_file=annotation_file)
  if task == "det":
    max_boxes = int(task_cfg["max_boxes"])
    over = sum(len(r.labels) > max_boxes for r in records)
    if over:
      _log.warning("%s/%s: %d of %d records have more than max_boxes=%d boxes; the extra "
                   "boxes are dropped (counted in batching.box_overflow_count())", task, split,
                   over, len(records), max_boxes)
  return source


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
  """

  source: Any
  augment: Any
  task: str
  image_size: tuple[int, int]
  max_boxes: int
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
        ex = pad_example(self.example(epoch, record), self.task, self.image_size,
                         self.max_boxes)
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
  max_boxes: int

  def map(self, element: int) -> dict[str, np.ndarray]:
    i = int(element)
    if i >= len(self.source):
      return padding_example(self.task, self.image_size, self.max_boxes)
    try:
      ex = self.transform.random_map(self.source[i], np.random.default_rng(0))
    except Exception as e:  # noqa: BLE001 - name the record whatever the error
      raise DataValidationError(
          f"{self.task} eval: {_describe(self.source, i)}: {type(e).__name__}: {e}") from e
    return pad_example(ex, self.task, self.image_size, self.max_boxes)


def train_dataset(task_cfg: Any, task: str, *, seed: int, num_epochs: int,
                  batch_size: int | None = None, shard_index: int = 0, shard_count: int = 1,
                  source: Any = None) -> grain.MapDataset:
  """Training batches of one task over ``num_epochs`` epochs, as a ``grain.MapDataset``.

  Args:
    task_cfg: the task section of the data config.
    task: "det", "seg" or "cls".
    seed: data seed (shuffle and augmentation).
    num_epochs: epochs to run (also the curriculum horizon).
    batch_size: examples per batch on this host (default ``task_cfg.batch_size``).
    shard_index: this host's part of each global batch (multi-host data parallelism).
    shard_count: number of hosts; the global batch (``batch_size * shard_count`` examples)
      is the same whatever the number of hosts.
    source: a ready source (default ``make_source(task_cfg, task, "train")``).

  Returns:
    ``len(ds)`` batches (``drop_remainder``) of fixed-shape numpy dicts, with ``skipped``
    (int32 per example: unreadable records passed over under ``task_cfg.policy == "skip"``).
  """
  source = source if source is not None else make_source(task_cfg, task, "train")
  batch_size = int(batch_size or task_cfg["batch_size"])
  aug = build_augment(task_cfg["augment"], source)
  epoch_len = len(source)
  fn = TrainExample(source, aug, task, tuple(task_cfg["image_size"]),
                    int(_get(task_cfg, "max_boxes", 0) or 0), int(seed), epoch_len,
                    int(num_epochs), _get(task_cfg, "policy", "strict"))
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


def train_iterator(task_cfg: Any, task: str, *, seed: int, num_epochs: int,
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
  ds = train_dataset(task_cfg, task, seed=seed, num_epochs=num_epochs, batch_size=batch_size,
                     shard_index=shard_index, shard_count=shard_count, source=source)
  return _iterate(ds, num_workers, read_threads, prefetch)


def eval_dataset(task_cfg: Any, task: str, *, split: str = "val", batch_size: int | None = None,
                 source: Any = None) -> grain.MapDataset:
  """Evaluation batches: file order, deterministic resize, last batch padded (valid=False)."""
  source = source if source is not None else make_source(task_cfg, task, split)
  batch_size = int(batch_size or task_cfg["batch_size"])
  n = len(source)
  padded = math.ceil(n / batch_size) * batch_size
  fn = EvalExample(source, build_chain(task_cfg["eval_augment"]), task,
                   tuple(task_cfg["eval_image_size"]),
                   int(_get(task_cfg, "max_boxes", 0) or 0))
  return grain.MapDataset.range(padded).map(fn).batch(batch_size, drop_remainder=True)


def eval_iterator(task_cfg: Any, task: str, *, split: str = "val",
                  batch_size: int | None = None, num_workers: int = 0,
                  read_threads: int | None = None, prefetch: int | None = None,
                  source: Any = None) -> grain.DatasetIterator:
  """Iterator over ``eval_dataset(...)`` with ``num_workers`` processes (order preserved)."""
  ds = eval_dataset(task_cfg, task, split=split, batch_size=batch_size, source=source)
  return _iterate(ds, num_workers, read_threads, prefetch)
