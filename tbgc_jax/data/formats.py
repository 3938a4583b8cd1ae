"""The registry of source formats: ``config.data.<task>.source.format`` -> reader.

A reader is a function ``reader(kwargs, ctx) -> RecordSet | source``: ``kwargs`` are the
split's reader arguments (``config.data.<task>.source.<split>``), ``ctx`` a `ReadContext`.
It returns a `tbgc_jax.data.spec.RecordSet` (the pipeline wraps it in a ``RecordSource``
that decodes records with the task's ``DataSpec.decode``) or a ready random-access source
(``__len__``, ``__getitem__`` -> example). The built-in formats (``coco``, ``tt100k``,
``bdd100k``, ``cls_list``, ``tfds`` in ``tbgc_jax.data.readers``; ``embedded`` in
``tbgc_jax.data.embedded``) register themselves on import; a new format is one function and
one `register_reader` line (docs/data.md, "Adding a format"); ``like=`` an existing format
makes every task that reads that one read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
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
_LIKE: dict[str, str] = {}


def register_reader(name: str, reader: Reader, *, like: str | None = None,
                    replace: bool = False) -> Reader:
  """Registers ``reader`` under the format name ``name``; returns it.

  Args:
    name: the format's name (``config.data.<task>.source.format``).
    reader: ``reader(kwargs, ctx) -> RecordSet | source``.
    like: a format whose records this one's are like (the same record type): every task
      that reads ``like`` (``DataSpec.formats``) reads ``name`` too.
    replace: allow replacing a format of the same name.

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
  _LIKE.pop(name, None)
  if like is not None:
    _LIKE[name] = like
  return reader


def unregister_reader(name: str) -> None:
  """Removes a format from the registry."""
  if name not in _READERS:
    raise KeyError(f"source format {name!r} is not registered")
  del _READERS[name]
  _LIKE.pop(name, None)


def reads(formats: Sequence[str], name: str) -> bool:
  """Whether a task reading ``formats`` reads the format ``name`` (itself or, through the
  ``like`` of its registration, a format like one of them)."""
  seen = set()
  while name is not None and name not in seen:
    if name in formats:
      return True
    seen.add(name)
    name = _LIKE.get(name)
  return False


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
