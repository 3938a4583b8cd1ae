"""Diagnostics of the multi-task gradient methods, kept in their optimizer states."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class GradientDiagnostics(NamedTuple):
  """What a gradient method saw and did in its last update; read by `gradient_diagnostics`.

  Dicts map task name -> scalar; arrays are in sorted task-name order (the dicts' key order).
  """

  weights: dict[str, jax.Array] | None  # f32[]: weight of each raw task gradient in the
  # backbone update (None for methods without weights, e.g. GradDrop).
  norm_before: dict[str, jax.Array]  # f32[]: backbone norm of the task's gradient.
  norm_after: dict[str, jax.Array]  # f32[]: backbone norm of its manipulated gradient.
  cosine: jax.Array  # f32[T, T]: cosine similarity of the tasks' backbone gradients.
  num_conflicts: jax.Array  # i32[]: task pairs whose backbone gradients' inner product is < 0.
  num_nonfinite: dict[str, jax.Array]  # i32[]: updates in which the task's gradient was
  # non-finite (dropped from that update).


def find_state(opt_state: Any, cls: type, *, where: str) -> Any:
  """The one instance of ``cls`` anywhere inside ``opt_state``, or None; raises if several."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, cls))
           if isinstance(x, cls)]
  if len(found) > 1:
    raise ValueError(f"{where}: expected at most one {cls.__name__} in the optimizer state, "
                     f"found {len(found)}")
  return found[0] if found else None


def gradient_diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """Reads the diagnostics of the last update of a Gramian gradient method (`mgda`, `upgrad`...).

  Finds the `GradientDiagnostics` anywhere inside ``opt_state`` (a chain, ``inject_hyperparams``
  or ``MultiSteps`` state) and returns them flat, ready to log:

  - ``weight/<task>``: the weight of the task's raw gradient in the backbone update (absent
    for methods without weights);
  - ``backbone_norm/<task>``, ``backbone_norm_after/<task>``: the backbone norm of the task's
    gradient before and after the method manipulated it;
  - ``cosine/<task>/<other>`` (each pair once, names in sorted order): the cosine similarity
    of the two tasks' backbone gradients;
  - ``num_conflicts``: pairs with a negative inner product;
  - ``num_nonfinite/<task>``: updates in which the task's gradient was non-finite.

  Works on traced or concrete states; nothing is fetched to the host.

  Args:
    opt_state: an optimizer state.

  Returns:
    ``{name: scalar}``; ``{}`` when the state holds no `GradientDiagnostics` (e.g. of
    `tbgc_jax.tbgc`, whose diagnostics `tbgc_jax.task_diagnostics` reads).

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.mgda(tasks=("a", "b"))
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([-1.0, 1.0])}
    >>> _, state = tx.update(grads, tx.init(jnp.zeros(2)))
    >>> d = tbgc_jax.gradient_diagnostics(state)
    >>> float(d["cosine/a/b"]) < 0, int(d["num_conflicts"])
    (True, 1)
  """
  d = find_state(opt_state, GradientDiagnostics, where="gradient_diagnostics")
  if d is None:
    return {}
  tasks = list(d.norm_before)
  out = {}
  if d.weights is not None:
    out.update({f"weight/{t}": d.weights[t] for t in tasks})
  out.update({f"backbone_norm/{t}": d.norm_before[t] for t in tasks})
  out.update({f"backbone_norm_after/{t}": d.norm_after[t] for t in tasks})
  for i, a in enumerate(tasks):
    for j in range(i + 1, len(tasks)):
      out[f"cosine/{a}/{tasks[j]}"] = d.cosine[i, j]
  out["num_conflicts"] = jnp.asarray(d.num_conflicts)
  out.update({f"num_nonfinite/{t}": d.num_nonfinite[t] for t in tasks})
  return out
