"""Stateful gradient balancing methods: GradNorm, MoCo and DB-MTL (as in LibMTL).

GradNorm learns one weight per task from the tasks' backbone gradient norms (a rule on the
Gramian's diagonal plus the losses, on the engine of ``aggregation.py``). MoCo and DB-MTL keep
a running estimate of every task's backbone gradient, so their state holds ``T`` float32
copies of the backbone gradient, and they form the update from those estimates rather than
from the raw gradients (the engine's elementwise rules); their diagnostics have no weights.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tbgc_jax._src import solvers
from tbgc_jax._src.aggregation import GramianState, Step, gramian, gramian_method
from tbgc_jax._src.base import safe_div
from tbgc_jax._src.clipping import _check_tasks
from tbgc_jax._src.masks import MaskOrFn, backbone_selector
from tbgc_jax._src.registry import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, register
from tbgc_jax._src.weighting import _stack_losses

_F32 = jnp.float32
GT = optax.GradientTransformationExtraArgs


def _with_buffers(where, backbone_mask, tx: GT, make_inner) -> GT:
  """``tx`` whose initial ``inner`` state is ``make_inner(zeros)``, with ``zeros`` one float32
  zero array per backbone leaf of params (the engine's ``init_inner`` does not see params)."""
  is_backbone = backbone_selector(backbone_mask, where=where, default=True)

  def init_fn(params):
    state = tx.init(params)
    leaves = jax.tree.leaves(params)
    zeros = [jnp.zeros(x.shape, _F32) for x, s in zip(leaves, is_backbone(params), strict=True)
             if s]
    return GramianState(state.diagnostics, make_inner(zeros))

  return GT(init_fn, tx.update)


def _step_size(base, decay, count):
  """``base / k**decay`` at update ``k = count + 1`` (LibMTL's decaying step sizes)."""
  return base / (count + 1).astype(_F32) ** decay


# --------------------------------------------------------------------------- GradNorm
class GradNormState(NamedTuple):
  """State of `gradnorm`."""

  weights: jax.Array  # f32[T]: the task weights w_t, summing to T.
  weights_opt_state: Any  # state of the weights' optimizer.
  initial_losses: jax.Array  # f32[T]: L_t(0), the losses of the first update.
  count: jax.Array  # i32[]: updates done.


@register("gradnorm", checks={"alpha": NON_NEGATIVE, "learning_rate": POSITIVE},
          uses_losses=True)
def gradnorm(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], alpha: float = 1.5,
             learning_rate: float = 1e-3, optimizer: optax.GradientTransformation | None = None,
             drop_nonfinite: bool = True) -> GT:
  r"""GradNorm: task weights learned so that the weighted gradient norms follow training rates.

  With :math:`G_t = w_t \|g_t\|` the norm of task :math:`t`'s weighted backbone gradient,
  :math:`\bar G` its mean over the tasks, and the relative inverse training rate
  :math:`r_t = \tilde L_t / \operatorname{mean}(\tilde L)`, :math:`\tilde L_t = L_t / L_t(0)`
  (Chen et al. 2018, Sec. 3.2):

  .. math::

    L_\text{grad}(w) = \sum_t \big| G_t - \bar G\, r_t^{\alpha} \big|, \qquad
    \text{update} = \sum_t w_t g_t,

  where the target :math:`\bar G r_t^\alpha` is held constant. Each update uses the current
  :math:`w`, then takes one step of ``optimizer`` (default ``optax.adam(learning_rate)``) on
  :math:`\partial L_\text{grad} / \partial w_t = \|g_t\| \operatorname{sign}(G_t -
  \bar G r_t^\alpha)`, clips the weights at 0 and renormalises them to sum :math:`T`
  (Algorithm 1). :math:`L_t(0)` is the loss of the first update; tasks with a zero or dropped
  gradient are left out of :math:`\bar G`. The norms are those of the whole backbone gradient
  (the paper takes the last shared layer; pass a ``backbone_mask`` selecting it for that).

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    alpha: the asymmetry :math:`\alpha \ge 0` (1.5 in LibMTL; the paper uses 0.12 to 3).
    learning_rate: Adam's step size for :math:`w` (used when ``optimizer`` is None).
    optimizer: any optax transformation to train :math:`w` with, instead of Adam.
    drop_nonfinite: drop a task with a non-finite gradient from the update (a non-finite
      loss counts as its initial loss, i.e. training rate 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    a `GradNormState`.

  References:
    Chen, Badrinarayanan, Lee, Rabinovich, `GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks`, ICML 2018, Sec. 3.2 and Algorithm 1.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.gradnorm(tasks=("a", "b"), learning_rate=0.1)
    >>> grads = {"a": jnp.array([10.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> state = tx.init(jnp.zeros(2))
    >>> for _ in range(3):
    ...   out, state = tx.update(grads, state, losses={"a": 1.0, "b": 1.0})
    >>> [round(float(x), 4) for x in state.inner.weights]  # the large gradient is weighted down
    [0.7, 1.3]
  """
  where = "gradnorm"
  tasks = _check_tasks(tasks, where)
  n = len(tasks)
  opt = optimizer if optimizer is not None else optax.adam(learning_rate)

  def init_inner():
    w = jnp.ones([n], _F32)
    return GradNormState(weights=w, weights_opt_state=opt.init(w),
                         initial_losses=jnp.ones([n], _F32), count=jnp.zeros([], jnp.int32))

  def combine(step: Step, state):
    losses = _stack_losses(step.losses, tasks, where)
    initial = jnp.where((state.count == 0) & jnp.isfinite(losses), losses, state.initial_losses)
    losses = jnp.where(jnp.isfinite(losses), losses, initial)
    rate = jnp.maximum(safe_div(losses, initial, fallback=losses), 0.0)
    active = step.active.astype(_F32)
    mean_rate = safe_div(jnp.sum(rate * active), jnp.sum(active))
    norms = jnp.sqrt(jnp.maximum(jnp.diag(step.gram), 0.0))
    g = state.weights * norms
    target = safe_div(jnp.sum(g * active), jnp.sum(active)) * safe_div(
        rate, mean_rate, fallback=rate) ** alpha
    grad_w = norms * jnp.sign(g - target) * active
    update, opt_state = opt.update(grad_w, state.weights_opt_state, state.weights)
    w = jnp.maximum(optax.apply_updates(state.weights, update), 0.0)
    w = jnp.where(jnp.sum(w) > 0, n * safe_div(w, jnp.sum(w)), 1.0)
    return jnp.diag(state.weights), GradNormState(w, opt_state, initial, state.count + 1)

  return gramian_method(where, backbone_mask, tasks, combine, init_inner=init_inner,
                        drop_nonfinite=drop_nonfinite)


