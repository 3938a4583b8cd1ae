"""`DataSpec`: what the data pipeline knows of one task.

The tasks layer (``tbgc_jax.tasks``) gives each task a `DataSpec` (``TaskSpec.data``) and the
trainer hands it to the pipeline (``tbgc_jax.data.pipeline``), which never looks a task up
by name. A spec says:

- which source formats the task reads (`DataSpec.formats`, names in the reader registry
  ``tbgc_jax.data.formats``) and how one record becomes the task's example fields
  (`DataSpec.decode`);
- the kinds of those fields (`DataSpec.fields`, ``tbgc_jax.data.fields``), from which the
  augmentations move them and batching pads them;
- the task's embedded data (`DataSpec.embedded_format`, `DataSpec.embedded_reader_args`,
  `DataSpec.write_embedded`).

A spec is pickled to grain's worker processes with the sources and transforms that hold it:
define it at module level.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from tbgc_jax.data.fields import Kind


@dataclasses.dataclass(frozen=True)
class RecordSet:
  """What a reader returns when a `RecordSource` is to decode its records.

  Attributes:
    records: one record per example (what `DataSpec.decode` takes).
    category_ids: the file's category id of each contiguous label, or None (``range``).
    class_names: the name of each label, or None.
    annotation_file: the annotation file evaluation scores against, or None.
  """

  records: Sequence[Any]
  category_ids: Sequence[int] | None = None
  class_names: Sequence[str] | None = None
  annotation_file: str | None = None


class EmbeddedPool(NamedTuple):
  """Material of the embedded data (`DataSpec.write_embedded`): background photos (uint8
  RGB), 8x8 digits (0..16) of the split and their classes."""

  backgrounds: list[np.ndarray]
  digits: np.ndarray
  targets: np.ndarray


class DataSpec:
  """The data part of one task: subclass, set the attributes, override what the task needs.

  Attributes:
    name: the task's name (messages, the embedded data folder, the default `stream`).
    formats: the source formats (``config.data.<name>.source.format``) whose records
      `decode` takes, besides ``"embedded"`` (the task's `embedded_format`).
    reduced_decode: the source may decode large images at 1/2, 1/4 or 1/8 size
      (``min_decode_side``); `decode` then scales the annotations to the decoded image.
    rng_stream: the task's index in the random streams (data seed ``seed + 1000 * (stream +
      1)``, embedded data); default: derived from the name.
    embedded_format: the reader format of the task's embedded data, or None.
    embedded_data: `write_embedded` writes data of the task's own (else its embedded data,
      if any, is another task's: `embedded_reader_args` points there).
  """

  name: str = ""
  formats: tuple[str, ...] = ()
  reduced_decode: bool = False
  rng_stream: int | None = None
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

  def fields(self, task_cfg: Any) -> dict[str, Kind]:
    """The example fields `decode` makes and their kinds, given the task's data section
    (``config.data.<name>``: e.g. the slots of a `Boxes` field)."""
    del task_cfg
    return {}

  def decode(self, record: Any, image: np.ndarray, orig_hw: tuple[int, int],
             num_classes: int) -> dict[str, Any]:
    """The task fields of an example (besides ``image``, ``index``, ``orig_hw``).

    Args:
      record: one record of the reader.
      image: the decoded image (uint8 [h, w, 3]; smaller than ``orig_hw`` under
        `reduced_decode`).
      orig_hw: the image's size on disk.
      num_classes: the task's class count.
    """
    raise NotImplementedError(f"task {self.name!r}: decode is not defined")

  def check_source(self, source: Any, task_cfg: Any, split: str) -> None:
    """Checks (or warns about) a freshly read source against the task's data section."""
    del source, task_cfg, split

  def embedded_requires(self) -> Sequence[DataSpec]:
    """The specs whose embedded data this task reads: itself when `embedded_data` (else
    none); override to read another task's (e.g. ``(DetectionData(),)``)."""
    return (self,) if self.embedded_data else ()

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
