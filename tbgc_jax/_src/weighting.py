"""Loss-based multi-task weightings: FAMO, DWA, RLW and uncertainty weighting.

Each method turns the per-task losses of the step into one weight per task, ``w_t``, and
returns ``sum_t w_t g_t`` (the gradient of the weighted loss ``sum_t w_t L_t``, by linearity)
on the backbone leaves. Head leaves receive the plain sum of the tasks' head gradients, as in
every method of this package, so only the shared parameters are balanced; each head leaf is
touched by one task only, so an Adam-like optimizer after the transform normalizes its scale
anyway. With ``backbone_mask=None`` every leaf is weighted: the exact gradient of the weighted
loss.

The transforms are ``optax.GradientTransformationExtraArgs``:
``update(grads, state, params=None, *, losses)`` with ``grads = {task: gradient pytree}`` and
``losses = {task: scalar loss}`` (the losses the gradients came from). They change the pytree
structure, so they must be the first link of an ``optax.chain``; the chain forwards
``losses=`` to them.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tbgc_jax._src.clipping import _check_tasks, _split_grads
from tbgc_jax._src.masks import MaskOrFn, mask_leaves

_F32 = jnp.float32


def _stack_losses(losses: Any, tasks: tuple[str, ...], where: str) -> jax.Array:
  """The losses as a float32 vector in ``tasks`` order, after checking the task names."""
  if not isinstance(losses, Mapping):
    raise TypeError(
        f"{where}: pass the per-task losses as update(..., losses={{task: loss}}), got "
        f"{type(losses).__name__}")
  if set(losses) != set(tasks):
    raise ValueError(f"{where}: got losses for tasks {sorted(losses)}, expected {list(tasks)}")
  return jnp.stack([jnp.asarray(losses[t], _F32).reshape(()) for t in tasks])


def _weighted_sum(updates, tasks, params, weights, backbone_mask, where):
  """``sum_t w_t g_t`` on the backbone leaves and ``sum_t g_t`` on the others (float32 sums).

  ``weights`` is a float32 vector in ``tasks`` order; ``backbone_mask=None`` weights every leaf.
  """
  treedef, leaves = _split_grads(updates, tasks, params, where)
  n = len(leaves[tasks[0]])
  if backbone_mask is None:
    select = [True] * n
  else:
    select = mask_leaves(backbone_mask, updates[tasks[0]], where=where)
  out = []
  for i, sel in enumerate(select):
    acc = sum((leaves[t][i].astype(_F32) * weights[k] if sel else leaves[t][i].astype(_F32))
              for k, t in enumerate(tasks))
    out.append(acc.astype(jnp.result_type(*(leaves[t][i] for t in tasks))))
  return jax.tree.unflatten(treedef, out)


def _as_dict(vector: jax.Array, tasks: tuple[str, ...]) -> dict[str, jax.Array]:
  return {t: vector[k] for k, t in enumerate(tasks)}


def _weighting_transform(where, tasks, backbone_mask, init_extra, weights_fn):
  """Shared init/update: ``weights_fn(loss_vector, state) -> (weights, new_state)``."""

  def init_fn(params):
    if backbone_mask is not None and not any(mask_leaves(backbone_mask, params, where=where)):
      raise ValueError(f"{where}: backbone_mask selects no parameter leaf as backbone")
    return init_extra()

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    loss_vec = _stack_losses(losses, tasks, where)
    weights, new_state = weights_fn(loss_vec, state)
    out = _weighted_sum(updates, tasks, params, weights, backbone_mask, where)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- FAMO
class FamoState(NamedTuple):
  """State of `famo`."""

  logits: jax.Array  # f32[T]: the task logits xi; the weights are softmax(xi) rescaled.
  logits_opt_state: Any  # state of the logits' optimizer (Adam with L2 decay).
  prev_losses: jax.Array  # f32[T]: the losses of the previous update.
  count: jax.Array  # i32[]: updates done.
  weights: dict[str, jax.Array]  # f32[]: per task, the weight applied in the last update.


def famo(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    learning_rate: float = 0.025,
    weight_decay: float = 0.01,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""FAMO: fast adaptive multitask optimization (loss-based, O(1) in the number of tasks).

  With logits :math:`\xi` and :math:`z = \mathrm{softmax}(\xi)`, the update is the gradient
  of :math:`\sum_t z_t \log \ell_t / c` with :math:`c = \sum_t z_t / \ell_t` held constant:

  .. math::

    \text{update} = \sum_t w_t g_t, \qquad w_t = \frac{z_t / \ell_t}{\sum_s z_s / \ell_s},

  (Liu et al. 2023, Eq. 6; ``\ell_t + eps`` in place of :math:`\ell_t`), so the weights sum
  to 1. Before forming it, the logits take one step on the observed change of the log-losses
  since the previous update, :math:`\delta = J_z(\xi)^\top(\log \ell^{prev} - \log \ell)`
  (Eq. 8), with Adam at ``learning_rate`` and L2 decay ``weight_decay`` (the :math:`\gamma`
  of Eq. 9), as in the authors' code. The first update only records the losses.

  The paper's code measures :math:`\log \ell^{prev} - \log \ell` on the *same* batch with an
  extra forward pass after the parameter step. A transform sees each loss once, so here the
  change is measured between consecutive updates (consecutive batches): exact for full-batch
  training, one extra source of noise with minibatches, and no extra forward pass. Losses
  must be positive (the method takes their logarithm); subtract a known lower bound first.

  Args:
    backbone_mask: bools shaped like params (or a prefix, or a callable of params), True on
      the shared leaves, which receive the weighted sum; the others get the plain sum.
      ``None``: every leaf is weighted.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    learning_rate: the logits' step size :math:`\beta` (0.025 in the paper).
    weight_decay: :math:`\gamma`, L2 decay of the logits (0.01 in the authors' code; the
      paper tunes it per benchmark in {0.0001, 0.001, 0.01}).
    eps: added to each loss before the logarithm and the division.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `FamoState`.

  References:
    Liu, Liu, Stone, Liu, `FAMO: Fast Adaptive Multitask Optimization`, NeurIPS 2023,
    Eqs. 6, 8 and 9 and Algorithm 1.

  Example:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.famo(tasks=("a", "b"))
    >>> params = jnp.zeros(2)
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, state = tx.update(grads, tx.init(params), params, losses={"a": 1.0, "b": 3.0})
    >>> [round(float(x), 4) for x in out]  # z = (1/2, 1/2): weights prop. to 1/loss
    [0.75, 0.25]
  """
  where = "famo"
  tasks = _check_tasks(tasks, where)
  logits_opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

  def init_extra():
    logits = jnp.zeros([len(tasks)], _F32)
    return FamoState(
        logits=logits, logits_opt_state=logits_opt.init(logits),
        prev_losses=jnp.zeros([len(tasks)], _F32), count=jnp.zeros([], jnp.int32),
        weights={t: jnp.full([], 1.0 / len(tasks), _F32) for t in tasks})

  def weights_fn(losses, state):
    log_loss = jnp.log(losses + eps)
    delta = jnp.log(state.prev_losses + eps) - log_loss
    # d xi = J^T delta for the softmax Jacobian J = diag(z) - z z^T.
    _, vjp = jax.vjp(jax.nn.softmax, state.logits)
    (dxi,) = vjp(delta)
    step, opt_state = logits_opt.update(dxi, state.logits_opt_state, state.logits)
    first = state.count == 0
    logits = jnp.where(first, state.logits, optax.apply_updates(state.logits, step))
    opt_state = jax.tree.map(lambda a, b: jnp.where(first, a, b), state.logits_opt_state,
                             opt_state)
    z = jax.nn.softmax(logits)
    ratio = z / (losses + eps)
    weights = ratio / jnp.sum(ratio)
    new_state = FamoState(
        logits=logits, logits_opt_state=opt_state, prev_losses=losses, count=state.count + 1,
        weights=_as_dict(weights, tasks))
    return weights, new_state

  return _weighting_transform(where, tasks, backbone_mask, init_extra, weights_fn)


