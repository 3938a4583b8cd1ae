"""Per-task losses and gradients: one ``jax.value_and_grad`` per task."""

from collections.abc import Callable, Mapping
from typing import Any

import jax


def per_task_value_and_grad(
    loss_fns: Mapping[str, Callable[..., Any]], *, has_aux: bool = False
) -> Callable[..., tuple[Any, dict[str, Any]]]:
  """Turns per-task loss functions into one function returning per-task losses and gradients.

  Each task runs its own forward and ``jax.value_and_grad`` on its own batch, as in the
  paper's Algorithm 1, producing the ``{task: grads}`` mapping that `tbgc_jax.tbgc`,
  `tbgc_jax.per_task_clip` and `tbgc_jax.vanilla_clip` take.

  Args:
    loss_fns: ``{task: loss_fn}``, each ``loss_fn(params, batch, *args, **kwargs)`` returning
      a scalar loss, or ``(loss, aux)`` when ``has_aux``.
    has_aux: whether the loss functions return auxiliary data.

  Returns:
    ``fn(params, batches, *args, **kwargs)`` with ``batches = {task: batch}`` (exactly the
    tasks of ``loss_fns``), returning ``(losses, grads)``, or ``((losses, aux), grads)`` when
    ``has_aux``; each is a ``{task: ...}`` dict.

  Example:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> fn = tbgc_jax.per_task_value_and_grad({
    ...     "a": lambda p, x: jnp.sum(p * x), "b": lambda p, x: jnp.sum((p * x) ** 2)})
    >>> losses, grads = fn(jnp.ones(2), {"a": jnp.ones(2), "b": jnp.full(2, 2.0)})
    >>> {t: float(v) for t, v in losses.items()}, grads["b"].tolist()
    ({'a': 2.0, 'b': 8.0}, [8.0, 8.0])
  """
  grad_fns = {t: jax.value_and_grad(f, has_aux=has_aux) for t, f in loss_fns.items()}

  def fn(params, batches: Mapping[str, Any], *args, **kwargs):
    if set(batches) != set(grad_fns):
      raise ValueError(
          f"per_task_value_and_grad: got batches for tasks {sorted(batches)}, expected "
          f"exactly {sorted(grad_fns)}")
    values, grads = {}, {}
    for task, grad_fn in grad_fns.items():
      values[task], grads[task] = grad_fn(params, batches[task], *args, **kwargs)
    if has_aux:
      return ({t: v[0] for t, v in values.items()}, {t: v[1] for t, v in values.items()}), grads
    return values, grads

  return fn
