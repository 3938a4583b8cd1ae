"""The gradient-method registry: one table from method names to factories and their checks.

A gradient method is a factory with the signature

.. code-block:: python

  def my_method(backbone_mask=None, *, tasks, **hyperparameters) -> optax.GradientTransformation

whose transform's ``update`` takes ``{task: gradient pytree shaped like params}`` and returns one
params-shaped update (like `tbgc_jax.tbgc`). Methods that need the per-task losses return an
``optax.GradientTransformationExtraArgs`` whose ``update`` takes them as the keyword argument
``losses={task: scalar loss}``; every other method ignores that argument, so callers (the
trainer) pass it to all. Adding a method is one factory plus one ``register`` line; the
trainer's ``config.grad.method`` then accepts its name.
"""

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optax

from tbgc_jax._src.base import check_tasks
from tbgc_jax._src.masks import MaskOrFn

Check = tuple[Callable[[Any], bool], str]

POSITIVE: Check = (lambda x: x > 0, "> 0")
NON_NEGATIVE: Check = (lambda x: x >= 0, ">= 0")
UNIT_INTERVAL: Check = (lambda x: 0 <= x <= 1, "in [0, 1]")

# Factory parameters that are not hyperparameters.
_STRUCTURAL = ("backbone_mask", "tasks")


class Method(NamedTuple):
  """One registry entry (see `register`)."""

  name: str
  factory: Callable[..., optax.GradientTransformation]
  hyperparameters: tuple[str, ...]  # the factory's hyperparameter names
  required: tuple[str, ...]  # those without a default
  checks: Mapping[str, Check]  # name -> (predicate on a concrete value, its description)
  uses_losses: bool  # update takes ``losses={task: loss}``


_METHODS: dict[str, Method] = {}


def register(
    name: str,
    factory: Callable[..., optax.GradientTransformation] | None = None,
    *,
    checks: Mapping[str, Check] | None = None,
    uses_losses: bool = False,
) -> Callable[..., Any]:
  """Adds a gradient method to the registry; usable as a decorator.

  Args:
    name: the method's name (``config.grad.method`` in the trainer).
    factory: ``factory(backbone_mask=None, *, tasks, **hyperparameters)``. Its keyword
      parameters other than ``backbone_mask`` and ``tasks`` are the method's hyperparameters.
      Omit it to use ``register`` as a decorator.
    checks: ``{hyperparameter: (predicate, description)}``, run by `make_method` and
      `check_method` on concrete values, e.g. ``{"max_norm": (lambda x: x > 0, "> 0")}``
      (``POSITIVE``, ``NON_NEGATIVE`` and ``UNIT_INTERVAL`` are predefined).
    uses_losses: the transform's ``update`` needs ``losses={task: loss}``.

  Returns:
    ``factory`` (or a decorator registering its argument), unchanged.

  Examples:
    >>> import optax, tbgc_jax
    >>> @tbgc_jax.register("halved_sum", checks={"factor": (lambda x: x > 0, "> 0")})
    ... def halved_sum(backbone_mask=None, *, tasks, factor=0.5):
    ...   del backbone_mask
    ...   return optax.chain(tbgc_jax.sum_tasks(tasks=tasks), optax.scale(factor))
    >>> "halved_sum" in tbgc_jax.method_names()
    True
    >>> tbgc_jax.unregister("halved_sum")
  """
  def add(fn):
    if name in _METHODS:
      raise ValueError(f"register: a gradient method named {name!r} exists already")
    params = inspect.signature(fn).parameters
    missing = [p for p in _STRUCTURAL if p not in params]
    if missing:
      raise TypeError(f"register: factory of {name!r} must accept {missing}")
    hparams = tuple(p for p in params if p not in _STRUCTURAL
                    and params[p].kind not in (inspect.Parameter.VAR_KEYWORD,
                                               inspect.Parameter.VAR_POSITIONAL))
    unknown = set(checks or {}) - set(hparams)
    if unknown:
      raise ValueError(f"register: checks of {name!r} name unknown hyperparameters {unknown}")
    required = tuple(p for p in hparams if params[p].default is inspect.Parameter.empty)
    _METHODS[name] = Method(name, fn, hparams, required, dict(checks or {}), uses_losses)
    return fn

  return add if factory is None else add(factory)


def unregister(name: str) -> None:
  """Removes a method from the registry (for tests and interactive use)."""
  _METHODS.pop(name)


def method_names() -> tuple[str, ...]:
  """The registered method names, sorted."""
  return tuple(sorted(_METHODS))


def get_method(name: str, *, where: str = "method") -> Method:
  """The registry entry of ``name``; a ValueError listing the names if there is none."""
  if name not in _METHODS:
    raise ValueError(f"{where} must be one of {method_names()}, got {name!r}")
  return _METHODS[name]


def check_method(name: str, hyperparameters: Mapping[str, Any], *, prefix: str = "") -> Method:
  """Validates a method name and concrete hyperparameters without building anything.

  Args:
    name: a registered method name.
    hyperparameters: values to pass to its factory; every name must be a hyperparameter of
      the method, and every required one must be present.
    prefix: prepended to the names in error messages (the trainer uses ``"config.grad."``).

  Returns:
    The method's registry entry.
  """
  method = get_method(name, where=f"{prefix}method")
  unknown = sorted(set(hyperparameters) - set(method.hyperparameters))
  if unknown:
    raise ValueError(f"{prefix}{unknown[0]} is not a hyperparameter of method {name!r} "
                     f"(it takes {method.hyperparameters})")
  for p in method.required:
    if p not in hyperparameters:
      raise ValueError(f"{prefix}{p} is required by method {name!r}")
  for p, (ok, description) in method.checks.items():
    if p in hyperparameters and not ok(hyperparameters[p]):
      raise ValueError(f"{prefix}{p} must be {description} with method {name!r}, got "
                       f"{hyperparameters[p]!r}")
  return method


def make_method(
    name: str, backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
    **hyperparameters: Any,
) -> optax.GradientTransformationExtraArgs:
  """Builds a registered gradient method by name, after `check_method`.

  Args:
    name: a registered method name (see `method_names`).
    backbone_mask: the backbone mask (pytree of bools or callable of params).
    tasks: the task names.
    **hyperparameters: the method's hyperparameters.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: its ``update`` accepts (and, for methods
    that do not use them, ignores) ``losses={task: loss}``.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.make_method("tbgc", {"w": True}, tasks=("a", "b"), max_norm=0.1)
    >>> grads = {"a": {"w": jnp.full(4, 3.0)}, "b": {"w": jnp.ones(4)}}
    >>> losses = {"a": 1.0, "b": 2.0}
    >>> out, _ = tx.update(grads, tx.init({"w": jnp.zeros(4)}), losses=losses)
    >>> [round(x, 6) for x in out["w"].tolist()]  # each task rescaled to norm 0.1, summed
    [0.1, 0.1, 0.1, 0.1]
  """
  method = check_method(name, hyperparameters)
  check_tasks(tasks, f"method {name!r}")
  tx = method.factory(backbone_mask=backbone_mask, tasks=tasks, **hyperparameters)
  return optax.with_extra_args_support(tx)