# --------------------------------------------------------------------------- DWA
class DwaState(NamedTuple):
  """State of `dwa`."""

  loss_sum: jax.Array  # f32[T]: sum of the losses seen so far in the current epoch.
  last: jax.Array  # f32[T]: mean loss of the last complete epoch, L(e-1).
  before_last: jax.Array  # f32[T]: mean loss of the epoch before it, L(e-2).
  count: jax.Array  # i32[]: updates done.
  weights: dict[str, jax.Array]  # f32[]: per task, the weight applied in the last update.


def dwa(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    temperature: float = 2.0,
    steps_per_epoch: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic weight average (DWA, from MTAN): weights from each task's rate of loss decrease.

  For epoch :math:`e` and :math:`K` tasks, with :math:`L_k(e)` the mean training loss of
  task :math:`k` over epoch :math:`e`:

  .. math::

    w_k(e) = \frac{K \exp(r_k(e-1) / T)}{\sum_i \exp(r_i(e-1) / T)}, \qquad
    r_k(e-1) = \frac{L_k(e-1)}{L_k(e-2)},

  and :math:`w_k = 1` for the first two epochs (Liu et al. 2019, Eq. 7). The epoch is
  ``steps_per_epoch`` updates: the transform averages the losses it is given over each
  epoch and changes the weights only at epoch boundaries. ``steps_per_epoch=1`` makes every
  update an epoch (weights from the last two steps' losses, a noisier variant).

  Args:
    backbone_mask: as in `famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    temperature: :math:`T` (2 in the paper).
    steps_per_epoch: updates per epoch, over which the losses are averaged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `DwaState`.

  References:
    Liu, Johns, Davison, `End-to-End Multi-Task Learning with Attention`, CVPR 2019, Eq. 7.

  Example:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.dwa(tasks=("a", "b"))
    >>> params = jnp.zeros(2)
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> state = tx.init(params)
    >>> for la, lb in [(4.0, 4.0), (2.0, 4.0), (1.0, 1.0)]:  # a halved its loss, b did not
    ...   out, state = tx.update(grads, state, params, losses={"a": la, "b": lb})
    >>> [round(float(x), 4) for x in out]  # 2 softmax([0.5, 1] / 2)
    [0.8756, 1.1244]
  """
  where = "dwa"
  tasks = _check_tasks(tasks, where)
  if steps_per_epoch < 1:
    raise ValueError(f"{where}: steps_per_epoch must be >= 1, got {steps_per_epoch}")
  k = len(tasks)

  def init_extra():
    zeros = jnp.zeros([k], _F32)
    return DwaState(loss_sum=zeros, last=zeros, before_last=zeros,
                    count=jnp.zeros([], jnp.int32),
                    weights={t: jnp.ones([], _F32) for t in tasks})

  def weights_fn(losses, state):
    epoch = state.count // steps_per_epoch
    ratio = state.last / jnp.where(state.before_last != 0, state.before_last, 1.0)
    weights = jnp.where(epoch >= 2, k * jax.nn.softmax(ratio / temperature), jnp.ones([k], _F32))
    loss_sum = state.loss_sum + losses
    ends = (state.count + 1) % steps_per_epoch == 0
    new_state = DwaState(
        loss_sum=jnp.where(ends, 0.0, loss_sum),
        last=jnp.where(ends, loss_sum / steps_per_epoch, state.last),
        before_last=jnp.where(ends, state.last, state.before_last),
        count=state.count + 1, weights=_as_dict(weights, tasks))
    return weights, new_state

  return _weighting_transform(where, tasks, backbone_mask, init_extra, weights_fn)


# --------------------------------------------------------------------------- RLW
class RlwState(NamedTuple):
  """State of `rlw`."""

  key: jax.Array  # PRNG key, split every update; the draw of update n depends only on n.
  weights: dict[str, jax.Array]  # f32[]: per task, the weight applied in the last update.


def rlw(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    key: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Random loss weighting (RLW): fresh random weights every update.

  .. math::

    w = \mathrm{softmax}(\epsilon), \qquad \epsilon \sim \mathcal{N}(0, I_K),

  drawn anew at every update (Lin et al. 2022, Eq. 2 with the standard normal, the paper's
  default); the weights sum to 1. The losses are not used (they are still required, so that
  every loss-based method takes the same arguments). The key lives in the state and is split
  every update, so a run restored from a checkpointed state continues the same sequence.

  Args:
    backbone_mask: as in `famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    key: a PRNG key or an integer seed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a `RlwState`.

  References:
    Lin, Ye, Xu, Shi, Zhang, `Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning`, TMLR 2022, Eq. 2.

  Example:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.rlw(tasks=("a", "b", "c"), key=0)
    >>> params = jnp.zeros(3)
    >>> grads = {t: jnp.eye(3)[i] for i, t in enumerate("abc")}
    >>> out, state = tx.update(grads, tx.init(params), params,
    ...                        losses={"a": 1.0, "b": 1.0, "c": 1.0})
    >>> round(float(out.sum()), 5)
    1.0
  """
  where = "rlw"
  tasks = _check_tasks(tasks, where)
  init_key = jax.random.key(key) if isinstance(key, int) else key

  def init_extra():
    return RlwState(key=init_key,
                    weights={t: jnp.full([], 1.0 / len(tasks), _F32) for t in tasks})

  def weights_fn(losses, state):
    del losses
    next_key, draw_key = jax.random.split(state.key)
    weights = jax.nn.softmax(jax.random.normal(draw_key, [len(tasks)], _F32))
    return weights, RlwState(key=next_key, weights=_as_dict(weights, tasks))

  return _weighting_transform(where, tasks, backbone_mask, init_extra, weights_fn)


# --------------------------------------------------------------------------- uncertainty
class UncertaintyState(NamedTuple):
  """State of `uncertainty`."""

  log_vars: jax.Array  # f32[T]: s_t = log sigma_t^2, learned inside the transform.
  log_vars_opt_state: Any  # state of the log-variances' optimizer.
  weights: dict[str, jax.Array]  # f32[]: per task, the weight applied in the last update.


def uncertainty(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    learning_rate: float = 1e-3,
    init_log_var: float = 0.0,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Uncertainty weighting: task weights from learned homoscedastic log-variances.

  The model minimizes :math:`\sum_t \frac{1}{2\sigma_t^2} L_t + \log\sigma_t` (Kendall et al.
  2018, Eq. 7), parametrized by :math:`s_t = \log\sigma_t^2` (Sec. 3.2):

  .. math::

    \mathcal{L}(\theta, s) = \sum_t \tfrac12 e^{-s_t} L_t(\theta) + \tfrac12 s_t, \qquad
    \text{update} = \sum_t \tfrac12 e^{-s_t} g_t.

  The :math:`s_t` are not model parameters here: they live in the transform's state. Each
  update does, in order: (1) weights :math:`w_t = \frac12 e^{-s_t}` from the current
  :math:`s`; (2) the exact gradient
  :math:`\partial\mathcal{L}/\partial s_t = \frac12 (1 - e^{-s_t} L_t)` at the same point,
  from the losses passed in; (3) one step of ``optimizer`` (default
  ``optax.adam(learning_rate)``) on :math:`s`. That is simultaneous gradient descent on
  :math:`(\theta, s)`, as when :math:`s` is trained with the model; its fixed point is
  :math:`e^{s_t} = L_t`. The same weight ½ is used for every task (the regression form, as
  LibMTL does; the paper's classification form drops the ½).

  Args:
    backbone_mask: as in `famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    learning_rate: Adam's step size for :math:`s` (used when ``optimizer`` is None).
    init_log_var: the initial :math:`s_t` (0: :math:`\sigma_t = 1`, weights ½).
    optimizer: any optax transformation to train :math:`s` with, instead of Adam.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an `UncertaintyState`.

  References:
    Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics`, CVPR 2018, Eq. 7 and Sec. 3.2.

  Example:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.uncertainty(tasks=("a", "b"))
    >>> params = jnp.zeros(2)
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, state = tx.update(grads, tx.init(params), params, losses={"a": 4.0, "b": 0.5})
    >>> out.tolist(), [round(float(x), 4) for x in state.log_vars]
    ([0.5, 0.5], [0.001, -0.001])
  """
  where = "uncertainty"
  tasks = _check_tasks(tasks, where)
  opt = optimizer if optimizer is not None else optax.adam(learning_rate)

  def init_extra():
    log_vars = jnp.full([len(tasks)], init_log_var, _F32)
    return UncertaintyState(log_vars=log_vars, log_vars_opt_state=opt.init(log_vars),
                            weights={t: jnp.full([], 0.5 * jnp.exp(-init_log_var), _F32)
                                     for t in tasks})

  def weights_fn(losses, state):
    s = state.log_vars
    weights = 0.5 * jnp.exp(-s)
    grad_s = 0.5 * (1.0 - jnp.exp(-s) * losses)
    step, opt_state = opt.update(grad_s, state.log_vars_opt_state, s)
    return weights, UncertaintyState(log_vars=optax.apply_updates(s, step),
                                     log_vars_opt_state=opt_state,
                                     weights=_as_dict(weights, tasks))

  return _weighting_transform(where, tasks, backbone_mask, init_extra, weights_fn)
