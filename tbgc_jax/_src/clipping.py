"""Task-level gradient clipping transforms: TBGC, TBGC* (per-task clip), the first-place
code's backbone clip, vanilla clip, and the plain sum of the task gradients (the ``none``
baseline).

All take, as ``updates``, a mapping ``{task_name: gradient pytree shaped like params}``
(head leaves a task does not touch hold zeros) and return one summed, params-shaped pytree,
so each can be the first link of an ``optax.chain``.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tbgc_jax._src.base import check_tasks as _check_tasks
from tbgc_jax._src.base import safe_div
from tbgc_jax._src.diagnostics import find_state
from tbgc_jax._src.masks import MaskOrFn, backbone_selector
from tbgc_jax._src.registry import POSITIVE, register

_F32 = jnp.float32
# Added to the backbone norm by `backbone_clip`, as in the code it reproduces.
_BACKBONE_CLIP_EPS = 1e-6


class TaskClipState(NamedTuple):
  """Per-task diagnostics of the last update, plus a running count of dropped task gradients.

  Every field maps task name -> scalar. Read them with `tbgc_jax.task_diagnostics`.
  """

  total_norm: dict[str, jax.Array]  # f32[]: L2 norm of the task's raw gradient.
  backbone_norm: dict[str, jax.Array]  # f32[]: L2 norm of its backbone leaves (0 if no mask).
  backbone_scale: dict[str, jax.Array]  # f32[]: factor applied to its backbone leaves.
  head_scale: dict[str, jax.Array]  # f32[]: factor applied to its other leaves.
  num_nonfinite: dict[str, jax.Array]  # i32[]: updates in which its gradient was non-finite.


def _split_grads(updates: Any, tasks: tuple[str, ...], params: Any, where: str):
  """Validates the per-task mapping and returns (treedef, {task: leaves})."""
  if not isinstance(updates, Mapping):
    raise TypeError(
        f"{where}: updates must be a mapping task name -> gradient pytree, got "
        f"{type(updates).__name__}")
  if set(updates) != set(tasks):
    raise ValueError(
        f"{where}: got gradients for tasks {sorted(updates)}, expected exactly {sorted(tasks)} "
        "(updates must map each task name to a gradient pytree shaped like params)")
  reference_name = "params" if params is not None else f"the gradient of task {tasks[0]!r}"
  reference = params if params is not None else updates[tasks[0]]
  treedef = jax.tree.structure(reference)
  leaves = {}
  for task in tasks:
    task_def = jax.tree.structure(updates[task])
    if task_def != treedef:
      raise ValueError(
          f"{where}: the gradient of task {task!r} does not match {reference_name}: "
          f"got structure {task_def}, expected {treedef}")
    leaves[task] = jax.tree.leaves(updates[task])
  return treedef, leaves


_SMALL_LEAF = 1 << 16  # elements


def _reduce_leaves(leaves: Sequence[jax.Array], fn) -> jax.Array:
  """Float32 sum of the elementwise ``fn`` over all ``leaves``.

  Large leaves are reduced one by one, in place. Small leaves (biases, norm scales: most of
  a real model's leaves, little of its size) are concatenated and reduced once: XLA:CPU
  compiles every reduction kernel separately, and one per leaf takes minutes to compile for
  a few hundred leaves x 3 tasks; concatenating everything instead copies the whole gradient.
  """
  small = [fn(x).ravel() for x in leaves if x.size < _SMALL_LEAF]
  total = jnp.zeros([], _F32)
  if small:
    total = jnp.sum(jnp.concatenate(small))
  for x in leaves:
    if x.size >= _SMALL_LEAF:
      total = total + jnp.sum(fn(x))
  return total


def _sum_squares(leaves: Sequence[jax.Array], select: Sequence[bool], want: bool) -> jax.Array:
  """Float32 sum of squares of the leaves whose ``select`` entry equals ``want``."""
  chosen = [x for x, s in zip(leaves, select, strict=True) if s == want]
  return _reduce_leaves(chosen, lambda x: jnp.square(x.astype(_F32)))


def all_finite(tree: Any) -> jax.Array:
  """bool[]: every element of every leaf of ``tree`` is finite (few reductions; see above)."""
  return _reduce_leaves(jax.tree.leaves(tree), lambda x: (~jnp.isfinite(x)).astype(_F32)) == 0


def _unflatten_cast(treedef, out: Sequence[jax.Array], leaves: Mapping[str, Sequence[jax.Array]],
                    tasks: Sequence[str]) -> Any:
  """The params-shaped tree of ``out`` (float32 leaves), each cast to its tasks' gradient dtype."""
  dtypes = [jnp.result_type(*(leaves[t][i] for t in tasks)) for i in range(len(out))]
  return jax.tree.unflatten(treedef, [x.astype(d) for x, d in zip(out, dtypes, strict=True)])


def _clip_factor(norm: jax.Array, max_norm: jax.Array) -> jax.Array:
  """min(1, max_norm / norm), with no 0/0: a zero (or small enough) norm gives 1."""
  return jnp.where(norm > max_norm, safe_div(max_norm, norm), 1.0)


class _Norms(NamedTuple):
  """Float32 norms of one task's raw gradient, the input of a scaling rule."""

  total: jax.Array  # f32[]: of the whole gradient.
  backbone: jax.Array  # f32[]: of its backbone leaves.


# rule(norms, max_norm) -> (factor on the backbone leaves, factor on the other leaves)
Rule = Callable[[_Norms, jax.Array], tuple[jax.Array, jax.Array]]


def _clip_rule(norms: _Norms, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """TBGC*'s step: the whole task gradient clipped to norm ``s``."""
  c = _clip_factor(norms.total, s)
  return c, c


def _rescale_rule(rescale_heads: bool) -> Rule:
  """TBGC's step: clip, then rescale the backbone part to norm ``s``. The combined factor on
  the raw gradient is ``s / ||B(g)||`` whatever the clip did; a task with no backbone gradient
  cannot be rescaled and keeps its clipped gradient."""
  def rule(norms, s):
    clip, _ = _clip_rule(norms, s)
    rescale = safe_div(s, norms.backbone, fallback=clip)
    return rescale, (rescale if rescale_heads else clip)
  return rule


def _backbone_clip_rule(norms: _Norms, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The first-place code's step: one factor from the backbone norm alone, never above 1."""
  c = jnp.minimum(1.0, s / (norms.backbone + _BACKBONE_CLIP_EPS))
  return c, c


def _unit_rule(norms: _Norms, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """No per-task scaling (the gradients pass as they are)."""
  del norms, s
  one = jnp.ones([], _F32)
  return one, one


class _Scaled(NamedTuple):
  """What `_scale_tasks` hands to the step after it."""

  treedef: Any
  leaves: dict[str, list[jax.Array]]  # the raw gradient leaves, per task
  scaled: dict[str, list[jax.Array]]  # float32, per task: factor * leaf (0 for a dropped task)
  state: TaskClipState


def _scale_tasks(where: str, rule: Rule, max_norm, backbone_mask: MaskOrFn | None,
                 tasks: Sequence[str], *, drop_nonfinite: bool, needs_backbone: bool):
  """The per-task step of the clipping methods: ``g_t -> rule(norms of g_t) * g_t``.

  Pass 1 computes each task's backbone and head sums of squares in float32 (a non-finite one
  drops the task when ``drop_nonfinite``), pass 2 scales each task's leaves, in float32, by the
  rule's backbone and head factors. Returns ``(init_fn, scale_fn)`` with
  ``scale_fn(updates, state, params) -> _Scaled``; the steps after it (`_sum_then`,
  `_per_task`) form the output, so a float32 sum of the scaled tasks is rounded once.
  """
  tasks = _check_tasks(tasks, where)
  is_backbone = backbone_selector(backbone_mask, where=where, default=False)

  def init_fn(params):
    is_backbone.check_params(params)
    zeros = {t: jnp.zeros([], _F32) for t in tasks}
    ones = {t: jnp.ones([], _F32) for t in tasks}
    return TaskClipState(
        total_norm=zeros, backbone_norm=dict(zeros), backbone_scale=ones, head_scale=dict(ones),
        num_nonfinite={t: jnp.zeros([], jnp.int32) for t in tasks})

  def scale_fn(updates, state, params) -> _Scaled:
    treedef, leaves = _split_grads(updates, tasks, params, where)
    select = is_backbone(updates[tasks[0]])
    if needs_backbone and not any(select):
      raise ValueError(f"{where}: backbone_mask selects no gradient leaf as backbone")
    s = jnp.asarray(max_norm, _F32)
    bb_sq = {t: _sum_squares(leaves[t], select, True) for t in tasks}
    total_sq = {t: bb_sq[t] + _sum_squares(leaves[t], select, False) for t in tasks}
    finite = {t: jnp.isfinite(total_sq[t]) for t in tasks}
    keep = finite if drop_nonfinite else {t: jnp.asarray(True) for t in tasks}
    norms = {t: _Norms(jnp.sqrt(total_sq[t]), jnp.sqrt(bb_sq[t])) for t in tasks}
    factors = {t: rule(norms[t], s) for t in tasks}
    bb_scale = {t: jnp.where(keep[t], factors[t][0], 0.0) for t in tasks}
    head_scale = {t: jnp.where(keep[t], factors[t][1], 0.0) for t in tasks}
    # Select, then multiply: a dropped NaN task adds 0, not 0 * NaN (and on XLA:CPU this order
    # is ~15% faster than selecting the product).
    scaled = {t: [jnp.where(keep[t], x.astype(_F32), 0.0) * (bb_scale if sel else head_scale)[t]
                  for x, sel in zip(leaves[t], select, strict=True)] for t in tasks}
    new_state = TaskClipState(
        total_norm={t: norms[t].total for t in tasks},
        backbone_norm={t: norms[t].backbone for t in tasks},
        backbone_scale=bb_scale, head_scale=head_scale,
        num_nonfinite={
            t: state.num_nonfinite[t] + (~finite[t]).astype(jnp.int32) for t in tasks})
    return _Scaled(treedef, leaves, scaled, new_state)

  return init_fn, scale_fn, tasks


def _sum_then(scaling, then=None) -> optax.GradientTransformation:
  """`_scale_tasks` followed by the float32 sum over tasks (sorted order), an optional step
  ``then(summed f32 leaves, TaskClipState) -> (leaves, TaskClipState)`` on the sum, and one
  cast to the gradients' dtype."""
  init_fn, scale_fn, tasks = scaling

  def update_fn(updates, state, params=None):
    sc = scale_fn(updates, state, params)
    out = _sum_leaves(sc.scaled, tasks)
    new_state = sc.state
    if then is not None:
      out, new_state = then(out, new_state)
    return _unflatten_cast(sc.treedef, out, sc.leaves, tasks), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _per_task(scaling) -> optax.GradientTransformation:
  """`_scale_tasks` with per-task outputs, each cast to its task's gradient dtype."""
  init_fn, scale_fn, tasks = scaling

  def update_fn(updates, state, params=None):
    sc = scale_fn(updates, state, params)
    out = {t: _unflatten_cast(sc.treedef, sc.scaled[t], sc.leaves, (t,)) for t in tasks}
    return out, sc.state

  return optax.GradientTransformation(init_fn, update_fn)


def _sum_leaves(leaves: Mapping[str, Sequence[jax.Array]], tasks: Sequence[str]
                ) -> list[jax.Array]:
  """Leaf by leaf, the float32 sum over ``tasks`` in the given (sorted) order."""
  return [sum(xs) for xs in zip(*(
      [x.astype(_F32) for x in leaves[t]] for t in tasks), strict=True)]


def _clip_sum(max_norm):
  """The step after the sum of `vanilla_clip`: the sum clipped by its global norm (its factor
  reported as every kept task's scale)."""
  def then(summed, state: TaskClipState):
    c = _clip_factor(jnp.sqrt(_sum_squares(summed, [True] * len(summed), True)),
                     jnp.asarray(max_norm, _F32))
    scale = {t: c * v for t, v in state.backbone_scale.items()}  # 0 for a dropped task
    return [x * c for x in summed], state._replace(backbone_scale=scale, head_scale=dict(scale))
  return then


def tbgc(
    max_norm: float | jax.Array,
    backbone_mask: MaskOrFn,
    *,
    tasks: Sequence[str],
    rescale: bool = True,
    rescale_heads: bool = True,
    drop_nonfinite: bool = True,
) -> optax.GradientTransformation:
  r"""Task-level backbone-oriented gradient clipping (TBGC).

  For each task ``t``, with ``S = max_norm`` and ``B(.)`` the backbone part of a gradient:

  .. math::

    g_t \leftarrow g_t \min(1, S / \|g_t\|), \qquad
    g_t \leftarrow g_t \, S / \|B(g_t)\|, \qquad
    \text{update} = \textstyle\sum_t g_t,

  so every task moves the shared backbone with a gradient of norm exactly ``S``. Because the
  second step scales the whole task gradient by one factor, the first step cancels out: the
  result is ``g_t * S / ||B(g_t)||`` for the raw ``g_t``. With ``rescale_heads=False`` only
  the backbone leaves are rescaled and the head leaves keep the clipped gradient
  ``g_t * min(1, S / ||g_t||)``; with ``rescale=False`` this is TBGC* (`per_task_clip`).

  Edge cases: a task whose gradient is all zeros adds nothing; a task with a zero backbone
  gradient keeps its clipped gradient. A task whose gradient holds a NaN or inf (detected
  from its float32 sum of squares, which also flags norms above ~1.8e19) is dropped from this
  update when ``drop_nonfinite`` (the default), so one exploding task cannot poison the
  shared backbone, and counted in the state's ``num_nonfinite``; set it to False to let
  non-finite values through, e.g. to an ``optax.apply_if_finite`` later in the chain.

  Norms are computed in float32 whatever the gradient dtype; outputs keep the gradients'
  dtype. The transform changes the pytree structure (a mapping of task trees in, one tree
  out), so it must be the *first* link of a chain: wrap only what follows it in
  ``optax.apply_if_finite`` or ``optax.MultiSteps``. To schedule ``max_norm`` use
  ``optax.inject_hyperparams(tbgc, static_args=("backbone_mask", "tasks"))``.

  Args:
    max_norm: ``S``, the per-task maximum norm and the backbone norm every task is
      rescaled to (0.1 in the paper). May be a traced scalar.
    backbone_mask: a pytree of bools shaped like params (or a prefix of it), True on
      backbone leaves, or a callable ``params -> mask`` such as `tbgc_jax.path_mask`.
    tasks: the task names; ``update`` expects exactly these keys.
    rescale: rescale each task's backbone gradient to norm ``S`` (False: TBGC*).
    rescale_heads: apply the rescale factor to the head leaves too (the paper's formula).
    drop_nonfinite: drop a task's contribution for this update when its gradient is
      non-finite.

  Returns:
    An ``optax.GradientTransformation`` whose state is a `TaskClipState`.

  References:
    Zhang et al., `Task-level Backbone-oriented Gradient Clip for Multi-Task Foundation
    Model Learning`, CVPR 2023 Foundation Model Challenge workshop.

  Examples:
    >>> import jax.numpy as jnp, optax, tbgc_jax
    >>> params = {"backbone": jnp.ones(3), "head": jnp.ones(2)}
    >>> tx = optax.chain(
    ...     tbgc_jax.tbgc(0.1, {"backbone": True, "head": False}, tasks=("a", "b")),
    ...     optax.adamw(1e-4))
    >>> grads = {"a": {"backbone": jnp.full(3, 5.0), "head": jnp.ones(2)},
    ...          "b": {"backbone": jnp.full(3, 1e-3), "head": jnp.zeros(2)}}
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> {t: round(float(d["backbone_norm_after"]), 6)
    ...  for t, d in tbgc_jax.task_diagnostics(state).items()}
    {'a': 0.1, 'b': 0.1}
  """
  rule = _rescale_rule(rescale_heads) if rescale else _clip_rule
  return _sum_then(_scale_tasks("tbgc", rule, max_norm, backbone_mask, tasks,
                                drop_nonfinite=drop_nonfinite, needs_backbone=rescale))


def per_task_clip(
    max_norm: float | jax.Array,
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    drop_nonfinite: bool = True,
) -> optax.GradientTransformation:
  """TBGC*: clips each task's gradient by its own global norm, then sums them.

  ``update = sum_t g_t * min(1, max_norm / ||g_t||)``. Same input convention, edge cases and
  chain position as `tbgc`.

  Args:
    max_norm: per-task maximum global norm.
    backbone_mask: optional; only used for the backbone-norm diagnostics in the state.
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a non-finite task's contribution for this update (see `tbgc`).

  Returns:
    An ``optax.GradientTransformation`` whose state is a `TaskClipState`.
  """
  return _sum_then(_scale_tasks("per_task_clip", _clip_rule, max_norm, backbone_mask, tasks,
                                drop_nonfinite=drop_nonfinite, needs_backbone=False))


def backbone_clip(
    max_norm: float | jax.Array = 0.1,
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    drop_nonfinite: bool = True,
) -> optax.GradientTransformation:
  r"""Per-task clip by the backbone norm: the first-place CVPR 2023 challenge code's TBGC.

  For each task ``t``, with ``S = max_norm`` and ``B(.)`` the backbone part of a gradient:

  .. math::

    g_t \leftarrow g_t \min\left(1, \frac{S}{\|B(g_t)\| + 10^{-6}}\right), \qquad
    \text{update} = \textstyle\sum_t g_t,

  one factor on the whole task gradient (backbone and head leaves). Where every task's
  backbone norm exceeds ``S`` this is `tbgc` up to the ``1e-6``; a task whose backbone norm
  is at most ``S`` is left as it is (`tbgc` scales it up to ``S``), and there is no clip by
  the task's total norm. Same input convention, edge cases, non-finite handling and chain
  position as `tbgc`.

  Args:
    max_norm: ``S``, the largest backbone norm a task may contribute. May be traced.
    backbone_mask: a pytree of bools shaped like params (or a prefix of it), True on
      backbone leaves, or a callable ``params -> mask`` such as `tbgc_jax.path_mask`.
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a non-finite task's contribution for this update (see `tbgc`).

  Returns:
    An ``optax.GradientTransformation`` whose state is a `TaskClipState`.

  References:
    ``optimizer_wrapper.py::_clip_grad`` with ``backbone_based=True``, applied per task in
    ``distributed.py::train_step``, in the first-place code of the CVPR 2023 Foundation
    Model Challenge Track 1 (github.com/vaew/CVPR-2023-Track1-, ``track1-huster/openMMLab/
    mmengine``).

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.backbone_clip(1.0, {"backbone": True, "head": False}, tasks=("a", "b"))
    >>> grads = {"a": {"backbone": jnp.array([3.0, 4.0]), "head": jnp.array([5.0])},
    ...          "b": {"backbone": jnp.array([0.3, 0.4]), "head": jnp.array([5.0])}}
    >>> out, _ = tx.update(grads, tx.init(grads["a"]))
    >>> [round(x, 4) for x in out["backbone"].tolist()], round(float(out["head"][0]), 4)
    ([0.9, 1.2], 6.0)
  """
  if backbone_mask is None:
    raise ValueError("backbone_clip: backbone_mask is required (the clip is by the backbone "
                     "norm)")
  return _sum_then(_scale_tasks("backbone_clip", _backbone_clip_rule, max_norm, backbone_mask,
                                tasks, drop_nonfinite=drop_nonfinite, needs_backbone=True))


def vanilla_clip(
    max_norm: float | jax.Array,
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    drop_nonfinite: bool = True,
) -> optax.GradientTransformation:
  """The baseline: sums the task gradients, then clips the sum by its global norm.

  ``update = g * min(1, max_norm / ||g||)`` with ``g = sum_t g_t``: the same result as
  ``optax.clip_by_global_norm`` on the summed gradient (without its NaN at 0/0), plus
  per-task diagnostics in the state (the paper's Figure 1 is these backbone norms).

  Args:
    max_norm: maximum global norm of the summed gradient.
    backbone_mask: optional; only used for the backbone-norm diagnostics in the state.
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a non-finite task's contribution for this update (see `tbgc`).

  Returns:
    An ``optax.GradientTransformation`` whose state is a `TaskClipState`.
  """
  return _sum_then(_scale_tasks("vanilla_clip", _unit_rule, max_norm, backbone_mask, tasks,
                                drop_nonfinite=drop_nonfinite, needs_backbone=False),
                   then=_clip_sum(max_norm))


def task_rescale(
    max_norm: float | jax.Array,
    backbone_mask: MaskOrFn,
    *,
    tasks: Sequence[str],
    rescale: bool = True,
    rescale_heads: bool = True,
    drop_nonfinite: bool = True,
) -> optax.GradientTransformation:
  r"""TBGC's per-task step alone: ``{task: g} -> {task: g'}``, clipped and backbone-rescaled.

  ``g'_t = g_t S / ||B(g_t)||`` (with the options and edge cases of `tbgc`), without the sum,
  so any aggregator can follow: ``optax.chain(task_rescale(S, mask, tasks=...), sum_tasks(
  tasks=...))`` is `tbgc` (bitwise, in float32), and ``optax.chain(task_rescale(...),
  upgrad(mask, tasks=...))`` normalises the tasks' backbone gradients before projecting them.
  Outputs keep each task's gradient dtype; the state is a `TaskClipState`.

  Args:
    max_norm: ``S`` (see `tbgc`).
    backbone_mask: a pytree of bools shaped like params (or a prefix), or a callable.
    tasks: the task names; ``update`` expects exactly these keys.
    rescale: rescale each task's backbone gradient to norm ``S`` (False: per-task clip only).
    rescale_heads: apply the rescale factor to the head leaves too.
    drop_nonfinite: zero a task's gradient for this update when it is non-finite.

  Returns:
    An ``optax.GradientTransformation`` mapping per-task gradients to per-task gradients.

  References:
    Zhang et al., `Task-level Backbone-oriented Gradient Clip for Multi-Task Foundation
    Model Learning`, CVPR 2023 workshop (the clip and rescale steps of Algorithm 1).

  Examples:
    >>> import jax.numpy as jnp, optax, tbgc_jax
    >>> mask = {"backbone": True, "head": False}
    >>> tx = optax.chain(tbgc_jax.task_rescale(1.0, mask, tasks=("a", "b")),
    ...                  tbgc_jax.upgrad(mask, tasks=("a", "b")))
    >>> grads = {"a": {"backbone": jnp.array([30.0, 0.0]), "head": jnp.ones(1)},
    ...          "b": {"backbone": jnp.array([-1.0, 1.0]), "head": jnp.zeros(1)}}
    >>> out, _ = tx.update(grads, tx.init(grads["a"]))
    >>> [round(x, 4) for x in out["backbone"].tolist()]
    [0.25, 0.6036]
  """
  rule = _rescale_rule(rescale_heads) if rescale else _clip_rule
  return _per_task(_scale_tasks("task_rescale", rule, max_norm, backbone_mask, tasks,
                                drop_nonfinite=drop_nonfinite, needs_backbone=rescale))


def sum_tasks(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str]
              ) -> optax.GradientTransformation:
  """The plain multi-task baseline: sums the task gradients (the gradient of the summed loss).

  ``update = sum_t g_t``, summed in float32 in sorted-task order and cast back to the
  gradients' dtype; no clipping, no per-task state (`task_diagnostics` returns ``{}``).

  Args:
    backbone_mask: unused (accepted for the common method signature).
    tasks: the task names; ``update`` expects exactly these keys.

  Returns:
    An ``optax.GradientTransformation`` with an ``optax.EmptyState``.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.sum_tasks(tasks=("a", "b"))
    >>> out, _ = tx.update({"a": jnp.ones(2), "b": jnp.arange(2.0)}, tx.init(jnp.zeros(2)))
    >>> out.tolist()
    [1.0, 2.0]
  """
  del backbone_mask
  tasks = _check_tasks(tasks, "sum_tasks")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    treedef, leaves = _split_grads(updates, tasks, params, "sum_tasks")
    return _unflatten_cast(treedef, _sum_leaves(leaves, tasks), leaves, tasks), state

  return optax.GradientTransformation(init_fn, update_fn)


def task_diagnostics(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
  """Reads the per-task norms and scales of the last update from an optimizer state.

  Finds the `TaskClipState` anywhere inside ``opt_state`` (a chain, ``inject_hyperparams``
  or ``MultiSteps`` state) and returns, per task: ``total_norm`` and ``backbone_norm`` of the
  raw gradient, ``backbone_scale`` and ``head_scale`` (the factors applied; 0 for a dropped
  task), ``backbone_norm_after`` (= backbone_norm * backbone_scale, the task's backbone
  contribution; S for every task under TBGC) and ``num_nonfinite``. Works on traced or
  concrete states; nothing is fetched to the host.

  Args:
    opt_state: an optimizer state containing at most one `TaskClipState`.

  Returns:
    ``{task: {name: scalar}}``; ``{}`` for a state without a `TaskClipState` (e.g. of
    `sum_tasks` or the Gramian methods, whose diagnostics `gradient_diagnostics` reads).
  """
  st = find_state(opt_state, TaskClipState, where="task_diagnostics")
  if st is None:
    return {}
  return {
      t: {
          "total_norm": st.total_norm[t],
          "backbone_norm": st.backbone_norm[t],
          "backbone_norm_after": st.backbone_norm[t] * st.backbone_scale[t],
          "backbone_scale": st.backbone_scale[t],
          "head_scale": st.head_scale[t],
          "num_nonfinite": st.num_nonfinite[t],
      }
      for t in st.total_norm
  }


register("none", sum_tasks)
register("vanilla", vanilla_clip, checks={"max_norm": POSITIVE})
register("tbgc_star", per_task_clip, checks={"max_norm": POSITIVE})
register("tbgc", tbgc, checks={"max_norm": POSITIVE})
register("backbone_clip", backbone_clip, checks={"max_norm": POSITIVE})
