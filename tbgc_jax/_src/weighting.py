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
``losses=`` to them. They run on the engine of the Gramian methods (``aggregation.py``) with
the combination ``C = diag(w)``, so they share its weighted sum, its non-finite guard and its
diagnostics (`tbgc_jax.gradient_diagnostics`: weights, norms, cosines); the method's own
state is the ``inner`` field of the ``GramianState``.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tbgc_jax._src.aggregation import Step, gramian_method
from tbgc_jax._src.base import check_tasks as _check_tasks
from tbgc_jax._src.base import safe_div
from tbgc_jax._src.masks import MaskOrFn
from tbgc_jax._src.registry import NON_NEGATIVE, POSITIVE, register

_F32 = jnp.float32
GT = optax.GradientTransformationExtraArgs


def _stack_losses(losses: Any, tasks: tuple[str, ...], where: str) -> jax.Array:
  """The losses as a float32 vector in ``tasks`` order, after checking the task names."""
  if not isinstance(losses, Mapping):
    raise TypeError(
        f"{where}: pass the per-task losses as update(..., losses={{task: loss}}), got "
        f"{type(losses).__name__}")
  if set(losses) != set(tasks):
    raise ValueError(f"{where}: got losses for tasks {sorted(losses)}, expected {list(tasks)}")
  return jnp.stack([jnp.asarray(losses[t], _F32).reshape(()) for t in tasks])


def _loss_weighting(where, backbone_mask, tasks, init_inner, weights_fn, drop_nonfinite):
  """A loss-based method on the shared engine: ``C = diag(w)`` from the losses.

  ``weights_fn(losses f32[T], inner) -> (w f32[T], inner)``; the engine forms
  ``sum_t w_t g_t`` on the backbone leaves, the plain sum on the others, and drops tasks with
  non-finite gradients. Each ``weights_fn`` keeps its state finite when a loss is not.
  """
  tasks = _check_tasks(tasks, where)

  def combine(step: Step, inner):
    losses = _stack_losses(step.losses, tasks, where)
    w, inner = weights_fn(losses, inner)
    return jnp.diag(w), inner

  return gramian_method(where, backbone_mask, tasks, combine, init_inner=init_inner,
                        drop_nonfinite=drop_nonfinite)


# --------------------------------------------------------------------------- FAMO
class FamoState(NamedTuple):
  """State of `famo`."""

  logits: jax.Array  # f32[T]: the task logits xi; the weights are softmax(xi) rescaled.
  logits_opt_state: Any  # state of the logits' optimizer (Adam with L2 decay).
  prev_losses: jax.Array  # f32[T]: the losses of the previous update.
  count: jax.Array  # i32[]: updates done.


@register("famo", checks={"learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE,
                         "eps": POSITIVE}, uses_losses=True)
def famo(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    learning_rate: float = 0.025,
    weight_decay: float = 0.01,
    eps: float = 1e-8,
    drop_nonfinite: bool = True,
) -> GT:
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
    drop_nonfinite: drop a task with a non-finite gradient from the update (a non-finite
      loss leaves the logits unchanged).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    a `FamoState`; the weights are in its diagnostics (`tbgc_jax.gradient_diagnostics`).

  References:
    Liu, Liu, Stone, Liu, `FAMO: Fast Adaptive Multitask Optimization`, NeurIPS 2023,
    Eqs. 6, 8 and 9 and Algorithm 1.

  Examples:
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

  def init_inner():
    logits = jnp.zeros([len(tasks)], _F32)
    return FamoState(
        logits=logits, logits_opt_state=logits_opt.init(logits),
        prev_losses=jnp.ones([len(tasks)], _F32), count=jnp.zeros([], jnp.int32))

  def weights_fn(losses, state):
    losses = jnp.where(jnp.isfinite(losses), losses, state.prev_losses)
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
        logits=logits, logits_opt_state=opt_state, prev_losses=losses, count=state.count + 1)
    return weights, new_state

  return _loss_weighting(where, backbone_mask, tasks, init_inner, weights_fn, drop_nonfinite)


# --------------------------------------------------------------------------- DWA
class DwaState(NamedTuple):
  """State of `dwa`."""

  loss_sum: jax.Array  # f32[T]: sum of the losses seen so far in the current epoch.
  last: jax.Array  # f32[T]: mean loss of the last complete epoch, L(e-1).
  before_last: jax.Array  # f32[T]: mean loss of the epoch before it, L(e-2).
  count: jax.Array  # i32[]: updates done.


@register("dwa", checks={"temperature": POSITIVE, "steps_per_epoch": POSITIVE},
          uses_losses=True)
