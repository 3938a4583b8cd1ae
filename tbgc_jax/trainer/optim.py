"""The optimizer: gradient method, then AdamW per parameter group (lr multiplier, weight decay)."""

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tbgc_jax

# config.grad fields: the method, its hyperparameters, and how the step runs.
GRAD_FIELDS = ("method", "hparams", "step_mode", "sequential")



def method_hyperparameters(grad_cfg: Any) -> dict[str, Any]:
  """``config.grad.hparams`` as a dict, checked against ``config.grad.method``'s signature.

  ``config.grad`` holds the method's name (``method``), its hyperparameters (``hparams``,
  each a keyword of the method's factory) and the step's form (``step_mode``,
  ``sequential``); nothing else.

  Raises:
    ValueError: naming the config field: an unknown method, a hyperparameter the method does
      not take, a missing required one, an invalid value, or another field in ``config.grad``.

  Examples:
    >>> import ml_collections
    >>> grad = ml_collections.ConfigDict({"method": "tbgc", "hparams": {"max_norm": 0.1}})
    >>> method_hyperparameters(grad)
    {'max_norm': 0.1}
  """
  tbgc_jax.get_method(grad_cfg.method, where="config.grad.method")
  extra = sorted(set(grad_cfg.keys()) - set(GRAD_FIELDS))
  if extra:
    raise ValueError(f"config.grad.{extra[0]}: config.grad takes only {GRAD_FIELDS}; the "
                     f"method's hyperparameters go in config.grad.hparams (e.g. "
                     f"config.grad.hparams.{extra[0]})")
  hparams = dict(grad_cfg.get("hparams", None) or {})
  tbgc_jax.check_method(grad_cfg.method, hparams, prefix="config.grad.hparams.")
  return hparams


def param_labels(params: Any, backbone_mask: Callable[[Any], Any], no_decay: str = "") -> Any:
  """The optimizer group of every leaf: ``"backbone"`` or ``"head"``, with ``".no_decay"``
  appended where ``no_decay`` (a regex) is found in the leaf's "/"-joined path.

  Args:
    params: the parameters (arrays or ShapeDtypeStructs).
    backbone_mask: ``params -> bool pytree``, True on backbone leaves.
    no_decay: regex of the paths without weight decay (``config.optim.no_decay``, e.g.
      ``configs/challenge.py``'s ``NO_DECAY``); "" for none.

  Returns:
    A tree of strings shaped like ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"backbone": {"norm": {"scale": jnp.ones(2)}, "fc": {"kernel": jnp.ones(2)}},
    ...           "heads": {"cls": {"kernel": jnp.ones(2)}}}
    >>> labels = param_labels(params, tbgc_jax.path_mask("^backbone"), "norm")
    >>> labels["backbone"]["norm"]["scale"], labels["backbone"]["fc"]["kernel"]
    ('backbone.no_decay', 'backbone')
  """
  pattern = re.compile(no_decay) if no_decay else None

  def label(path, is_backbone):
    name = "backbone" if is_backbone else "head"
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    return f"{name}.no_decay" if pattern is not None and pattern.search(key) else name

  return jax.tree_util.tree_map_with_path(label, backbone_mask(params))


