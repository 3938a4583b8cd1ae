"""Fixed and robust aggregators: constant weights, (Multi-)Krum and the coordinate-wise
trimmed mean.

They follow the interface of ``methods.py`` (``{task: gradient pytree}`` in, one params-shaped
update out, head leaves summed) and run on the engine of ``aggregation.py``: `constant` and
`krum` are weightings of the Gramian, `trimmed_mean` is elementwise (like GradDrop). A task
dropped for a non-finite gradient counts as a zero gradient, as in every Gramian method.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from tbgc_jax._src.aggregation import gramian_method, weighting
from tbgc_jax._src.base import check_tasks
from tbgc_jax._src.masks import MaskOrFn
from tbgc_jax._src.registry import NON_NEGATIVE, POSITIVE, register

_F32 = jnp.float32
GT = optax.GradientTransformationExtraArgs


def task_vector(values: Mapping[str, float] | Sequence[float], given: Sequence[str],
                where: str, name: str) -> tuple[float, ...]:
  """Per-task numbers in sorted-task order, from ``{task: value}`` or a sequence in the order of
  ``given`` (the ``tasks`` argument as passed); a ValueError naming ``name`` otherwise."""
  given = tuple(given)
  if isinstance(values, Mapping) or hasattr(values, "items"):  # also an ml_collections dict
    values = dict(values.items())
    if set(values) != set(given):
      raise ValueError(f"{where}: {name} must have one entry per task {sorted(given)}, got "
                       f"{sorted(values)}")
    by_task = dict(values)
  else:
    try:
      seq = None if isinstance(values, str) else tuple(values)
    except TypeError:  # not iterable
      seq = None
    if seq is None or len(seq) != len(given):
      raise ValueError(f"{where}: {name} must be a mapping task -> value or a sequence of "
                       f"{len(given)} values in the order of tasks {given}, got {values!r}")
    by_task = dict(zip(given, seq, strict=True))
  out = []
  for t in sorted(given):
    try:
      v = float(by_task[t])
    except (TypeError, ValueError):
      raise ValueError(f"{where}: {name}[{t!r}] must be a number, got {by_task[t]!r}") from None
    if not jnp.isfinite(v):
      raise ValueError(f"{where}: {name}[{t!r}] must be finite, got {v}")
    out.append(v)
  return tuple(out)


@register("constant")
def constant(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
             weights: Mapping[str, float] | Sequence[float],
             drop_nonfinite: bool = True) -> GT:
  r"""Fixed weights chosen by the user: ``update = sum_t w_t g_t`` on the backbone.

  The static weighting of the multi-task literature (the linear scalarization
  ``sum_t w_t L_t``); TorchJD's ``Constant``. A dropped task (non-finite gradient) contributes
  nothing; the other weights are not renormalised.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    weights: ``{task: w_t}``, or a sequence of finite numbers in the order of ``tasks``.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Caruana, `Multitask Learning`, Machine Learning 1997 (a fixed weighted sum of the task
    losses); TorchJD's ``Constant`` aggregator.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.constant(tasks=("a", "b"), weights={"a": 1.0, "b": 2.0})
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()
    [8.0, 3.0, 3.0]
  """
  check_tasks(tasks, "constant")
  w = task_vector(weights, tasks, "constant", "weights")
  return gramian_method("constant", backbone_mask, tasks,
                        weighting(lambda step: jnp.asarray(w, _F32)),
                        drop_nonfinite=drop_nonfinite)


def krum_weights(gram: jax.Array, n_byzantine: int, n_selected: int) -> jax.Array:
  """Multi-Krum's weights from the Gramian: ``1 / n_selected`` on the tasks of lowest score.

  ``d_ij = G_ii + G_jj - 2 G_ij`` (squared distances); the score of ``i`` is the sum of its
  ``T - n_byzantine - 2`` smallest ``d_ij``, ``j != i``; ties go to the first task in order.
  """
  n = gram.shape[0]
  diag = jnp.diag(gram)
  dist = jnp.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0)
  dist = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, dist)  # exclude i itself
  closest = jnp.sort(dist, axis=1)[:, :n - n_byzantine - 2]
  scores = jnp.sum(closest, axis=1)
  ranks = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
  return jnp.where(ranks < n_selected, 1.0 / n_selected, 0.0).astype(_F32)


@register("krum", checks={"n_byzantine": NON_NEGATIVE, "n_selected": POSITIVE})
def krum(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], n_byzantine: int,
         n_selected: int = 1, drop_nonfinite: bool = True) -> GT:
  r"""(Multi-)Krum: the mean of the ``n_selected`` task gradients closest to their neighbours.

  With ``f = n_byzantine``, each task ``i`` gets the score
  ``s(i) = sum_{i -> j} ||g_i - g_j||^2`` over its ``T - f - 2`` nearest other gradients
  (Blanchard et al., Sec. 4); Krum returns the gradient of lowest score, Multi-Krum the mean of
  the ``n_selected`` of lowest score (El Mhamdi et al., Sec. 3). The distances come from the
  Gramian, ``||g_i - g_j||^2 = G_ii + G_jj - 2 G_ij``. TorchJD's ``Krum`` sums the distances
  rather than their squares; with ``T - f - 2 = 1`` neighbour the two agree.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names (at least ``n_byzantine + 3`` of them).
    n_byzantine: ``f >= 0``, the number of gradients that may be adversarial (the paper's
      guarantee needs ``2 f + 2 < T``).
    n_selected: ``1 <= m <= T``, the number of gradients averaged (1: Krum).
    drop_nonfinite: drop a task with a non-finite gradient (it then counts as a zero gradient).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Blanchard, El Mhamdi, Guerraoui, Stainer, `Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent`, NeurIPS 2017, Sec. 4; El Mhamdi, Guerraoui, Rouault, `The
    Hidden Vulnerability of Distributed Learning in Byzantium`, ICML 2018, Sec. 3 (Multi-Krum).

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.krum(tasks=("a", "b", "c", "d"), n_byzantine=1, n_selected=2)
    >>> J = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.1, 0.0]),
    ...      "c": jnp.array([0.9, 0.1]), "d": jnp.array([-50.0, 9.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(2)))[0].tolist()]
    [1.05, 0.0]
  """
  n = len(check_tasks(tasks, "krum"))
  if n < n_byzantine + 3:
    raise ValueError(f"krum: needs at least n_byzantine + 3 = {n_byzantine + 3} tasks, got {n}")
  if not 1 <= n_selected <= n:
    raise ValueError(f"krum: n_selected must be in [1, {n}] (the number of tasks), got "
                     f"{n_selected}")
  return gramian_method(
      "krum", backbone_mask, tasks,
      weighting(lambda step: krum_weights(step.gram, n_byzantine, n_selected)),
      drop_nonfinite=drop_nonfinite)


@register("trimmed_mean", checks={"trim_number": NON_NEGATIVE})
def trimmed_mean(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
                 trim_number: int, drop_nonfinite: bool = True) -> GT:
  r"""Coordinate-wise trimmed mean: per backbone coordinate, drop the ``b`` largest and ``b``
  smallest task values and average the rest.

  ``update_k = 1 / (T - 2b) sum_{t in U_k} g_{t,k}`` with ``U_k`` the tasks whose value at
  coordinate ``k`` ranks between ``b + 1`` and ``T - b`` (Yin et al., Definition 2, applied to
  the task gradients). Not a Gramian method: each value is ranked among the tasks by
  ``T (T - 1)`` comparisons per coordinate; no per-task weights. The per-task "after" norm is
  that of the task's coordinates kept, over ``T - 2b``.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names (at least ``2 trim_number + 1``).
    trim_number: ``b >= 0`` (0: the mean).
    drop_nonfinite: drop a task with a non-finite gradient (it then counts as a zero gradient).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Yin, Chen, Ramchandran, Bartlett, `Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates`, ICML 2018, Definition 2.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.trimmed_mean(tasks=("a", "b", "c", "d"), trim_number=1)
    >>> J = {"a": jnp.array([1e11, 3.0]), "b": jnp.array([1.0, -1e11]),
    ...      "c": jnp.array([-1e10, 1e10]), "d": jnp.array([2.0, 2.0])}
    >>> tx.update(J, tx.init(jnp.zeros(2)))[0].tolist()
    [1.5, 2.5]
  """
  n = len(check_tasks(tasks, "trimmed_mean"))
  if n < 2 * trim_number + 1:
    raise ValueError(f"trimmed_mean: needs at least 2 * trim_number + 1 = {2 * trim_number + 1} "
                     f"tasks, got {n}")
  kept_count = n - 2 * trim_number

  def elementwise(bb, inner, losses):
    del losses
    outs, sq = [], jnp.zeros([n], _F32)
    for xs in zip(*bb.values(), strict=True):
      # Each value's rank among the tasks by pairwise comparisons (ties: task order), which XLA
      # fuses into one pass; a sort along the task axis is ~100x slower on CPU.
      kept = []
      for t, x in enumerate(xs):
        rank = sum(((y < x) | ((y == x) & (s < t))).astype(jnp.int32)
                   for s, y in enumerate(xs) if s != t)
        keep = (rank >= trim_number) & (rank < n - trim_number)
        kept.append(jnp.where(keep, x, 0.0) / kept_count)
      outs.append(sum(kept))
      sq = sq + jnp.stack([jnp.sum(jnp.square(k)) for k in kept])
    return outs, jnp.sqrt(sq), inner

  return gramian_method("trimmed_mean", backbone_mask, tasks, elementwise=elementwise,
                        drop_nonfinite=drop_nonfinite)