# --------------------------------------------------------------------------- MoCo
class MocoState(NamedTuple):
  """State of `moco`."""

  estimates: dict[str, list[jax.Array]]  # per task, f32 leaves: y_t, its tracked gradient.
  lambdas: jax.Array  # f32[T]: the combination weights, on the simplex.
  count: jax.Array  # i32[]: updates done.


@register("moco", checks={"beta": UNIT_INTERVAL, "beta_sigma": NON_NEGATIVE,
                          "gamma": POSITIVE, "gamma_sigma": NON_NEGATIVE, "rho": NON_NEGATIVE})
def moco(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], beta: float = 0.5,
         beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
         rho: float = 0.0, drop_nonfinite: bool = True) -> GT:
  r"""MoCo: MGDA-style weights on tracked (bias-corrected) task gradients.

  At update :math:`k` (from 1), with step sizes :math:`\beta_k = \beta / k^{\sigma_\beta}`
  and :math:`\gamma_k = \gamma / k^{\sigma_\gamma}` (Fernando et al. 2023, Algorithm 1):

  .. math::

    y_t \leftarrow y_t - \beta_k (y_t - g_t), \qquad
    \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma_k (Y Y^\top + \rho I)\lambda\big),
    \qquad \text{update} = \sum_t \lambda_t y_t,

  with :math:`y_t = 0` and :math:`\lambda = 1/T` initially, :math:`Y` the matrix of rows
  :math:`y_t` and :math:`\Pi_\Delta` the projection onto the simplex. The step-size decays
  and defaults are LibMTL's, which differs in two places: it replaces the projection by a
  softmax and rescales each task gradient to norm :math:`L_t` before tracking it. A dropped
  task's estimate decays toward 0.

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys.
    beta: :math:`\beta \in [0, 1]`, the tracking step.
    beta_sigma: decay exponent of :math:`\beta_k`.
    gamma: :math:`\gamma > 0`, the step of :math:`\lambda`.
    gamma_sigma: decay exponent of :math:`\gamma_k`.
    rho: :math:`\rho \ge 0`, the regularisation of the :math:`\lambda` step.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    a `MocoState` (``T`` float32 copies of the backbone gradient).

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, `Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach`, ICLR 2023, Algorithm 1.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.moco(tasks=("a", "b"))
    >>> grads = {"a": jnp.array([2.0, 0.0]), "b": jnp.array([0.0, 4.0])}
    >>> out, state = tx.update(grads, tx.init(jnp.zeros(2)))
    >>> [round(x, 4) for x in state.inner.lambdas.tolist()]  # y = g / 2, lambda = P(0.45, 0.3)
    [0.575, 0.425]
    >>> [round(x, 4) for x in out.tolist()]
    [0.575, 0.85]
  """
  where = "moco"
  tasks = _check_tasks(tasks, where)
  n = len(tasks)

  def elementwise(bb, state, losses):
    del losses
    b = _step_size(beta, beta_sigma, state.count)
    y = {t: [e - b * (e - x) for e, x in zip(state.estimates[t], bb[t], strict=True)]
         for t in tasks}
    gram_y = gramian(y, [True] * len(bb[tasks[0]]), tasks)
    c = _step_size(gamma, gamma_sigma, state.count)
    lam = state.lambdas - c * (gram_y + rho * jnp.eye(n, dtype=_F32)) @ state.lambdas
    lam = solvers.project_simplex(lam, jnp.ones([n], bool))
    out = [sum(lam[k] * y[t][i] for k, t in enumerate(tasks)) for i in range(len(bb[tasks[0]]))]
    norm_after = lam * jnp.sqrt(jnp.maximum(jnp.diag(gram_y), 0.0))
    return out, norm_after, MocoState(y, lam, state.count + 1)

  tx = gramian_method(where, backbone_mask, tasks, elementwise=elementwise,
                      init_inner=lambda: None, drop_nonfinite=drop_nonfinite)
  return _with_buffers(where, backbone_mask, tx, lambda zeros: MocoState(
      {t: list(zeros) for t in tasks}, jnp.full([n], 1.0 / n, _F32), jnp.zeros([], jnp.int32)))