def lr_schedules(optim_cfg: Any, total_steps: int, steps_per_epoch: int
                 ) -> dict[str, optax.Schedule]:
  """Cosine decay with linear warm-up from ``lr * warmup_ratio`` (mmcv's 'linear' warm-up) to
  ``lr * final_lr_ratio`` (default 0; mmengine's CosineAnnealingLR ``eta_min``) at
  ``total_steps``. Steps are optimizer updates.

  Returns:
    ``{"head": schedule, "backbone": schedule * backbone_lr_mult}``.
  """
  warmup = min(int(round(optim_cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  head = optax.warmup_cosine_decay_schedule(
      init_value=optim_cfg.lr * optim_cfg.warmup_ratio, peak_value=optim_cfg.lr,
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=optim_cfg.lr * float(optim_cfg.get("final_lr_ratio", 0.0)))
  mult = optim_cfg.backbone_lr_mult
  return {"head": head, "backbone": lambda step: head(step) * mult}


@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """A params-shaped tree packed as one flat vector per group of leaves.

  Groups are the leaves' labels (``"backbone"``, ``"head"``), split further by dtype when a
  group mixes dtypes. The update of a few hundred leaves then compiles as a handful of large
  element-wise kernels instead of several per leaf (XLA:CPU compiles each kernel separately;
  see docs/performance.md). Leaves keep their order inside a group.

  Attributes:
    treedef: structure of the tree.
    groups: ``(name, leaf indices)`` per group, in first-leaf order.
    shapes: shape of every leaf.
  """

  treedef: Any
  groups: tuple[tuple[str, tuple[int, ...]], ...]
  shapes: tuple[tuple[int, ...], ...]

  @classmethod
  def of(cls, tree: Any, labels: Any) -> "FlatLayout":
    """The layout of ``tree`` (arrays or ShapeDtypeStructs) grouped by the ``labels`` tree."""
    leaves, treedef = jax.tree.flatten(tree)
    names = jax.tree.leaves(labels)
    dtypes = {(n, np.dtype(x.dtype)) for n, x in zip(names, leaves, strict=True)}
    split = {n for n, _ in dtypes if sum(m == n for m, _ in dtypes) > 1}
    groups: dict[str, list[int]] = {}
    for i, (n, x) in enumerate(zip(names, leaves, strict=True)):
      groups.setdefault(f"{n}/{np.dtype(x.dtype).name}" if n in split else n, []).append(i)
    return cls(treedef, tuple((g, tuple(ix)) for g, ix in groups.items()),
               tuple(tuple(np.shape(x)) for x in leaves))

  def ravel(self, tree: Any) -> dict[str, jax.Array]:
    """``{group: 1-D array}``: the group's leaves, flattened and concatenated."""
    leaves = self.treedef.flatten_up_to(tree)
    return {g: jnp.concatenate([jnp.ravel(leaves[i]) for i in ix]) for g, ix in self.groups}

  def unravel(self, flat: dict[str, jax.Array]) -> Any:
    """The tree of ``flat`` (inverse of `ravel`)."""
    leaves: list[Any] = [None] * len(self.shapes)
    for g, ix in self.groups:
      offsets = np.cumsum([0] + [int(np.prod(self.shapes[i])) for i in ix])
      for k, i in enumerate(ix):
        leaves[i] = flat[g][offsets[k]:offsets[k + 1]].reshape(self.shapes[i])
    return self.treedef.unflatten(leaves)


def flat_groups(make_inner: Callable[[Callable[[Any], Any]], optax.GradientTransformation],
                labels: Callable[[Any], Any]) -> optax.GradientTransformationExtraArgs:
  """Runs a multi-task transform on one flat vector per group of leaves.

  Same updates as ``make_inner`` on the trees (element-wise math is unchanged; sums over
  leaves may round differently), with far smaller compiled programs.

  Args:
    make_inner: ``group_labels -> transform``: builds the transform for the flat
      representation, given ``flat -> {group: label}``.
    labels: ``params -> label tree`` (one string per leaf).

  Returns:
    A transform whose ``init`` takes the params tree and whose ``update`` takes
    ``{task: params-shaped gradient}`` (plus the inner transform's extra arguments) and
    returns a params-shaped update. Its state is the inner transform's on the flat vectors.
  """
  def layout(params):
    return FlatLayout.of(params, labels(params))

  def group_labels(flat):
    return {g: g.split("/")[0] for g in flat}

  inner = make_inner(group_labels)

  def init_fn(params):
    return inner.init(layout(params).ravel(params))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("flat_groups needs params (the layout of the gradients).")
    lay = layout(params)
    flat = {t: lay.ravel(g) for t, g in updates.items()}
    out, state = inner.update(flat, state, lay.ravel(params), **extra_args)
    return lay.unravel(out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class NonFiniteState(NamedTuple):
  """Counters of `drop_nonfinite`: ``count`` (steps dropped), ``streak`` (latest in a row),
  ``kept`` (whether each task was kept in the last update); ``{task: scalar}`` each."""

  count: dict[str, jax.Array]
  streak: dict[str, jax.Array]
  kept: dict[str, jax.Array]


def drop_nonfinite(tasks: Sequence[str]) -> optax.GradientTransformationExtraArgs:
  """The trainer's policy for a diverging task, as the first link before any gradient method.

  A task whose loss (``losses`` extra argument) or gradient has a NaN or Inf contributes a
  zero gradient to this update (the other tasks still train); its counters advance.
  """
  tasks = tuple(tasks)

  def init_fn(params):
    del params
    zeros = lambda dtype: {t: jnp.zeros([], dtype) for t in tasks}
    return NonFiniteState(zeros(jnp.int32), zeros(jnp.int32), {t: jnp.ones([], bool)
                                                                   for t in tasks})

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del params, extra_args
    ok = {t: tbgc_jax.all_finite(updates[t]) for t in tasks}
    if losses is not None:
      ok = {t: ok[t] & jnp.isfinite(losses[t]) for t in tasks}
    updates = {t: jax.tree.map(lambda g, keep=ok[t]: jnp.where(keep, g, jnp.zeros_like(g)),
                               updates[t]) for t in tasks}
    bad = {t: (~ok[t]).astype(jnp.int32) for t in tasks}
    return updates, NonFiniteState({t: state.count[t] + bad[t] for t in tasks},
                                   {t: (state.streak[t] + 1) * bad[t] for t in tasks}, ok)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nonfinite_counters(opt_state: Any) -> NonFiniteState:
  """The `NonFiniteState` inside an optimizer state built by `make_optimizer`."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, NonFiniteState))
           if isinstance(s, NonFiniteState)]
  if len(found) != 1:
    raise ValueError(f"expected one NonFiniteState in the optimizer state, found {len(found)}")
  return found[0]


def make_optimizer(
    config: Any, tasks: Sequence[str], backbone_mask: Callable[[Any], Any],
    total_steps: int, steps_per_epoch: int,
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """The gradient method (first link) chained with AdamW per parameter group.

  Args:
    config: the trainer config (uses ``config.grad`` and ``config.optim``).
    tasks: task names (the keys of the per-task gradients).
    backbone_mask: ``params -> bool pytree``, True on backbone leaves.
    total_steps: number of optimizer steps of the run.
    steps_per_epoch: steps in one epoch (for the warm-up length).

  The chain is `drop_nonfinite` (the non-finite task policy; counters read by
  `nonfinite_counters`), the gradient method, then AdamW, one per group of `param_labels`
  (``optax.multi_transform``): the backbone at ``lr * config.optim.backbone_lr_mult``, the
  heads at ``lr``, and the paths matching ``config.optim.no_decay`` without weight decay.
  With ``config.optim.flat_update`` (default True) it runs on one flat vector per leaf group
  (`flat_groups`), which compiles far faster and gives the same updates up to float rounding
  of sums over leaves. Everything here is float32 whatever ``config.precision`` (master
  weights): parameters, moments, per-task gradients, norms and Gramians.

  Returns:
    ``(tx, schedules)``; ``tx.init`` takes the params tree, ``tx.update`` takes
    ``{task: grads}``, the params and ``losses={task: loss}`` and returns a params-shaped update.
  """
  hparams = method_hyperparameters(config.grad)
  schedules = lr_schedules(config.optim, total_steps, steps_per_epoch)
  no_decay = str(config.optim.get("no_decay", "") or "")
  adamw = {}
  for name, sched in schedules.items():
    adamw[name] = optax.adamw(sched, b1=config.optim.b1, b2=config.optim.b2,
                              weight_decay=config.optim.weight_decay)
    if no_decay:  # the group exists only then: the optimizer state has no empty groups
      adamw[f"{name}.no_decay"] = optax.adamw(sched, b1=config.optim.b1, b2=config.optim.b2,
                                              weight_decay=0.0)

  def labels(params):
    return param_labels(params, backbone_mask, no_decay)

  def make(group_labels):
    mask = lambda p: jax.tree.map(lambda name: name.split(".")[0] == "backbone",
                                  group_labels(p))
    method = tbgc_jax.make_method(config.grad.method, mask, tasks=tasks, **hparams)
    return optax.chain(drop_nonfinite(tasks), method, optax.multi_transform(adamw, group_labels))

  if not config.optim.get("flat_update", True):
    return make(labels), schedules
  return flat_groups(make, labels), schedules
