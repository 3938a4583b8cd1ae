"""Per-task losses and gradients: one ``jax.value_and_grad`` per task."""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def per_task_value_and_grad(
    loss_fns: Mapping[str, Callable[..., Any]],
    *,
    has_aux: bool = False,
    sequential: bool = False,
) -> Callable[..., tuple[Any, dict[str, Any]]]:
  """Turns per-task loss functions into one function returning per-task losses and gradients.

  Each task runs its own forward and ``jax.value_and_grad`` on its own batch, as in the
  paper's Algorithm 1, producing the ``{task: grads}`` mapping that `tbgc_jax.tbgc`,
  `tbgc_jax.per_task_clip` and `tbgc_jax.vanilla_clip` take.

  Inside one ``jax.jit``, XLA is free to interleave the tasks and, on the CPU backend at
  least, keeps every task's activations alive at once: the memory of the summed-loss
  gradient. With ``sequential=True`` the tasks run as iterations of a ``lax.fori_loop`` whose
  body ``lax.switch``-es on the task index, so only one task's forward/backward is live at a
  time and peak memory is that of the largest single task plus the stacked per-task
  gradients (the paper's point: a larger batch fits). Results are the same; the values of
  every task must then have fixed shapes (they do under jit anyway).

  Args:
    loss_fns: ``{task: loss_fn}``, each ``loss_fn(params, batch, *args, **kwargs)`` returning
      a scalar loss, or ``(loss, aux)`` when ``has_aux``.
    has_aux: whether the loss functions return auxiliary data.
    sequential: run the tasks one at a time (see above).

  Returns:
    ``fn(params, batches, *args, **kwargs)`` with ``batches = {task: batch}`` (exactly the
    tasks of ``loss_fns``), returning ``(losses, grads)``, or ``((losses, aux), grads)`` when
    ``has_aux``; each is a ``{task: ...}`` dict.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> fn = tbgc_jax.per_task_value_and_grad({
    ...     "a": lambda p, x: jnp.sum(p * x), "b": lambda p, x: jnp.sum((p * x) ** 2)})
    >>> losses, grads = fn(jnp.ones(2), {"a": jnp.ones(2), "b": jnp.full(2, 2.0)})
    >>> {t: float(v) for t, v in losses.items()}, grads["b"].tolist()
    ({'a': 2.0, 'b': 8.0}, [8.0, 8.0])
  """
  grad_fns = {t: jax.value_and_grad(f, has_aux=has_aux) for t, f in loss_fns.items()}
  tasks = tuple(grad_fns)

  def together(params, batches, args, kwargs):
    values, grads = {}, {}
    for task in tasks:
      values[task], grads[task] = grad_fns[task](params, batches[task], *args, **kwargs)
    return values, grads

  def one_at_a_time(params, batches, args, kwargs):
    # Every switch branch returns the same structure: all tasks' value slots (its own filled,
    # the others zero, so summing over iterations collects them) and one gradient tree,
    # written into a stack with a leading task axis outside the switch.
    value_shapes = {
        t: jax.eval_shape(grad_fns[t], params, batches[t], *args, **kwargs)[0] for t in tasks}
    zero_values = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), value_shapes)

    def branch(task):
      def run(params, batches, args, kwargs):
        value, grads = grad_fns[task](params, batches[task], *args, **kwargs)
        return {**zero_values, task: value}, grads
      return run

    branches = [branch(t) for t in tasks]

    def body(k, carry):
      values, stacked = carry
      value, grads = jax.lax.switch(k, branches, params, batches, args, kwargs)
      values = jax.tree.map(jnp.add, values, value)
      stacked = jax.tree.map(lambda acc, g: acc.at[k].set(g.astype(acc.dtype)), stacked, grads)
      return values, stacked

    stacked = jax.tree.map(lambda p: jnp.zeros((len(tasks),) + p.shape, p.dtype), params)
    values, stacked = jax.lax.fori_loop(0, len(tasks), body, (zero_values, stacked))
    return values, {t: jax.tree.map(lambda s, k=k: s[k], stacked) for k, t in enumerate(tasks)}

  run = one_at_a_time if sequential else together

  def fn(params, batches: Mapping[str, Any], *args, **kwargs):
    if set(batches) != set(tasks):
      raise ValueError(
          f"per_task_value_and_grad: got batches for tasks {sorted(batches)}, expected "
          f"exactly {sorted(tasks)}")
    values, grads = run(params, batches, args, kwargs)
    if has_aux:
      return ({t: v[0] for t, v in values.items()}, {t: v[1] for t, v in values.items()}), grads
    return values, grads

  return fn