# --------------------------------------------------------------------------- DB-MTL
class DbMtlState(NamedTuple):
  """State of `db_mtl`."""

  estimates: dict[str, list[jax.Array]]  # per task, f32 leaves: the EMA of grad log L_t.
  count: jax.Array  # i32[]: updates done.


@register("db_mtl", checks={"beta": UNIT_INTERVAL, "beta_sigma": NON_NEGATIVE,
                            "eps": POSITIVE}, uses_losses=True)
def db_mtl(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], beta: float = 0.9,
           beta_sigma: float = 0.0, eps: float = 1e-8, drop_nonfinite: bool = True) -> GT:
  r"""DB-MTL: dual balancing, log-transformed losses and gradients rescaled to the largest norm.

  Loss-scale balancing takes the gradient of :math:`\log L_t`, i.e.
  :math:`g_t / (L_t + \epsilon)`; gradient-scale balancing keeps an exponential moving
  average of it per task and rescales every average to the largest norm (Lin et al. 2023,
  Sec. 3):

  .. math::

    \hat g_t \leftarrow \beta_k \hat g_t + (1 - \beta_k) \frac{g_t}{L_t + \epsilon}, \qquad
    \text{update} = \sum_t \frac{\max_s \|\hat g_s\|}{\|\hat g_t\| + \epsilon}\, \hat g_t,

  with :math:`\hat g_t = 0` initially and :math:`\beta_k = \beta / k^{\sigma}` at update
  :math:`k` (LibMTL's decay; :math:`\sigma = 0` is the paper's constant :math:`\beta`). Every
  task then contributes a backbone gradient of the same norm. A non-finite loss counts as 1.

  Args:
    backbone_mask: as in `tbgc_jax.famo`.
    tasks: the task names; ``update`` expects exactly these keys in ``grads`` and ``losses``.
    beta: :math:`\beta \in [0, 1]`, the EMA's decay (0.9 in LibMTL).
    beta_sigma: decay exponent :math:`\sigma` of :math:`\beta_k`.
    eps: :math:`\epsilon`, added to the losses and to the norms.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose ``inner`` is
    a `DbMtlState` (``T`` float32 copies of the backbone gradient).

  References:
    Lin, Ye, Xu, Shi, Zhang, Kwok, `Dual-Balancing for Multi-Task Learning`,
    arXiv:2308.12029, 2023, Sec. 3.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.db_mtl(tasks=("a", "b"))
    >>> grads = {"a": jnp.array([2.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> out, _ = tx.update(grads, tx.init(jnp.zeros(2)), losses={"a": 1.0, "b": 4.0})
    >>> [round(float(x), 4) for x in out]  # both rescaled to (1 - 0.9) * 2
    [0.2, 0.2]
  """
  where = "db_mtl"
  tasks = _check_tasks(tasks, where)

  def elementwise(bb, state, losses):
    losses = _stack_losses(losses, tasks, where)
    inv = 1.0 / (jnp.where(jnp.isfinite(losses), losses, 1.0) + eps)
    b = _step_size(beta, beta_sigma, state.count)
    est = {t: [b * e + (1.0 - b) * inv[k] * x for e, x in zip(state.estimates[t], bb[t],
                                                                strict=True)]
           for k, t in enumerate(tasks)}
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gramian(est, [True] * len(bb[tasks[0]]), tasks)),
                                 0.0))
    scale = jnp.max(norms) / (norms + eps)
    out = [sum(scale[k] * est[t][i] for k, t in enumerate(tasks))
           for i in range(len(bb[tasks[0]]))]
    return out, scale * norms, DbMtlState(est, state.count + 1)

  tx = gramian_method(where, backbone_mask, tasks, elementwise=elementwise,
                      init_inner=lambda: None, drop_nonfinite=drop_nonfinite)
  return _with_buffers(where, backbone_mask, tx, lambda zeros: DbMtlState(
      {t: list(zeros) for t in tasks}, jnp.zeros([], jnp.int32)))
