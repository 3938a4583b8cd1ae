"""Diagnostics of the multi-task gradient methods, kept in their optimizer states.

Two typed states hold what a method saw and did in its last update: `TaskClipState` (the
clipping family) and `GradientDiagnostics` (the Gramian engine: every Gramian, loss-based and
LibMTL method). Both carry the one non-finite policy's counters, `NonFinite`. One reader,
`method_diagnostics`, returns either as a flat dict ready to log.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tbgc_jax._src.base import check_losses


class NonFinite(NamedTuple):
  """Per-task counters of non-finite task gradients (or losses), shared by every method.

  A task whose gradient, or loss when ``update`` is given ``losses={task: loss}``, holds a NaN
  or an Inf is dropped from that update (the method's ``drop_nonfinite``, default True) and
  counted here. Every field maps task name -> scalar.
  """

  last: dict[str, jax.Array]  # i32[]: 1 if the task was non-finite in the last update, else 0.
  total: dict[str, jax.Array]  # i32[]: updates in which it was non-finite.
  streak: dict[str, jax.Array]  # i32[]: consecutive updates, up to the last, it was non-finite.

  @classmethod
  def zeros(cls, tasks: Sequence[str]) -> "NonFinite":
    """The counters before the first update."""
    zero = lambda: {t: jnp.zeros([], jnp.int32) for t in tasks}
    return cls(zero(), zero(), zero())

  def advance(self, finite: Mapping[str, jax.Array]) -> "NonFinite":
    """The counters after an update in which task ``t`` was finite where ``finite[t]``."""
    bad = {t: (~jnp.asarray(ok)).astype(jnp.int32) for t, ok in finite.items()}
    return NonFinite(bad, {t: self.total[t] + b for t, b in bad.items()},
                     {t: (self.streak[t] + 1) * b for t, b in bad.items()})


def finite_tasks(sums: Mapping[str, jax.Array], losses: Mapping[str, jax.Array] | None,
                 where: str) -> dict[str, jax.Array]:
  """``{task: bool[]}``: the task's sum over its gradient (e.g. of squares) is finite, and so is
  its loss when ``losses`` is given (a method's ``losses`` extra argument, checked to name
  the tasks; errors name ``where``)."""
  ok = {t: jnp.isfinite(s) for t, s in sums.items()}
  if losses is not None:
    check_losses(losses, tuple(sums), where)
    ok = {t: v & jnp.all(jnp.isfinite(losses[t])) for t, v in ok.items()}
  return ok


class TaskClipState(NamedTuple):
  """State of the clipping methods (`tbgc_jax.tbgc`, ...): per-task diagnostics of the last
  update and the non-finite counters. Dicts map task name -> scalar; read them with
  `tbgc_jax.method_diagnostics`."""

  total_norm: dict[str, jax.Array]  # f32[]: L2 norm of the task's raw gradient.
  backbone_norm: dict[str, jax.Array]  # f32[]: L2 norm of its backbone leaves (0 if no mask).
  backbone_scale: dict[str, jax.Array]  # f32[]: factor applied to its backbone leaves.
  head_scale: dict[str, jax.Array]  # f32[]: factor applied to its other leaves.
  nonfinite: NonFinite  # the non-finite counters.


class GradientDiagnostics(NamedTuple):
  """What a Gramian-engine method saw and did in its last update; read by `method_diagnostics`.

  Dicts map task name -> scalar; arrays are in sorted task-name order (the dicts' key order).
  """

  weights: dict[str, jax.Array] | None  # f32[]: weight of each raw task gradient in the
  # backbone update (None for methods without weights, e.g. GradDrop).
  norm_before: dict[str, jax.Array]  # f32[]: backbone norm of the task's gradient.
  norm_after: dict[str, jax.Array]  # f32[]: backbone norm of its manipulated gradient.
  cosine: jax.Array  # f32[T, T]: cosine similarity of the tasks' backbone gradients.
  num_conflicts: jax.Array  # i32[]: task pairs whose backbone gradients' inner product is < 0.
  nonfinite: NonFinite  # the non-finite counters.


def _entries(st: "TaskClipState | GradientDiagnostics") -> dict[str, jax.Array]:
  """The flat entries of one method state (see `method_diagnostics`)."""
  out = {}
  if isinstance(st, TaskClipState):
    for t in st.total_norm:
      out[f"task/{t}/grad_norm"] = st.total_norm[t]
      out[f"task/{t}/backbone_grad_norm"] = st.backbone_norm[t]
      out[f"task/{t}/backbone_grad_norm_after"] = st.backbone_norm[t] * st.backbone_scale[t]
      out[f"task/{t}/backbone_scale"] = st.backbone_scale[t]
      out[f"task/{t}/head_scale"] = st.head_scale[t]
  else:
    tasks = list(st.norm_before)
    for t in tasks:
      if st.weights is not None:
        out[f"task/{t}/weight"] = st.weights[t]
      out[f"task/{t}/backbone_grad_norm"] = st.norm_before[t]
      out[f"task/{t}/backbone_grad_norm_after"] = st.norm_after[t]
    for i, a in enumerate(tasks):
      for j in range(i + 1, len(tasks)):
        out[f"grad/cosine/{a}/{tasks[j]}"] = st.cosine[i, j]
    out["grad/num_conflicts"] = jnp.asarray(st.num_conflicts)
  nf = st.nonfinite
  for t in nf.total:
    out[f"task/{t}/nonfinite"] = nf.last[t]
    out[f"task/{t}/nonfinite_total"] = nf.total[t]
    out[f"task/{t}/nonfinite_streak"] = nf.streak[t]
  return out


# In a chain of methods: the raw gradient's norms are the first method's, a task dropped by any
# counts, the rest is the last method's.
_FIRST = ("/grad_norm", "/backbone_grad_norm")
_ANY = ("/nonfinite", "/nonfinite_total", "/nonfinite_streak")


def method_diagnostics(opt_state: Any) -> dict[str, jax.Array]:
  """The diagnostics of a gradient method's last update, flat and ready to log.

  Finds the method's state (`TaskClipState` or `GradientDiagnostics`) anywhere inside
  ``opt_state`` (a chain, ``inject_hyperparams`` or ``MultiSteps`` state) and returns
  ``{name: scalar}``, with per-task entries under ``task/<task>/`` and the others under
  ``grad/``. Every method gives the ``task/<task>/`` entries

  - ``backbone_grad_norm``, ``backbone_grad_norm_after``: the backbone norm of the task's
    gradient before and after the method manipulated it;
  - ``nonfinite`` (1 if the task's gradient or loss was non-finite in that update, which
    dropped it), ``nonfinite_total`` (updates so far), ``nonfinite_streak`` (in a row, up to
    that update): the `NonFinite` counters;

  the clipping methods add ``grad_norm`` (the whole raw gradient's norm), ``backbone_scale``
  and ``head_scale`` (the factors applied; 0 for a dropped task); the Gramian engine adds
  ``weight`` (the task's raw gradient's weight in the backbone update, for methods with
  weights), ``grad/cosine/<task>/<other>`` (each pair once, names in sorted order) and
  ``grad/num_conflicts`` (pairs with a negative inner product). Works on traced or concrete
  states; nothing is fetched to the host.

  In a chain of methods (e.g. ``task_rescale`` then ``upgrad``), ``grad_norm`` and
  ``backbone_grad_norm`` are the first method's (of the raw gradients), the non-finite entries
  count a task that any of them dropped, and the other entries are the last method's.

  Args:
    opt_state: an optimizer state.

  Returns:
    ``{name: scalar}``; ``{}`` for a state without a method state.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.mgda(tasks=("a", "b"))
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([-1.0, 1.0])}
    >>> _, state = tx.update(grads, tx.init(jnp.zeros(2)))
    >>> d = tbgc_jax.method_diagnostics(state)
    >>> float(d["grad/cosine/a/b"]) < 0, int(d["grad/num_conflicts"])
    (True, 1)
    >>> tx = tbgc_jax.tbgc(0.1, {"backbone": True, "head": False}, tasks=("a", "b"))
    >>> grads = {"a": {"backbone": jnp.full(3, 5.0), "head": jnp.ones(2)},
    ...          "b": {"backbone": jnp.full(3, jnp.nan), "head": jnp.zeros(2)}}
    >>> _, state = tx.update(grads, tx.init(grads["a"]), grads["a"])
    >>> d = tbgc_jax.method_diagnostics(state)
    >>> round(float(d["task/a/backbone_grad_norm_after"]), 6), int(d["task/b/nonfinite_total"])
    (0.1, 1)
  """
  kinds = (TaskClipState, GradientDiagnostics)
  states = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
            if isinstance(x, kinds)]
  out: dict[str, jax.Array] = {}
  for st in states:
    for key, value in _entries(st).items():
      if key not in out or not key.endswith(_FIRST + _ANY):
        out[key] = value
      elif key.endswith(_ANY):
        out[key] = jnp.maximum(out[key], value)
  return out
