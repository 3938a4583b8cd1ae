"""The back-end-aware compile workarounds of the trainer: one place decides which are on.

Three forms of the train step compile far faster on XLA:CPU than the natural ones, and are
no help elsewhere (docs/performance.md has the CPU measurements, docs/accelerators.md the
table). Each is a field of ``config.backend``: ``"auto"`` (the default: on for the CPU
back-end only), True or False. `workarounds` resolves them once; `optim.make_optimizer`,
`step.make_train_step` and `model_factory.build_model` take the result.
"""

from typing import Any, NamedTuple

import jax


class Workarounds(NamedTuple):
  """Which compile workarounds the trainer uses (True: the workaround; False: the natural form).

  Attributes:
    flat_update: the optimizer update (gradient method + AdamW) runs on one flat vector per
      leaf group (`optim.flat_groups`) instead of on the parameter trees.
    own_head_grads: each task's gradient executable of the ``per_task_jit`` step
      differentiates the backbone and that task's head only, and the update fills zeros for
      the other heads; the natural form differentiates the whole parameter tree.
    dw_conv_by_shifts: the scanned InternImage blocks compute their depthwise conv as a sum
      of shifted products (`InternImageConfig.dw_conv_by_shifts`) instead of a grouped conv.
  """

  flat_update: bool
  own_head_grads: bool
  dw_conv_by_shifts: bool


NAMES = Workarounds._fields
AUTO = "auto"


def workarounds(config: Any, backend: str | None = None) -> Workarounds:
  """The workarounds ``config.backend`` asks for on ``backend``.

  Args:
    config: the trainer config; ``config.backend.<name>`` (absent: ``"auto"``) is ``"auto"``
      (on for the CPU back-end only), True or False, for each name of `Workarounds`.
    backend: the back-end the functions will run on (``"cpu"``, ``"gpu"``, ``"tpu"``); None:
      ``jax.default_backend()``. Lowering for another platform passes its back-end.

  Returns:
    The resolved `Workarounds`.

  Raises:
    ValueError: naming the field, for another value or an unknown field.

  Examples:
    >>> import ml_collections
    >>> config = ml_collections.ConfigDict({"backend": {"flat_update": False}})
    >>> workarounds(config, backend="cpu")
    Workarounds(flat_update=False, own_head_grads=True, dw_conv_by_shifts=True)
    >>> workarounds(config, backend="gpu")
    Workarounds(flat_update=False, own_head_grads=False, dw_conv_by_shifts=False)
  """
  backend = jax.default_backend() if backend is None else backend
  section = dict(config.get("backend", None) or {})
  unknown = sorted(set(section) - set(NAMES))
  if unknown:
    raise ValueError(f"config.backend.{unknown[0]} is not a workaround; config.backend takes "
                     f"{NAMES}")
  if "flat_update" in (config.get("optim", None) or {}):
    raise ValueError("config.optim.flat_update is not a field: the flat update is "
                     "config.backend.flat_update ('auto', True or False)")
  resolved = {}
  for name in NAMES:
    value = section.get(name, AUTO)
    if value is None or (isinstance(value, str) and value == AUTO):
      resolved[name] = backend == "cpu"
    elif isinstance(value, bool):
      resolved[name] = value
    else:
      raise ValueError(f"config.backend.{name} must be 'auto', True or False, got {value!r}")
  return Workarounds(**resolved)
