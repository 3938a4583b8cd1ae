"""Scalarizations of the task losses (geometric mean, smooth Tchebycheff, PBI), IMTL-L and IMTL.

A scalarization ``s(L_1, ..., L_T)`` turns the losses into one objective; its gradient is
``sum_t (ds/dL_t) g_t``, so each method here is a loss-based weighting ``w_t = ds/dL_t``
evaluated at the losses of the step, run on the engine of ``weighting.py`` (backbone leaves
weighted, head leaves summed, non-finite tasks dropped, weights in
`tbgc_jax.gradient_diagnostics`). IMTL combines the IMTL-L loss scales with IMTL-G on the
scaled gradients, so it also reads the Gramian.

Preference vectors and ideal points are mappings ``{task: value}``, so they do not depend on
the order of ``tasks``.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tbgc_jax._src.aggregation import Step, gramian_method
from tbgc_jax._src.base import safe_div
from tbgc_jax._src.clipping import _check_tasks
from tbgc_jax._src.masks import MaskOrFn
from tbgc_jax._src.methods import imtl_g_weights
from tbgc_jax._src.registry import NON_NEGATIVE, POSITIVE, register
from tbgc_jax._src.weighting import _loss_weighting, _stack_losses

_F32 = jnp.float32
_TINY = 1e-30
GT = optax.GradientTransformationExtraArgs


def _finite_or(losses: jax.Array, fallback) -> jax.Array:
  return jnp.where(jnp.isfinite(losses), losses, fallback)


def _per_task(values: Mapping[str, float] | None, tasks: tuple[str, ...], default: float,
              name: str, where: str) -> np.ndarray:
  """A ``{task: value}`` hyperparameter as a float32 vector in ``tasks`` order."""
  if values is None:
    return np.full([len(tasks)], default, np.float32)
  if hasattr(values, "keys") and not isinstance(values, Mapping):  # an ml_collections.ConfigDict
    values = {k: values[k] for k in values.keys()}
  if not isinstance(values, Mapping) or set(values) != set(tasks):
    raise ValueError(f"{where}: {name} must map each task of {list(tasks)} to a number, got "
                     f"{values!r}")
  return np.array([float(values[t]) for t in tasks], np.float32)


# --------------------------------------------------------------------------- geometric mean
@register("geometric_mean", uses_losses=True)
def geometric_mean(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
                   drop_nonfinite: bool = True) -> GT:
  r"""Geometric loss strategy (GLS): minimises the geometric mean of the task losses.

  .. math::

    s(L) = \Big(\prod_t L_t\Big)^{1/T}, \qquad
    w_t = \frac{\partial s}{\partial L_t} = \frac{s(L)}{T\,L_t},

  so a task's weight is inversely proportional to its loss (Chennupati et al. 2019; LibMTL's
  ``GLS``, TorchJD's ``GeometricMean``). Losses must be positive; a non-finite loss
  counts as 1.

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Chennupati, Sistu, Yogamani, Rawashdeh, `MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning`, CVPR 2019 workshops (GLS).

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.geometric_mean(tasks=("a", "b"))
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, _ = tx.update(grads, tx.init(jnp.zeros(2)), losses={"a": 1.0, "b": 4.0})
    >>> [round(float(x), 4) for x in out]  # sqrt(4) / (2 L_t)
    [1.0, 0.25]
  """
  n = len(tasks)

  def weights_fn(losses, inner):
    log = jnp.log(jnp.maximum(_finite_or(losses, 1.0), _TINY))
    return jnp.exp(jnp.mean(log) - log) / n, inner

  return _loss_weighting("geometric_mean", backbone_mask, tasks, optax.EmptyState, weights_fn,
                         drop_nonfinite)


# --------------------------------------------------------------------------- STCH
@register("stch", checks={"mu": POSITIVE}, uses_losses=True)
def stch(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], mu: float = 1.0,
         preference: Mapping[str, float] | None = None, ideal: Mapping[str, float] | None = None,
         drop_nonfinite: bool = True) -> GT:
  r"""Smooth Tchebycheff scalarization (STCH): a smoothed maximum of the weighted losses.

  With preference :math:`\lambda` and ideal point :math:`z^*`:

  .. math::

    s(L) = \mu \log \sum_t \exp\Big(\frac{\lambda_t (L_t - z^*_t)}{\mu}\Big), \qquad
    w_t = \lambda_t\, \mathrm{softmax}\Big(\frac{\lambda (L - z^*)}{\mu}\Big)_t

  (Lin et al. 2024; TorchJD's ``STCH``). As :math:`\mu \to 0`, :math:`s` tends to the
  Tchebycheff scalarization :math:`\max_t \lambda_t (L_t - z^*_t)` and all the weight goes
  to the worst task; as :math:`\mu \to \infty`, to :math:`\lambda / T`. The weights sum to
  :math:`\sum_t \lambda_t` at most. A non-finite loss counts as 1.

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    mu: the smoothing :math:`\mu > 0` (the paper evaluates 0.01 to 1; LibMTL's default is 1).
    preference: ``{task: lambda_t}`` (default ``1 / T`` each, the simplex centre).
    ideal: ``{task: z*_t}``, a lower bound of each loss (default 0).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Lin, Zhang, Liu, Zhang, Kwong, `Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization`, ICML 2024.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.stch(tasks=("a", "b"), mu=0.01)
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, _ = tx.update(grads, tx.init(jnp.zeros(2)), losses={"a": 1.0, "b": 2.0})
    >>> [round(float(x), 4) for x in out]  # nearly all of the weight 1/2 on the worst task
    [0.0, 0.5]
  """
  where = "stch"
  tasks = _check_tasks(tasks, where)
  lam = _per_task(preference, tasks, 1.0 / len(tasks), "preference", where)
  z = _per_task(ideal, tasks, 0.0, "ideal", where)

  def weights_fn(losses, inner):
    return lam * jax.nn.softmax(lam * (_finite_or(losses, 1.0) - z) / mu), inner

  return _loss_weighting(where, backbone_mask, tasks, optax.EmptyState, weights_fn,
                         drop_nonfinite)


# --------------------------------------------------------------------------- PBI
@register("pbi", checks={"theta": NON_NEGATIVE}, uses_losses=True)
def pbi(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], theta: float = 5.0,
        preference: Mapping[str, float] | None = None, ideal: Mapping[str, float] | None = None,
        drop_nonfinite: bool = True) -> GT:
  r"""Penalty-based boundary intersection (PBI) of the losses.

  With :math:`f = L - z^*` and the unit preference direction :math:`\hat\lambda`:

  .. math::

    d_1 = f^\top \hat\lambda, \quad d_2 = \|f - d_1 \hat\lambda\|, \quad s = d_1 + \theta d_2,
    \qquad w = \hat\lambda + \theta\,\frac{f - d_1 \hat\lambda}{d_2}

  (Zhang & Li 2007, Sec. II-C; TorchJD's ``PBI``): progress along the preference direction,
  plus a penalty on the distance from it. Where :math:`d_2 = 0` the penalty's gradient is
  taken as 0. Weights can be negative: a task ahead of its preferred share is pushed back.
  A non-finite loss counts as 1.

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    theta: the penalty :math:`\theta \ge 0` (5 in the paper).
    preference: ``{task: lambda_t}``, non-negative (default: equal, the diagonal direction).
    ideal: ``{task: z*_t}``, a lower bound of each loss (default 0).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Zhang & Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition`,
    IEEE Transactions on Evolutionary Computation 11(6), 2007, Sec. II-C.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.pbi(tasks=("a", "b"), theta=1.0)
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, _ = tx.update(grads, tx.init(jnp.zeros(2)), losses={"a": 1.0, "b": 3.0})
    >>> [round(float(x), 4) for x in out]  # (1 - 1, 1 + 1) / sqrt(2)
    [0.0, 1.4142]
  """
  where = "pbi"
  tasks = _check_tasks(tasks, where)
  lam = _per_task(preference, tasks, 1.0, "preference", where)
  if np.any(lam < 0) or not np.any(lam > 0):
    raise ValueError(f"{where}: preference must be non-negative and not all zero, got "
                     f"{preference!r}")
  direction = lam / np.linalg.norm(lam)
  z = _per_task(ideal, tasks, 0.0, "ideal", where)

  def weights_fn(losses, inner):
    f = _finite_or(losses, 1.0) - z
    perp = f - jnp.dot(f, direction) * direction
    d2 = jnp.sqrt(jnp.sum(jnp.square(perp)))
    return direction + theta * safe_div(perp, d2), inner

  return _loss_weighting(where, backbone_mask, tasks, optax.EmptyState, weights_fn,
                         drop_nonfinite)


# --------------------------------------------------------------------------- IMTL-L, IMTL
class ImtlState(NamedTuple):
  """State of `imtl_l` and `imtl`."""

  log_scales: jax.Array  # f32[T]: s_t; the task's loss is scaled by exp(s_t).
  log_scales_opt_state: Any  # state of the log-scales' optimizer.


def _log_scales(tasks, learning_rate, init_log_scale, optimizer):
  """IMTL-L's learned loss scales: ``(init, step)``, ``step(losses, state) -> (e^s, state)``.

  ``step`` returns the scales of the current ``s`` and takes one optimizer step on
  ``d/ds_t (e^{s_t} L_t - s_t) = e^{s_t} L_t - 1`` (0 for a non-finite loss).
  """
  opt = optimizer if optimizer is not None else optax.adam(learning_rate)

  def init():
    s = jnp.full([len(tasks)], init_log_scale, _F32)
    return ImtlState(log_scales=s, log_scales_opt_state=opt.init(s))

  def step(losses, state):
    s = state.log_scales
    scales = jnp.exp(s)
    grad_s = jnp.where(jnp.isfinite(losses), scales * losses - 1.0, 0.0)
    update, opt_state = opt.update(grad_s, state.log_scales_opt_state, s)
    return scales, ImtlState(optax.apply_updates(s, update), opt_state)

  return init, step


@register("imtl_l", checks={"learning_rate": POSITIVE}, uses_losses=True)
def imtl_l(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
           learning_rate: float = 1e-3, init_log_scale: float = 0.0,
           optimizer: optax.GradientTransformation | None = None,
           drop_nonfinite: bool = True) -> GT:
  r"""IMTL-L: learned loss scales, the loss-balance half of Impartial Multi-Task Learning.

  The model minimises :math:`\sum_t e^{s_t} L_t - s_t` (Liu et al. 2021, IMTL-L), so

  .. math::

    w_t = e^{s_t}, \qquad \frac{\partial}{\partial s_t} = e^{s_t} L_t - 1,

  whose fixed point :math:`e^{s_t} L_t = 1` makes every scaled loss equal to 1. The
  :math:`s_t` live in the transform's state: each update uses the current scales, then takes
  one step of ``optimizer`` (default ``optax.adam(learning_rate)``) on :math:`s`, i.e.
  simultaneous descent on the model and the scales. This is `tbgc_jax.uncertainty` with
  :math:`s = -\log\sigma^2` and twice its weights.

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    learning_rate: Adam's step size for :math:`s` (used when ``optimizer`` is None).
    init_log_scale: the initial :math:`s_t` (0: the plain sum).
    optimizer: any optax transformation to train :math:`s` with, instead of Adam.
    drop_nonfinite: drop a task with a non-finite gradient from the update (a non-finite
      loss gives its :math:`s_t` a zero gradient).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    an `ImtlState`.

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, `Towards Impartial Multi-task Learning`,
    ICLR 2021 (IMTL-L).

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.imtl_l(tasks=("a", "b"))
    >>> grads = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, state = tx.update(grads, tx.init(jnp.zeros(2)), losses={"a": 4.0, "b": 0.5})
    >>> out.tolist(), [round(float(x), 4) for x in state.inner.log_scales]
    ([1.0, 1.0], [-0.001, 0.001])
  """
  where = "imtl_l"
  tasks = _check_tasks(tasks, where)
  init, step = _log_scales(tasks, learning_rate, init_log_scale, optimizer)
  return _loss_weighting(where, backbone_mask, tasks, init, step, drop_nonfinite)


@register("imtl", checks={"learning_rate": POSITIVE}, uses_losses=True)
def imtl(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
         learning_rate: float = 1e-3, init_log_scale: float = 0.0,
         optimizer: optax.GradientTransformation | None = None,
         drop_nonfinite: bool = True) -> GT:
  r"""IMTL: IMTL-G on the gradients of the IMTL-L-scaled losses (the paper's hybrid).

  With the scales :math:`c_t = e^{s_t}` of `imtl_l`, the scaled gradients are
  :math:`c_t g_t`; IMTL-G (`tbgc_jax.imtl_g`) finds weights :math:`\alpha` summing to 1 whose
  combination has equal projections on every scaled task's unit gradient (Liu et al. 2021,
  Eq. 10), so

  .. math::

    \text{update} = \sum_t \alpha_t c_t g_t, \qquad
    \alpha = \mathrm{IMTL\text{-}G}(\mathrm{diag}(c)\, G\, \mathrm{diag}(c)),

  and :math:`s` then takes the IMTL-L step (the paper's hybrid, which applies IMTL-G to the
  shared parameters and the scaled losses to the task-specific ones; here head leaves get
  the plain sum, as for every method of this package).

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    learning_rate: Adam's step size for :math:`s` (used when ``optimizer`` is None).
    init_log_scale: the initial :math:`s_t`.
    optimizer: any optax transformation to train :math:`s` with, instead of Adam.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    an `ImtlState`; the diagnostics' weights are :math:`\alpha_t c_t`.

  References:
    Liu et al., `Towards Impartial Multi-task Learning`, ICLR 2021, IMTL-L, IMTL-G (Eq. 10)
    and their hybrid.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.imtl(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> out, _ = tx.update(J, tx.init(jnp.zeros(3)), losses={"a": 1.0, "b": 1.0})
    >>> [round(x, 4) for x in out.tolist()]  # s = 0 at the first step: IMTL-G
    [0.0767, 1.0, 1.0]
  """
  where = "imtl"
  tasks = _check_tasks(tasks, where)
  init, scale_step = _log_scales(tasks, learning_rate, init_log_scale, optimizer)

  def combine(step: Step, inner):
    c, inner = scale_step(_stack_losses(step.losses, tasks, where), inner)
    alpha = imtl_g_weights(c[:, None] * step.gram * c[None, :], step.active)
    return jnp.diag(alpha * c), inner

  return gramian_method(where, backbone_mask, tasks, combine, init_inner=init,
                        drop_nonfinite=drop_nonfinite)