def dwa(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    temperature: float = 2.0,
    steps_per_epoch: int = 1,
    drop_nonfinite: bool = True,
) -> GT:
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
    drop_nonfinite: drop a task with a non-finite gradient from the update (a non-finite
      loss counts as the last epoch's mean, or 1 in the first epoch).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    a `DwaState`.

  References:
    Liu, Johns, Davison, `End-to-End Multi-Task Learning with Attention`, CVPR 2019, Eq. 7.

  Examples:
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

  def init_inner():
    zeros = jnp.zeros([k], _F32)
    return DwaState(loss_sum=zeros, last=zeros, before_last=zeros,
                    count=jnp.zeros([], jnp.int32))

  def weights_fn(losses, state):
    fallback = jnp.where(state.count >= steps_per_epoch, state.last, 1.0)
    losses = jnp.where(jnp.isfinite(losses), losses, fallback)
    epoch = state.count // steps_per_epoch
    ratio = safe_div(state.last, state.before_last, fallback=state.last,
                     where=state.before_last != 0)
    weights = jnp.where(epoch >= 2, k * jax.nn.softmax(ratio / temperature), jnp.ones([k], _F32))
    loss_sum = state.loss_sum + losses
    ends = (state.count + 1) % steps_per_epoch == 0
    new_state = DwaState(
        loss_sum=jnp.where(ends, 0.0, loss_sum),
        last=jnp.where(ends, loss_sum / steps_per_epoch, state.last),
        before_last=jnp.where(ends, state.last, state.before_last),
        count=state.count + 1)
    return weights, new_state

  return _loss_weighting(where, backbone_mask, tasks, init_inner, weights_fn, drop_nonfinite)


# --------------------------------------------------------------------------- RLW
@register("rlw", uses_losses=True)
def rlw(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    seed: int = 0,
    drop_nonfinite: bool = True,
) -> GT:
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
    seed: seed of the PRNG key in the state.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    the PRNG key, split every update (the draw of update ``n`` depends only on ``seed`` and
    ``n``).

  References:
    Lin, Ye, Xu, Shi, Zhang, `Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning`, TMLR 2022, Eq. 2.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.rlw(tasks=("a", "b", "c"), seed=0)
    >>> params = jnp.zeros(3)
    >>> grads = {t: jnp.eye(3)[i] for i, t in enumerate("abc")}
    >>> out, state = tx.update(grads, tx.init(params), params,
    ...                        losses={"a": 1.0, "b": 1.0, "c": 1.0})
    >>> round(float(out.sum()), 5)
    1.0
  """
  where = "rlw"
  tasks = _check_tasks(tasks, where)
  def weights_fn(losses, key):
    del losses
    next_key, draw_key = jax.random.split(key)
    return jax.nn.softmax(jax.random.normal(draw_key, [len(tasks)], _F32)), next_key

  return _loss_weighting(where, backbone_mask, tasks, lambda: jax.random.key(seed), weights_fn,
                         drop_nonfinite)


# --------------------------------------------------------------------------- uncertainty
class UncertaintyState(NamedTuple):
  """State of `uncertainty`."""

  log_vars: jax.Array  # f32[T]: s_t = log sigma_t^2, learned inside the transform.
  log_vars_opt_state: Any  # state of the log-variances' optimizer.


@register("uncertainty", checks={"learning_rate": POSITIVE}, uses_losses=True)
def uncertainty(
    backbone_mask: MaskOrFn | None = None,
    *,
    tasks: Sequence[str],
    learning_rate: float = 1e-3,
    init_log_var: float = 0.0,
    optimizer: optax.GradientTransformation | None = None,
    drop_nonfinite: bool = True,
) -> GT:
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
    drop_nonfinite: drop a task with a non-finite gradient from the update (a non-finite
      loss gives its :math:`s_t` a zero gradient).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    an `UncertaintyState`.

  References:
    Kendall, Gal, Cipolla, `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics`, CVPR 2018, Eq. 7 and Sec. 3.2.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.uncertainty(tasks=("a", "b"))
    >>> params = jnp.zeros(2)
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, state = tx.update(grads, tx.init(params), params, losses={"a": 4.0, "b": 0.5})
    >>> out.tolist(), [round(float(x), 4) for x in state.inner.log_vars]
    ([0.5, 0.5], [0.001, -0.001])
  """
  where = "uncertainty"
  tasks = _check_tasks(tasks, where)
  opt = optimizer if optimizer is not None else optax.adam(learning_rate)

  def init_inner():
    log_vars = jnp.full([len(tasks)], init_log_var, _F32)
    return UncertaintyState(log_vars=log_vars, log_vars_opt_state=opt.init(log_vars))

  def weights_fn(losses, state):
    s = state.log_vars
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.exp(s))
    weights = 0.5 * jnp.exp(-s)
    grad_s = 0.5 * (1.0 - jnp.exp(-s) * losses)
    step, opt_state = opt.update(grad_s, state.log_vars_opt_state, s)
    return weights, UncertaintyState(log_vars=optax.apply_updates(s, step),
                                     log_vars_opt_state=opt_state)

  return _loss_weighting(where, backbone_mask, tasks, init_inner, weights_fn, drop_nonfinite)
