"""Gradient methods whose weights evolve across updates: MoDo, SDMGrad, CR-MOGM smoothing,
Priority-Constrained Descent and ExcessMTL.

Same interface as ``methods.py`` (``{task: gradient pytree}`` in, one params-shaped update out,
head leaves summed, ``drop_nonfinite``); each keeps its own state in the ``inner`` field of the
``GramianState`` (a typed NamedTuple below), so runs resume exactly from a checkpointed state.
MoDo and SDMGrad are stochastic algorithms whose analysis draws the two factors of the Gramian
from independent minibatches; a transform sees one gradient per task, so they run on the
Gramian of the batch (their deterministic form, see ``docs/methods.md``).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tbgc_jax._src import solvers
from tbgc_jax._src.aggregation import GramianState, Step, gramian_method
from tbgc_jax._src.base import check_tasks, safe_div
from tbgc_jax._src.libmtl import _with_buffers
from tbgc_jax._src.masks import MaskOrFn
from tbgc_jax._src.registry import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    check_method,
    make_method,
    register,
)
from tbgc_jax._src.robust import task_vector

_F32 = jnp.float32
GT = optax.GradientTransformationExtraArgs
_BELOW_ONE: tuple[Callable[[Any], bool], str] = (lambda x: 0 <= x < 1, "in [0, 1)")


# --------------------------------------------------------------------------- MoDo
@register("modo", checks={"gamma": POSITIVE, "rho": NON_NEGATIVE})
def modo(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], gamma: float = 0.1,
         rho: float = 0.1, drop_nonfinite: bool = True) -> GT:
  r"""MoDo: one projected gradient step on the task weights per update.

  ``lambda <- Pi_simplex(lambda - gamma (G lambda + rho lambda))``, update ``J^T lambda`` with the
  new ``lambda`` (Chen, Fernando, Ying, Chen, Eqs. 2.9a-2.9b); ``lambda`` starts at ``1 / T`` and
  lives in the state. The paper forms ``G = J_1 J_2^T`` from two independent minibatches (and the
  update from a third); here ``G`` is the Gramian of the batch's task gradients. ``gamma`` is in
  units of ``1 / G``: the weights move faster with larger gradients. Inactive tasks get weight 0
  and the projection is onto the simplex of the active ones.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    gamma: ``gamma > 0``, the weights' step size (TorchJD's default 0.1).
    rho: ``rho >= 0``, the L2 regularisation of the weights (TorchJD's default 0.1).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` (inner: ``f32[T]``,
    the weights).

  References:
    Chen, Fernando, Ying, Chen, `Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance`, JMLR 2024, Eqs. 2.9a-2.9b.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.modo(tasks=("a", "b"), gamma=0.1, rho=0.0)
    >>> J = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 2.0])}
    >>> out, state = tx.update(J, tx.init(jnp.zeros(2)))
    >>> [round(float(x), 4) for x in state.inner]  # (1/2, 1/2) - 0.1 (1/2, 2), projected
    [0.575, 0.425]
  """
  n = len(check_tasks(tasks, "modo"))

  def combine(step: Step, lam):
    moved = solvers.project_simplex(lam - gamma * (step.gram @ lam + rho * lam), step.active)
    lam = jnp.where(jnp.any(step.active), moved, lam)
    return jnp.diag(lam), lam

  return gramian_method("modo", backbone_mask, tasks, combine,
                        init_inner=lambda: jnp.full([n], 1.0 / n, _F32),
                        drop_nonfinite=drop_nonfinite)


# --------------------------------------------------------------------------- SDMGrad
@register("sdmgrad", checks={"learning_rate": POSITIVE, "momentum": _BELOW_ONE,
                             "iterations": POSITIVE, "lambda_": NON_NEGATIVE})
def sdmgrad(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
            learning_rate: float = 10.0, momentum: float = 0.5, iterations: int = 20,
            lambda_: float = 0.3, preference: Mapping[str, float] | Sequence[float] | None = None,
            drop_nonfinite: bool = True) -> GT:
  r"""SDMGrad: MGDA's weights pulled towards a preferred direction, by stochastic descent.

  With the preference ``w~`` (default ``1 / T``), SDMGrad solves
  ``min_{w in simplex} 1/2 ||J^T w + lambda J^T w~||^2`` by projected steps
  ``w <- Pi_simplex(w - beta G (w + lambda w~))`` warm-started from the previous update's ``w``
  (Xiao, Ban, Ji, Algorithm 1 and Eq. 9), and the update is ``J^T (w + lambda w~) / (1 + lambda)``.
  As in the authors' code (and LibMTL's and TorchJD's), each update runs ``iterations`` steps of
  heavy-ball momentum ``momentum`` (restarted every update) on ``G / (mean_t ||g_t||)^2``
  (plus 1e-8), which makes ``learning_rate`` independent of the gradients' scale. The paper
  forms ``G`` from two independent minibatches; here it is the Gramian of the batch.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    learning_rate: the inner step size ``beta`` (10, the authors').
    momentum: the inner momentum in [0, 1) (0.5, the authors').
    iterations: inner steps per update (20, the authors').
    lambda_: ``lambda >= 0``, the pull towards the preference (0.3, the authors' experiments;
      0 gives a stochastic MGDA, large values the preferred direction).
    preference: ``w~`` as ``{task: weight}`` or a sequence in the order of ``tasks`` (None:
      uniform).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` (inner: ``f32[T]``,
    the simplex weights ``w``).

  References:
    Xiao, Ban, Ji, `Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms`, NeurIPS 2023, Eq. 9 and Algorithm 1.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.sdmgrad(tasks=("a", "b"), learning_rate=0.5)
    >>> J = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 3.0])}
    >>> out, state = tx.update(J, tx.init(jnp.zeros(2)))
    >>> [round(float(x), 4) for x in state.inner]  # the minimizer sits on a vertex
    [1.0, 0.0]
    >>> [round(float(x), 4) for x in out]  # J^T (w + 0.3 / 2) / 1.3
    [0.8846, 0.3462]
  """
  n = len(check_tasks(tasks, "sdmgrad"))
  pref = (jnp.full([n], 1.0 / n, _F32) if preference is None
          else jnp.asarray(task_vector(preference, tasks, "sdmgrad", "preference"), _F32))

  def combine(step: Step, w):
    scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diag(step.gram), 0.0)))
    a = step.gram / (scale**2 + 1e-8)

    def body(k, carry):
      w, velocity = carry
      grad = a @ (w + lambda_ * pref)
      velocity = jnp.where(k == 0, grad, momentum * velocity + grad)
      return solvers.project_simplex(w - learning_rate * velocity, step.active), velocity

    moved, _ = jax.lax.fori_loop(0, iterations, body, (w, jnp.zeros_like(w)))
    w = jnp.where(jnp.any(step.active), moved, w)
    return jnp.diag((w + lambda_ * pref) / (1.0 + lambda_)), w

  return gramian_method("sdmgrad", backbone_mask, tasks, combine,
                        init_inner=lambda: jnp.full([n], 1.0 / n, _F32),
                        drop_nonfinite=drop_nonfinite)


# --------------------------------------------------------------------------- CR-MOGM
class CrmogmState(NamedTuple):
  """State of `crmogm`."""

  weights: jax.Array  # f32[T]: the smoothed weights lambda_k of the last update.
  count: jax.Array  # i32[]: updates done.
  wrapped: Any  # the wrapped method's own state (its GramianState.inner), or None.


@register("crmogm", checks={"alpha": UNIT_INTERVAL})
def crmogm(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
           inner: str | Callable[[Step], jax.Array] = "mgda", alpha: float = 0.9,
           inner_hparams: Mapping[str, Any] | None = None,
           initial_weights: Mapping[str, float] | Sequence[float] | None = None,
           drop_nonfinite: bool = True) -> GT:
  r"""CR-MOGM: any weighting method's weights smoothed by an exponential moving average.

  With ``lambda_hat_k`` the weights the wrapped method gives at update ``k``,
  ``lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda_hat_k`` and the update is
  ``J^T lambda_k`` (Zhou et al., Eq. 5, with a constant ``alpha``); ``lambda_0`` is
  ``initial_weights``, or else ``lambda_hat_1`` (the first update is then the wrapped method's).
  The paper's schedule (``alpha_k`` rising towards 1 as the learning rate decays, Corollary 1)
  is obtained with ``optax.inject_hyperparams`` on ``alpha``.

  ``inner`` is either a registered method name (built with ``inner_hparams``; it must report
  per-task weights: every Gramian or loss-based method, not ``graddrop``, ``trimmed_mean`` or
  the clipping methods) or a function ``Step -> f32[T]`` of the Gramian. The wrapped method
  keeps its own state (inside this one's), so stateful methods (``pcgrad``'s key, ``famo``'s
  logits) can be smoothed too.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    inner: the wrapped method: a registered name (default ``"mgda"``, the paper's base
      method) or a weighting ``Step -> f32[T]``.
    alpha: in [0, 1]: 0 returns the wrapped weights, 1 freezes ``lambda_0`` (0.9, TorchJD's
      default).
    inner_hparams: hyperparameters of a named ``inner``.
    initial_weights: ``lambda_0`` as ``{task: weight}`` or a sequence in the order of ``tasks``.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose inner is a
    `CrmogmState`; its diagnostics are those of the smoothed update.

  References:
    Zhou, Zhang, Zhou, Zhang, Feng, Wang, `On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond`, NeurIPS 2022, Eq. 5 and Corollary 1.

  Examples:
    >>> import jax, jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.crmogm(tasks=("a", "b"), inner="imtl_g", alpha=0.5)
    >>> state, update = tx.init(jnp.zeros(2)), jax.jit(tx.update)
    >>> for g in ([0.0, 1.0], [0.0, 3.0]):  # IMTL-G's weights: (1/2, 1/2), then (3/4, 1/4)
    ...   out, state = update({"a": jnp.array([1.0, 0.0]), "b": jnp.array(g)}, state)
    >>> [round(float(x), 4) for x in state.inner.weights]
    [0.625, 0.375]
  """
  where = "crmogm"
  names = check_tasks(tasks, where)
  n = len(names)
  lam0 = (None if initial_weights is None else
          jnp.asarray(task_vector(initial_weights, tasks, where, "initial_weights"), _F32))

  def smooth(w_hat, st):
    prev = jnp.where(st.count == 0, w_hat if lam0 is None else lam0, st.weights)
    return alpha * prev + (1.0 - alpha) * w_hat

  if callable(inner):
    if inner_hparams:
      raise ValueError(f"{where}: inner_hparams applies to a named inner method only")

    def combine(step: Step, st):
      lam = smooth(jnp.asarray(inner(step), _F32), st)
      return jnp.diag(lam), CrmogmState(lam, st.count + 1, None)

    return gramian_method(
        where, backbone_mask, tasks, combine,
        init_inner=lambda: CrmogmState(jnp.zeros([n], _F32), jnp.zeros([], jnp.int32), None),
        drop_nonfinite=drop_nonfinite)

  if not isinstance(inner, str):
    raise TypeError(f"{where}: inner must be a method name or a function Step -> weights, got "
                    f"{type(inner).__name__}")
  check_method(inner, dict(inner_hparams or {}), prefix=f"{where}: inner_hparams.")
  wrapped = make_method(inner, backbone_mask, tasks=tasks, **dict(inner_hparams or {}))
  # The smoothed weights are applied by the engine; they come in through its state.
  outer = gramian_method(where, backbone_mask, tasks, lambda step, lam: (jnp.diag(lam), lam),
                         drop_nonfinite=drop_nonfinite)

  def init_fn(params):
    state = wrapped.init(params)
    if not isinstance(state, GramianState) or state.diagnostics.weights is None:
      raise ValueError(f"{where}: inner method {inner!r} reports no per-task weights to smooth")
    return GramianState(state.diagnostics, CrmogmState(
        jnp.zeros([n], _F32), jnp.zeros([], jnp.int32), state.inner))

  def update_fn(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    st = state.inner
    _, inner_state = wrapped.update(updates, GramianState(state.diagnostics, st.wrapped), params,
                                    losses=losses)
    w_hat = jnp.stack([inner_state.diagnostics.weights[t] for t in names]).astype(_F32)
    lam = smooth(w_hat, st)
    out, outer_state = outer.update(updates, GramianState(state.diagnostics, lam), params)
    return out, GramianState(outer_state.diagnostics,
                             CrmogmState(lam, st.count + 1, inner_state.inner))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- PCD
class PcdState(NamedTuple):
  """State of `pcd`."""

  sq_norm_ema: jax.Array  # f32[T]: moving average of each task's squared backbone norm.
  count: jax.Array  # i32[T]: updates in which the task was active (for the bias correction).


def nonnegative_qp(q: jax.Array, b: jax.Array, active: jax.Array,
                   iterations: int = 300) -> jax.Array:
  """``argmin_{mu >= 0, mu[~active] = 0} 1/2 mu^T q mu - b^T mu`` for a PSD ``q`` of unit scale.

  FISTA from 0 (``iterations``), then ``2 T`` active-set steps as in `solvers.simplex_qp`: solve
  ``q_FF mu_F = b_F`` (pseudo-inverse) on the support ``F``; keep it when non-negative and no
  worse; add the coordinate whose gradient is most negative, or drop the most negative one.
  Exact once the support is right. Unbounded problems (infeasible primals) return a point whose
  primal constraints are violated, which the caller checks.
  """
  n = q.shape[0]
  step = 1.0 / solvers._lipschitz(q)
  project = lambda mu: jnp.where(active, jnp.maximum(mu, 0.0), 0.0)
  mu = solvers._fista(lambda mu: q @ mu - b, project, jnp.zeros_like(b), step, iterations)
  objective = lambda mu: 0.5 * mu @ q @ mu - b @ mu

  def body(_, carry):
    free, best = carry
    m = jnp.where(free[:, None] & free[None, :], q, 0.0)
    x = jnp.where(free, jnp.linalg.pinv(m, hermitian=True) @ jnp.where(free, b, 0.0), 0.0)
    feasible = jnp.all(jnp.isfinite(x)) & jnp.all(x >= 0) & jnp.any(free)
    best = jnp.where(feasible & (objective(x) <= objective(best)), x, best)
    grad = q @ best - b
    violation = jnp.where(free | ~active, jnp.inf, grad)
    add = jnp.argmin(violation)
    grow = free.at[add].set(free[add] | (violation[add] < -1e-6))
    shrink = free.at[jnp.argmin(jnp.where(free, x, jnp.inf))].set(False)
    return jnp.where(feasible, grow, shrink), best

  _, mu = jax.lax.fori_loop(0, 2 * n, body, (active & (mu > 1e-6 * jnp.max(mu)), mu))
  return mu


@register("pcd", checks={"beta": _BELOW_ONE, "eps": NON_NEGATIVE})
def pcd(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], primary: str,
        tau: float | Mapping[str, float] = 0.02, beta: float = 0.999, eps: float = 1e-8,
        drop_nonfinite: bool = True) -> GT:
  r"""Priority-Constrained Descent: follow the primary task's gradient, guaranteeing every
  secondary task a fraction ``tau`` of its own normalised progress.

  With normalised gradients ``g~_i = s_i g_i``, ``s_i = (v^_i + eps)^{-1/2}`` and ``v^_i`` the
  bias-corrected moving average (decay ``beta``) of ``||g_i||^2``:
  ``d~ = argmin_d 1/2 ||d - g~_p||^2`` subject to ``g~_j^T d >= tau_j ||g~_j||^2`` for every
  secondary task ``j``; the update is ``d~`` rescaled to ``||g_p||`` (Varam et al.). Solved on
  the dual, ``d~ = g~_p + sum_j mu_j g~_j`` with
  ``mu = argmin_{mu >= 0} 1/2 mu^T G~_S mu - (tau diag(G~_S) - G~_Sp)^T mu``
  (`nonnegative_qp`). If ``g_p = 0`` or ``d~`` vanishes the update is 0; if the constraints
  cannot all hold (e.g. two opposite secondary gradients) the update is ``g_p``. A task's moving
  average advances only in updates where it is active.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    primary: the name of the primary task.
    tau: in [0, 1]: one fraction for every secondary task, or ``{task: tau}`` over the
      secondary tasks (0.02, TorchJD's default).
    beta: the moving average's decay in [0, 1) (0.999).
    eps: ``eps >= 0`` added to the moving average.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` (inner: `PcdState`).

  References:
    Varam et al., `Not All Objectives Are Born Equal: Priority-Constrained Descent for
    Hierarchical Multi-Objective Optimization`, TMLR 2026 (the PCD problem and its dual).

  Examples:
    >>> import jax, jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.pcd(tasks=("main", "aux"), primary="main", tau=0.5)
    >>> J = {"main": jnp.array([1.0, 0.0]), "aux": jnp.array([-1.0, 1.0])}
    >>> out, _ = jax.jit(tx.update)(J, tx.init(jnp.zeros(2)))
    >>> [round(float(x), 4) for x in out]  # <g~_aux, d~> = ||g~_aux||^2 / 2, norm of g_main
    [0.1691, 0.9856]
  """
  where = "pcd"
  names = check_tasks(tasks, where)
  n = len(names)
  if primary not in names:
    raise ValueError(f"{where}: primary must be one of the tasks {list(names)}, got {primary!r}")
  p = names.index(primary)
  secondary = [k for k in range(n) if k != p]
  if isinstance(tau, Mapping) or hasattr(tau, "items"):  # also an ml_collections dict
    tau = dict(tau.items())
    if set(tau) != {names[k] for k in secondary}:
      raise ValueError(f"{where}: tau must have one entry per secondary task "
                       f"{[names[k] for k in secondary]}, got {sorted(tau)}")
    taus = [float(tau[names[k]]) for k in secondary]
  else:
    taus = [float(tau)] * (n - 1)
  if not all(0.0 <= x <= 1.0 for x in taus):
    raise ValueError(f"{where}: tau must be in [0, 1], got {tau!r}")
  taus = jnp.asarray(taus, _F32)
  order = jnp.asarray([p, *secondary])

  def combine(step: Step, st: PcdState):
    sq = jnp.diag(step.gram)
    ema = jnp.where(step.active, beta * st.sq_norm_ema + (1.0 - beta) * sq, st.sq_norm_ema)
    count = st.count + step.active.astype(jnp.int32)
    debiased = safe_div(ema, 1.0 - beta ** count.astype(_F32))
    scales = jnp.where(step.active, safe_div(1.0, jnp.sqrt(debiased + eps)), 0.0)
    g = (step.gram * jnp.outer(scales, scales))[order][:, order]  # primary first
    qs, active_s = g[1:, 1:], step.active[order][1:]
    b = taus * jnp.diag(qs) - g[1:, 0]
    mu = nonnegative_qp(qs, b, active_s)
    slack = qs @ mu - b
    scale = jnp.maximum(jnp.max(jnp.diag(g)), 1e-30)
    feasible = jnp.all(~active_s | (slack >= -1e-4 * scale))
    w = jnp.concatenate([jnp.ones([1], _F32), jnp.where(feasible, mu, 0.0)])
    sq_norm = w @ g @ w
    magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))) ** 2
    w = w * scales[order] * safe_div(jnp.sqrt(sq[p]), jnp.sqrt(sq_norm))
    w = jnp.where(step.active[p] & (sq_norm > 10 * jnp.finfo(_F32).eps * magnitude), w, 0.0)
    return jnp.diag(jnp.zeros([n], _F32).at[order].set(w)), PcdState(ema, count)

  return gramian_method(
      where, backbone_mask, tasks, combine,
      init_inner=lambda: PcdState(jnp.zeros([n], _F32), jnp.zeros([n], jnp.int32)),
      drop_nonfinite=drop_nonfinite)


# --------------------------------------------------------------------------- ExcessMTL
class ExcessMtlState(NamedTuple):
  """State of `excess_mtl`."""

  weights: jax.Array  # f32[T]: the task weights alpha (on the simplex).
  sq_grad_sum: dict[str, list[jax.Array]]  # per task, f32 per backbone leaf: sum of squares.
  baseline: jax.Array  # f32[T]: the excess risks the later ones are divided by.
  warmup_sum: jax.Array  # f32[T]: sum of the excess risks seen during the warm-up.
  count: jax.Array  # i32[]: updates done.


@register("excess_mtl", checks={"robust_step_size": POSITIVE, "n_warmup_steps": NON_NEGATIVE})
def excess_mtl(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
               robust_step_size: float = 1.0, n_warmup_steps: int = 0,
               drop_nonfinite: bool = True) -> GT:
  r"""ExcessMTL: weights moved towards the tasks with the largest estimated excess risk.

  Each task's excess risk is estimated to second order with a diagonal AdaGrad Hessian,
  ``E_t = sum_k g_{t,k}^2 / sqrt(S_{t,k} + 1e-7)`` with ``S_t`` the running sum of the task's
  squared backbone gradients (He et al., Eqs. 6-7), divided by the task's baseline ``E_t^0``
  (Sec. 3.2: its first estimate, or the mean over ``n_warmup_steps`` warm-up updates); the
  weights take one exponentiated-gradient step,
  ``alpha_t <- alpha_t exp(eta E_t / E_t^0) / sum_s alpha_s exp(eta E_s / E_s^0)`` (Eq. 9), from
  ``alpha = 1 / T``; update ``J^T alpha``. During warm-up the weights stay ``1 / T``.

  Not a Gramian method: ``S`` is per coordinate, so the state holds ``T`` copies of the
  backbone (as TorchJD's and the authors'). The authors' code, LibMTL and TorchJD (with
  ``n_warmup_steps=0``) use the raw first estimate, not the ratio, in the first weight step;
  here every step uses the ratio (so the first one leaves the weights at ``1 / T``); with
  ``n_warmup_steps > 0`` the two agree.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    robust_step_size: ``eta > 0`` (1.0, TorchJD's default).
    n_warmup_steps: updates with uniform weights whose mean excess risks become the
      baselines (0: the first update's; the paper's appendix collects 3 epochs).
    drop_nonfinite: drop a task with a non-finite gradient (it then counts as a zero gradient).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` whose inner is an
    `ExcessMtlState`; the weights are in its diagnostics.

  References:
    He, Zhou, Xu, Huang, Zhao, `Robust Multi-Task Learning with Excess Risks`, ICML 2024,
    Eqs. 6-9 and Sec. 3.2.

  Examples:
    >>> import jax, jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.excess_mtl(tasks=("a", "b"))
    >>> state, update = tx.init(jnp.zeros(2)), jax.jit(tx.update)
    >>> for ga in (1.0, 4.0):  # task a's excess risk grows, b's does not
    ...   out, state = update({"a": jnp.array([ga, 0.0]), "b": jnp.array([0.0, 1.0])}, state)
    >>> [round(float(x), 4) for x in state.inner.weights]
    [0.9598, 0.0402]
  """
  where = "excess_mtl"
  names = check_tasks(tasks, where)
  n = len(names)

  def elementwise(bb, st: ExcessMtlState, losses):
    del losses
    sq_sum = {t: [s + jnp.square(x) for s, x in zip(st.sq_grad_sum[t], bb[t], strict=True)]
              for t in names}
    risk = jnp.stack([sum(jnp.sum(jnp.square(x) * jax.lax.rsqrt(s + 1e-7))
                          for s, x in zip(sq_sum[t], bb[t], strict=True)) for t in names])
    warm = st.count < n_warmup_steps
    warmup_sum = jnp.where(warm, st.warmup_sum + risk, st.warmup_sum)
    first = st.count == n_warmup_steps
    baseline = jnp.where(first, risk if n_warmup_steps == 0 else warmup_sum / max(
        n_warmup_steps, 1), st.baseline)
    ratio = risk / (baseline + 1e-7)
    moved = jax.nn.softmax(jnp.log(st.weights) + robust_step_size * ratio)
    weights = jnp.where(warm, st.weights, moved)
    outs = [sum(w * x for w, x in zip(weights, xs, strict=True))
            for xs in zip(*(bb[t] for t in names), strict=True)]
    norms = weights * jnp.sqrt(jnp.stack([sum(jnp.sum(jnp.square(x)) for x in bb[t])
                                          for t in names]))
    return outs, norms, ExcessMtlState(weights, sq_sum, baseline, warmup_sum, st.count + 1)

  engine = _with_buffers(where, backbone_mask, gramian_method(
      where, backbone_mask, tasks, elementwise=elementwise, init_inner=lambda: None,
      drop_nonfinite=drop_nonfinite), lambda zeros: ExcessMtlState(
          jnp.full([n], 1.0 / n, _F32), {t: list(zeros) for t in names},
          jnp.zeros([n], _F32), jnp.zeros([n], _F32), jnp.zeros([], jnp.int32)))

  def with_weights(state):
    # As the Gramian methods: a task with a zero (or dropped) gradient reports weight 0.
    d = state.diagnostics
    return GramianState(d._replace(weights={
        t: jnp.where(d.norm_before[t] > 0, state.inner.weights[k], 0.0)
        for k, t in enumerate(names)}), state.inner)

  def init_fn(params):
    return with_weights(engine.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    out, state = engine.update(updates, state, params, **extra_args)
    return out, with_weights(state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
