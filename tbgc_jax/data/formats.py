"""The registry of source formats: ``config.data.<task>.source.format`` -> reader.

A reader is a function ``reader(kwargs, ctx) -> RecordSet | source``: ``kwargs`` are the
split's reader arguments (``config.data.<task>.source.<split>``), ``ctx`` a `ReadContext`.
It returns a `tbgc_jax.data.spec.RecordSet` (the pipeline wraps it in a ``RecordSource``
that decodes records with the task's ``DataSpec.decode``) or a ready random-access source
(``__len__``, ``__getitem__`` -> example). The built-in formats (``coco``, ``tt100k``,
``bdd100k``, ``cls_list``, ``tfds`` in ``tbgc_jax.data.readers``; ``embedded`` in
``tbgc_jax.data.embedded``) register themselves on import; a new format is one function and
one `register_reader` line (docs/data.md, "Adding a format").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from tbgc_jax.data.spec import DataSpec


@dataclasses.dataclass(frozen=True)
class ReadContext:
  """What a reader gets besides its arguments.

  Attributes:
    spec: the task's data spec.
    split: the split read ("train", "val", ...).
    source: the task's whole ``source`` section (``format``, ``root``, the splits).
    num_classes, policy, deep_check, allow_outside_root: the task section's fields.
  """

  spec: DataSpec
  split: str
  source: Mapping[str, Any]
  num_classes: int
  policy: str = "strict"
  deep_check: bool = False
  allow_outside_root: bool = False

  @property
  def checks(self) -> dict[str, Any]:
    """``policy``, ``deep_check`` and ``allow_outside_root`` as keyword arguments."""
    return {"policy": self.policy, "deep_check": self.deep_check,
            "allow_outside_root": self.allow_outside_root}


Reader = Callable[[Mapping[str, Any], ReadContext], Any]
_READERS: dict[str, Reader] = {}


def register_reader(name: str, reader: Reader, *, replace: bool = False) -> Reader:
  """Registers ``reader`` under the format name ``name``; returns it.

  Raises:
    ValueError: ``name`` is taken (unless ``replace``) or not a non-empty string.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_reader: the format name must be a non-empty string, got "
                     f"{name!r}")
  if name in _READERS and not replace:
    raise ValueError(f"source format {name!r} is already registered (replace=True to "
                     "replace it)")
  _READERS[name] = reader
  return reader


def unregister_reader(name: str) -> None:
  """Removes a format from the registry."""
  if name not in _READERS:
    raise KeyError(f"source format {name!r} is not registered")
  del _READERS[name]


def get_reader(name: str) -> Reader:
  """The reader of a registered format."""
  try:
    return _READERS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown source format {name!r}; registered formats: "
                     f"{format_names()}") from None


def format_names() -> tuple[str, ...]:
  """The registered formats, in registration order."""
  return tuple(_READERS)
