"""Helpers shared by every gradient method: the task-name check and the one safe division."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def check_tasks(tasks: Sequence[str], where: str) -> tuple[str, ...]:
  """The task names, sorted; a ValueError naming ``where`` for anything but distinct strings.

  Every method processes (and sums) its tasks in sorted-name order, which makes its result
  bitwise independent of the order the names were given in. A bare string is refused rather
  than read as a sequence of one-letter task names.

  Args:
    tasks: a non-empty sequence of distinct task names.
    where: the caller's name, for the error message.

  Returns:
    The names as a sorted tuple.

  Examples:
    >>> check_tasks(["seg", "det", "cls"], "tbgc")
    ('cls', 'det', 'seg')
  """
  if isinstance(tasks, (str, bytes)):
    raise ValueError(f"{where}: tasks must be a sequence of task names, got the single string "
                     f"{tasks!r} (write tasks=({tasks!r},) for one task)")
  tasks = tuple(tasks)
  if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
    raise ValueError(f"{where}: tasks must be a non-empty sequence of distinct names, got {tasks}")
  return tuple(sorted(tasks))


def safe_div(num, den, *, fallback=0.0, where=None) -> jax.Array:
  """``num / den`` where ``where`` holds (default ``den > 0``), ``fallback`` elsewhere.

  The division only ever sees a denominator of 1 where ``where`` is False, so neither the
  value nor its gradient holds an inf or NaN from a zero denominator. Where ``where`` holds,
  the result is bitwise ``num / den``. The default suits the library's denominators, which
  are non-negative by construction (norms, squared norms, sums of absolute values): a zero,
  or a negative rounding artefact, gives ``fallback``. Pass ``where`` for a signed
  denominator, e.g. ``where=jnp.abs(den) > tol``.

  Args:
    num: numerator (array or scalar).
    den: denominator, broadcastable with ``num``.
    fallback: the result where the division is not done (broadcastable).
    where: bool mask (broadcastable) of the entries to divide; default ``den > 0``.

  Returns:
    ``jnp.where(where, num / den, fallback)``, safely.

  Examples:
    >>> import jax.numpy as jnp
    >>> safe_div(jnp.array([1.0, 1.0, 2.0]), jnp.array([2.0, 0.0, -1.0])).tolist()
    [0.5, 0.0, 0.0]
    >>> safe_div(2.0, -1.0, where=jnp.asarray(True)).tolist()
    -2.0
  """
  den = jnp.asarray(den)
  ok = den > 0 if where is None else where
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)
