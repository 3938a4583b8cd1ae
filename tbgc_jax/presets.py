"""Dataclass presets and their overrides from a config section.

Model configs (`tbgc_jax.models.internimage.InternImageConfig`, the DINO and Mask2Former
configs) are frozen dataclasses with named presets; a trainer config names a preset and may
override any of its fields. `override_fields` builds the config section that lists every
field (typed, None = keep the preset's), `with_overrides` applies it, `preset` looks a name up.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections


def preset(table: Mapping[str, Any], name: str, where: str) -> Any:
  """``table[name]``, or an error naming ``where`` and the known presets."""
  if name not in table:
    raise ValueError(f"{where}: unknown preset {name!r}, expected one of {sorted(table)}")
  return table[name]


def _field_type(annotation: Any) -> type:
  """The command-line type of a dataclass field: ``float | None`` -> float, tuples -> tuple."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
  return typing.get_origin(annotation) or annotation


def override_fields(config_cls: type, **values: Any) -> ml_collections.ConfigDict:
  """A config section for `with_overrides` holding every field of ``config_cls``.

  The fields in ``values`` are set; every other is None ("keep the preset's") but typed, so
  that any field can be set from the command line
  (``--config.model.det.overrides.loss_class=2.0``; tuples as ``'(1, 2, 3)'``).

  Raises:
    ValueError: if ``values`` names a field ``config_cls`` does not have.
  """
  hints = typing.get_type_hints(config_cls)
  names = [f.name for f in dataclasses.fields(config_cls)]
  unknown = set(values) - set(names)
  if unknown:
    raise ValueError(f"{config_cls.__name__} has no fields {sorted(unknown)}; expected among "
                     f"{sorted(names)}")
  return ml_collections.ConfigDict({
      name: ml_collections.FieldReference(values.get(name), field_type=_field_type(hints[name]))
      for name in names})


def with_overrides(preset: Any, overrides: Mapping[str, Any] | None, where: str) -> Any:
  """``preset`` (a frozen dataclass) with the fields in ``overrides`` replaced.

  Fields set to None keep the preset's value (`override_fields` lists every field so).
  Sequences become tuples (the dataclasses' type). An unknown field fails, naming ``where``
  (the config path of ``overrides``), the unknown names and the known ones.
  """
  overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
  known = {f.name for f in dataclasses.fields(preset)}
  unknown = set(overrides) - known
  if unknown:
    raise ValueError(f"{where}: unknown fields {sorted(unknown)}, expected among "
                     f"{sorted(known)}")
  overrides = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in overrides.items()}
  return dataclasses.replace(preset, **overrides)


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
  """``cfg[key]`` of a config section (ConfigDict or mapping), or ``default`` where the key is
  missing or its value is None (None means "not set" in the configs)."""
  try:
    value = cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value
