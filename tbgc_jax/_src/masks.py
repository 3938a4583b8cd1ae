"""Backbone masks: which parameter leaves belong to the shared backbone."""

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

MaskOrFn = Any | Callable[[Any], Any]


def path_mask(pattern: str) -> Callable[[Any], Any]:
  """Builds a backbone mask from parameter paths.

  A leaf is in the backbone when ``re.search(pattern, path)`` matches, where ``path`` joins the
  leaf's keys with ``/``: ``backbone/stages/0/conv/kernel`` for a nested dict, and
  ``backbone/stem/kernel/value`` for a Flax NNX ``State`` (whose leaves sit in a ``value``
  attribute).

  Args:
    pattern: a regular expression, e.g. ``r"^backbone/"`` or ``r"^(trunk|encoder)/"``.

  Returns:
    A function ``params -> mask`` (a pytree of Python bools shaped like ``params``), usable
    wherever a backbone mask is accepted.

  Examples:
    >>> import tbgc_jax
    >>> params = {"backbone": {"w": 1.0}, "heads": {"cls": {"w": 2.0}}}
    >>> tbgc_jax.path_mask(r"^backbone/")(params)
    {'backbone': {'w': True}, 'heads': {'cls': {'w': False}}}
  """
  regex = re.compile(pattern)

  def mask_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: regex.search(jax.tree_util.keystr(path, simple=True, separator="/"))
        is not None,
        params,
    )

  return mask_fn


def mask_leaves(backbone_mask: MaskOrFn, tree: Any, *, where: str) -> list[bool]:
  """Resolves a mask (pytree, prefix pytree or callable) to one Python bool per leaf of ``tree``.

  Args:
    backbone_mask: a pytree of bools shaped like ``tree`` or a prefix of it (a bool covers
      the whole subtree below it), or a callable ``tree -> such a pytree``.
    tree: the parameter-shaped pytree the mask must describe.
    where: name of the caller, for error messages.

  Returns:
    A list of bools, in the order of ``jax.tree.leaves(tree)``.
  """
  mask = backbone_mask(tree) if callable(backbone_mask) else backbone_mask
  try:
    full = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: m, sub), mask, tree,
        is_leaf=lambda x: isinstance(x, (bool, np.bool_)),
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{where}: backbone_mask does not match the parameter tree (it must have the same "
        f"structure, or be a prefix of it, with bool leaves): {e}") from e
  leaves = jax.tree.leaves(full)
  try:
    return [bool(m) for m in leaves]
  except jax.errors.ConcretizationTypeError as e:
    raise ValueError(
        f"{where}: backbone_mask leaves must be Python bools known at trace time, "
        "not traced arrays") from e


def backbone_selector(backbone_mask: MaskOrFn | None, *, where: str, default: bool
                      ) -> Callable[[Any], list[bool]]:
  """``tree -> one bool per leaf`` (`mask_leaves`), ``default`` everywhere for a None mask.

  Also ``selector.check_params(params)``: raises when a given mask selects no leaf.
  """
  def select(tree) -> list[bool]:
    if backbone_mask is None:
      return [default] * len(jax.tree.leaves(tree))
    return mask_leaves(backbone_mask, tree, where=where)

  def check_params(params) -> None:
    if backbone_mask is not None and not any(select(params)):
      raise ValueError(f"{where}: backbone_mask selects no parameter leaf as backbone")

  select.check_params = check_params
  return select
