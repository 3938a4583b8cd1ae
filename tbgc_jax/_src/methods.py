"""Multi-task gradient methods from the literature, as optax transforms on the Gramian.

Each factory ``name(backbone_mask=None, *, tasks, **hyperparameters)`` returns an
``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``{task: gradient pytree}`` and
returns one params-shaped update. The method acts on the backbone leaves (every leaf when
``backbone_mask`` is None); head leaves get the sum of the tasks' head gradients. Equations are
written on the Gramian ``G = J J^T`` of the tasks' backbone gradients (rows of ``J``), so each
method is a small solve plus one weighted sum (see ``aggregation.py``); the state holds the
diagnostics read by `tbgc_jax.gradient_diagnostics`. The common keyword ``drop_nonfinite``
(default True) drops a task whose gradient is non-finite from that update, as `tbgc_jax.tbgc`.

Tasks are processed in sorted-name order; inactive tasks (zero or dropped gradients) get weight
0 in the solvers. Accuracy of the solvers against float64 references: ``docs/methods.md``.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from tbgc_jax._src import solvers
from tbgc_jax._src.aggregation import Step, gramian_method, weighting
from tbgc_jax._src.base import safe_div
from tbgc_jax._src.masks import MaskOrFn
from tbgc_jax._src.registry import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, register

_F32 = jnp.float32
GT = optax.GradientTransformationExtraArgs


def _orders(key: jax.Array, n: int) -> jax.Array:
  """One random permutation of range(n) per task: i32[n, n]."""
  return jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, n))


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective 32-bit integer mixer (the "lowbias32" constants of C. Wellons' hash-prospector)."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _hash_uniform(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform(0, 1) float32 draws of ``shape``, one per coordinate, keyed by ``words: u32[2]``.

  A counter-based hash: two keyed rounds of `_mix32` over the coordinate's flat index, top 24
  bits. Being a few integer operations on an iota, XLA fuses it into the pass that consumes the
  draws, where ``jax.random.uniform`` (threefry or rbg) writes and reads a separate array and
  costs 3-5x a TBGC update at 3 tasks x 10M coordinates on a 2-core CPU. For sampling masks,
  not for cryptography; fresh ``words`` (from a ``jax.random`` key) give a fresh draw.
  """
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  bits = _mix32(_mix32(index ^ words[0]) + words[1])
  return ((bits >> 8).astype(_F32) + 0.5) * (1.0 / (1 << 24))


@register("mean")
def mean(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
         drop_nonfinite: bool = True) -> GT:
  r"""Mean of the task gradients on the backbone: ``w_t = 1 / T``.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Caruana, `Multitask Learning`, Machine Learning 1997 (equal weighting; TorchJD's ``Mean``).

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.mean(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()
    [1.0, 1.0, 1.0]
  """
  n = len(tasks)
  return gramian_method("mean", backbone_mask, tasks,
                        weighting(lambda step: jnp.full([n], 1.0 / n, _F32)),
                        drop_nonfinite=drop_nonfinite)


@register("mgda")
def mgda(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
         drop_nonfinite: bool = True) -> GT:
  r"""MGDA: the minimum-norm point of the convex hull of the task gradients.

  ``w = argmin_{w in simplex} w^T G w``, update ``J^T w`` (Sener & Koltun, Eq. 3 / Algorithm 2,
  on the shared parameters, without the MGDA-UB encoder bound). Non-conflicting:
  ``<g_t, update> >= ||update||^2 >= 0`` for every task. Solver: FISTA, 200 iterations, then an
  exact KKT polish on the support found (``solvers.min_norm_simplex``).

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization`, NeurIPS 2018, Eq. 3;
    Désidéri, `Multiple-gradient descent algorithm (MGDA)`, 2012.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.mgda(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) + 0.0 for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.0, 1.0, 1.0]
  """
  return gramian_method(
      "mgda", backbone_mask, tasks,
      weighting(lambda step: solvers.min_norm_simplex(step.gram, step.active)),
      drop_nonfinite=drop_nonfinite)


@register("upgrad", checks={"reg_eps": NON_NEGATIVE})
def upgrad(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
           reg_eps: float = 0.0, drop_nonfinite: bool = True) -> GT:
  r"""UPGrad: the mean of each task gradient projected onto the dual cone of all of them.

  For each task ``i``, ``v_i = argmin_{v >= e_i / T} v^T G v`` (the projection of ``g_i / T``
  onto ``{x : J x >= 0}``, Quinton & Rey, Eq. 5 and Proposition 1); update
  ``J^T sum_i v_i``. Non-conflicting. The per-task rows ``v_i`` are the diagnostics' "after"
  gradients. Solver: ``solvers.min_norm_above`` (FISTA, 200 iterations, exact polish); TorchJD
  solves the same problem with quadprog after adding ``1e-4`` to the normalized Gramian's
  diagonal, which moves its results in the 4th decimal at most on its test matrix.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    reg_eps: added to the diagonal of the trace-normalized Gramian before solving (0: the
      exact projection of the paper; TorchJD's default is 1e-4).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization`, 2024, Eq. 5.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.upgrad(tasks=("a", "b"), reg_eps=1e-4)  # as TorchJD
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.2929, 1.9004, 1.9004]
  """
  n = len(tasks)

  def combine(step: Step, inner):
    lower = jnp.eye(n, dtype=_F32) / n * step.active[:, None]
    return solvers.min_norm_above(step.gram, lower, step.active, reg_eps=reg_eps), inner

  return gramian_method("upgrad", backbone_mask, tasks, combine, drop_nonfinite=drop_nonfinite)


@register("dualproj", checks={"reg_eps": NON_NEGATIVE})
def dualproj(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
             reg_eps: float = 0.0, drop_nonfinite: bool = True) -> GT:
  r"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

  ``w = argmin_{v >= 1/T} v^T G v``, update ``J^T w`` (Quinton & Rey, Eq. 5 applied to the mean,
  the A_DualProj of their Section 2). Non-conflicting. Solver and ``reg_eps`` as `upgrad` (on
  TorchJD's test matrix: ``[0.5563, 1.1109, 1.1109]`` with ``reg_eps=1e-4``, exact
  ``[0.5556, 1.1111, 1.1111]``).

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    reg_eps: added to the diagonal of the trace-normalized Gramian before solving (0: the
      exact projection of the paper; TorchJD's default is 1e-4).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization`, 2024, Section 2.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.dualproj(tasks=("a", "b"), reg_eps=1e-4)  # as TorchJD
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.5563, 1.1109, 1.1109]
  """
  n = len(tasks)

  def weights(step: Step):
    lower = jnp.where(step.active, 1.0 / n, 0.0)[None, :]
    return solvers.min_norm_above(step.gram, lower, step.active, reg_eps=reg_eps)[0]

  return gramian_method("dualproj", backbone_mask, tasks, weighting(weights),
                        drop_nonfinite=drop_nonfinite)


@register("pcgrad")
def pcgrad(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], seed: int = 0,
           drop_nonfinite: bool = True) -> GT:
  r"""PCGrad: project each task gradient off the others' normal planes where they conflict.

  For each task ``i`` and each other task ``j`` in a random order: if ``<g_i^PC, g_j> < 0``,
  ``g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j`` (Yu et al., Algorithm 1); update
  ``sum_i g_i^PC``. Each ``g_i^PC`` is a combination of the raw gradients, tracked on the
  Gramian. The orders come from a key in the state, split every step (reproducible, resumable);
  with two tasks the result is deterministic.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    seed: seed of the state's key.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` (inner: the key).

  References:
    Yu et al., `Gradient Surgery for Multi-Task Learning`, NeurIPS 2020, Algorithm 1.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.pcgrad(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.5848, 3.8012, 3.8012]
  """
  n = len(tasks)

  def combine(step: Step, key):
    key, sub = jax.random.split(key)
    orders = _orders(sub, n)
    gram, rows = step.gram, jnp.arange(n)

    def body(k, comb):
      j = orders[:, k]
      dots = jnp.sum(comb * gram[:, j].T, axis=1)  # <g_i^PC, g_j>
      norm_j = gram[j, j]
      coef = jnp.where((dots < 0) & (j != rows) & (norm_j > 0), safe_div(dots, norm_j), 0.0)
      return comb - coef[:, None] * jax.nn.one_hot(j, n, dtype=_F32)

    return jax.lax.fori_loop(0, n, body, jnp.eye(n, dtype=_F32)), key

  return gramian_method("pcgrad", backbone_mask, tasks, combine,
                        init_inner=lambda: jax.random.PRNGKey(seed),
                        drop_nonfinite=drop_nonfinite)


@register("graddrop", checks={"leak": UNIT_INTERVAL})
def graddrop(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
             leak: float = 0.0, seed: int = 0, drop_nonfinite: bool = True) -> GT:
  r"""GradDrop: per coordinate, keep only the tasks whose gradient has the sampled sign.

  Per backbone coordinate: ``P = (1 + sum_i g_i / sum_i |g_i|) / 2``, ``U ~ Uniform(0, 1)``;
  ``M_i = [P > U][g_i > 0] + [P < U][g_i < 0]``; update ``sum_i (leak + (1 - leak) M_i) g_i``
  (Chen et al., Eqs. 2-4, applied to the shared parameters' gradients, as TorchJD's GradDrop
  does on the Jacobian). Not a Gramian method: it draws one ``U`` per backbone coordinate, by
  a counter-based hash keyed from the state's key (`_hash_uniform`, 24-bit resolution), which
  XLA fuses into the same pass as the masks and the sum. The key is split every step. No
  per-task weights.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    leak: ``l`` in [0, 1], the fraction of each gradient always kept (0 in the paper).
    seed: seed of the state's key.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` (inner: the key).

  References:
    Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout`, NeurIPS 2020, Eqs. 2-4.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.graddrop(tasks=("a", "b"))
    >>> J = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0, -2.0])}
    >>> out = tx.update(J, tx.init(jnp.zeros(2)))[0].tolist()
    >>> out[0], out[1] in (2.0, -2.0)  # same signs: kept; opposite: one side dropped
    (4.0, True)
  """
  def elementwise(bb, key, losses):
    del losses
    key, sub = jax.random.split(key)
    words = jax.random.bits(sub, (len(next(iter(bb.values()))), 2), jnp.uint32)
    outs, sq = [], jnp.zeros([len(bb)], _F32)
    for i, xs in enumerate(zip(*bb.values(), strict=True)):
      total = sum(xs)
      purity = 0.5 * (1.0 + safe_div(total, sum(jnp.abs(x) for x in xs)))
      u = _hash_uniform(words[i], xs[0].shape)
      kept = [leak + (1.0 - leak) * jnp.where(purity > u, x > 0, x < 0) * 1.0 for x in xs]
      outs.append(sum(m * x for m, x in zip(kept, xs, strict=True)))
      sq = sq + jnp.stack([jnp.sum(jnp.square(m * x)) for m, x in zip(kept, xs, strict=True)])
    return outs, jnp.sqrt(sq), key

  return gramian_method("graddrop", backbone_mask, tasks, elementwise=elementwise,
                        init_inner=lambda: jax.random.PRNGKey(seed),
                        drop_nonfinite=drop_nonfinite)


@register("cagrad", checks={"c": NON_NEGATIVE})
def cagrad(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], c: float = 0.5,
           drop_nonfinite: bool = True) -> GT:
  r"""CAGrad: the best mean-improving direction within a ball around the mean gradient.

  With ``g_0`` the mean gradient and ``phi = c^2 ||g_0||^2``,
  ``w* = argmin_{w in simplex} g_w^T g_0 + sqrt(phi) ||g_w||`` (``g_w = J^T w``), and
  ``d = g_0 + sqrt(phi) / ||g_w*|| g_w*`` (Liu et al., Eq. 6 and Algorithm 1, without the
  authors' code's optional rescaling by ``1 / (1 + c^2)``, as TorchJD). Solver:
  ``solvers.cagrad_inner``: 20 majorize-minimize steps, each an exact simplex QP (FISTA then
  active-set steps), on the trace-normalized Gramian.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    c: ``c >= 0``, the radius of the ball relative to ``||g_0||`` (0.5: LibMTL's default and
      TorchJD's test value; the paper sweeps 0.1 to 0.9). ``c = 0`` is `mean`.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Liu et al., `Conflict-Averse Gradient Descent for Multi-task Learning`, NeurIPS 2021,
    Eq. 6.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.cagrad(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.1835, 1.2041, 1.2041]
  """
  n = len(tasks)

  def weights(step: Step):
    g, _ = solvers.normalized(step.gram)
    m = jnp.full([n], 1.0 / n, _F32)
    sqrt_phi = c * jnp.sqrt(jnp.maximum(m @ g @ m, 0.0))

    w = solvers.cagrad_inner(g, step.active, c)
    return m + safe_div(sqrt_phi, jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))) * w

  return gramian_method("cagrad", backbone_mask, tasks, weighting(weights),
                        drop_nonfinite=drop_nonfinite)


@register("imtl_g")
def imtl_g(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
           drop_nonfinite: bool = True) -> GT:
  r"""IMTL-G: the update whose projections on every task's unit gradient are equal.

  Solve ``g^T u_t = const`` for all ``t`` with ``g = J^T w``, ``sum w = 1`` (Liu et al., Eq. 10:
  ``alpha = g_1 U^T (D U^T)^{-1}``); on the Gramian, ``w ∝ G^+ d`` with
  ``d_t = ||g_t||``, normalized to sum 1 (0 if the sum vanishes). Closed form: a
  pseudo-inverse of the cosine matrix (``G^+ d = D^{-1} C^+ 1``).

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Liu et al., `Towards Impartial Multi-task Learning`, ICLR 2021, Eq. 10.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.imtl_g(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.0767, 1.0, 1.0]
  """
  return gramian_method("imtl_g", backbone_mask, tasks,
                        weighting(lambda step: imtl_g_weights(step.gram, step.active)),
                        drop_nonfinite=drop_nonfinite)


def imtl_g_weights(gram: jax.Array, active: jax.Array) -> jax.Array:
  """IMTL-G's weights ``w ∝ G^+ d`` (``d_t = sqrt(G_tt)``), summing to 1; see `imtl_g`."""
  # G = D C D with C the cosine matrix: G^+ d = D^{-1} C^+ 1 (on the active tasks), and C is
  # well conditioned whatever the spread of the tasks' norms.
  c, d = solvers.unit_diagonal(gram, active)
  v = jnp.where(active, jnp.linalg.pinv(c, hermitian=True) @ active.astype(_F32) / d, 0.0)
  total = v.sum()
  return safe_div(v, total, where=jnp.abs(total) > 1e-12)


@register("aligned_mtl")
def aligned_mtl(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
                drop_nonfinite: bool = True) -> GT:
  r"""Aligned-MTL: align the task gradients' principal components, scaled by the smallest.

  ``G = V diag(lambda) V^T``; ``B = sqrt(lambda_min) V diag(lambda)^{-1/2} V^T`` over the
  eigenvalues with ``sqrt(lambda) > sqrt(lambda_max) T eps_f32`` (the rank); weights
  ``w = B 1 / T``, update ``J^T w`` (Senushkin et al., Algorithm 1 with equal task
  preferences). Closed form: ``sqrt(lambda)`` and ``V`` are the singular values and vectors of
  the square-root factor ``D Q diag(mu)^{1/2}`` of ``G``, from the eigendecomposition
  ``Q diag(mu) Q^T`` of the cosine matrix ``D^{-1} G D^{-1}`` (``D = diag(||g_t||)``), so float32
  keeps ``lambda_min`` where the tasks' norms span decades (cond(G) ~ 1e8: direction within
  1e-7 in cosine and norm within 2e-3 of float64, ``tests/test_methods.py``).

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Senushkin et al., `Independent Component Alignment for Multi-Task Learning`, CVPR 2023,
    Algorithm 1.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.aligned_mtl(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.2133, 0.9673, 0.9673]
  """
  n = len(tasks)

  def weights(step: Step):
    # B 1 = sqrt(lambda_min) G^{-1/2} 1 from a square-root factor that is only as ill
    # conditioned as J: with the cosine matrix C = D^{-1} G D^{-1} = Q diag(mu) Q^T (well
    # conditioned whatever the spread of the norms), G = L L^T for L = D Q diag(mu)^{1/2}, and
    # L's singular values and left singular vectors are G's sqrt(lambda) and V. An
    # eigendecomposition of G itself would square the condition number: in float32 it loses
    # lambda_min once cond(G) nears 1e7 (task norms four decades apart).
    c, d = solvers.unit_diagonal(step.gram, step.active)
    c = jnp.where(step.active[:, None] & step.active[None, :], c, 0.0)
    mu, q = jnp.linalg.eigh(c)
    factor = d[:, None] * q * jnp.sqrt(jnp.maximum(mu, 0.0))
    vecs, sv, _ = jnp.linalg.svd(jnp.where(step.active[:, None], factor, 0.0))
    keep = sv > sv[0] * n * jnp.finfo(_F32).eps
    sv_min = jnp.min(jnp.where(keep, sv, jnp.inf))
    inv = safe_div(jnp.where(jnp.isfinite(sv_min), sv_min, 0.0), sv, where=keep)
    return (vecs * inv) @ (vecs.T @ jnp.full([n], 1.0 / n, _F32))

  return gramian_method("aligned_mtl", backbone_mask, tasks, weighting(weights),
                        drop_nonfinite=drop_nonfinite)


@register("config")
def config(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
           drop_nonfinite: bool = True) -> GT:
  r"""ConFIG: the direction with equal cosine to every task gradient, of the summed length.

  With unit gradients ``u_t = g_t / ||g_t||`` (rows of ``U``): ``x = U^+ 1``,
  ``x̂ = x / ||x||``, update ``(sum_t g_t^T x̂) x̂`` (Liu et al., Eq. 2). On the Gramian:
  ``U U^T = D^{-1} G D^{-1}`` with ``D = diag(||g_t||)``, ``x = J^T D^{-1} (U U^T)^+ 1``.
  Closed form (pseudo-inverse).

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Liu et al., `ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks`,
    ICLR 2025, Eq. 2.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.config(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.1588, 2.0706, 2.0706]
  """
  def weights(step: Step):
    g, s = solvers.normalized(step.gram)
    inv_norm = safe_div(1.0, jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0)))
    units = inv_norm[:, None] * g * inv_norm[None, :]
    b = inv_norm * (jnp.linalg.pinv(units, hermitian=True) @ step.active.astype(_F32))
    # w = b * (1^T G b) / (b^T G b): x̂ = J^T b / ||J^T b||, length sum_t <g_t, x̂>.
    return b * safe_div(jnp.sum(g @ b), b @ g @ b)

  return gramian_method("config", backbone_mask, tasks, weighting(weights),
                        drop_nonfinite=drop_nonfinite)


@register("fairgrad", checks={"alpha": POSITIVE})
def fairgrad(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
             alpha: float = 1.0, drop_nonfinite: bool = True) -> GT:
  r"""FairGrad: alpha-fair utility maximisation; weights solve ``G w = w^(-1/alpha)``.

  Update ``J^T w`` with ``w > 0`` solving ``G w = w^{-1/alpha}`` (Ban & Ji, Eq. 7). Solver:
  damped Newton on the equivalent strictly convex problem, 40 iterations
  (``solvers.power_fixed_point``). ``alpha = 1`` is proportional fairness (the Nash bargaining
  solution, see `nash_mtl`); larger alpha approaches max-min fairness.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    alpha: ``alpha > 0`` (1.0 here; the paper tunes it per benchmark, e.g. 2.0 on NYU-v2).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Ban & Ji, `Fair Resource Allocation in Multi-Task Learning`, ICML 2024, Eq. 7.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.fairgrad(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.0766, 0.9985, 0.9985]
  """
  return gramian_method(
      "fairgrad", backbone_mask, tasks,
      weighting(lambda step: solvers.power_fixed_point(step.gram, step.active, alpha)),
      drop_nonfinite=drop_nonfinite)


@register("nash_mtl", checks={"max_norm": NON_NEGATIVE})
def nash_mtl(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str],
             max_norm: float = 1.0, drop_nonfinite: bool = True) -> GT:
  r"""Nash-MTL: the Nash bargaining solution, ``G_n w = 1 / w`` on the normalized Gramian.

  ``G_n = G / ||G||_F`` (the authors' normalization); ``w > 0`` solves ``G_n w = 1 / w``
  (Navon et al., Eq. 2, Theorem 5.1); update ``J^T w``, clipped to norm ``max_norm`` on the
  backbone (the authors' default 1.0; 0 disables). The paper approximates the solution by a
  sequence of convex problems (20 CCP iterations with cvxpy); this solves the same equation by
  damped Newton (`fairgrad` with ``alpha = 1``), to float32 precision.

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    max_norm: clip the backbone update to this norm (0: no clip).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState``.

  References:
    Navon et al., `Multi-Task Learning as a Bargaining Game`, ICML 2022, Eq. 2.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.nash_mtl(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> [round(x, 4) for x in tx.update(J, tx.init(jnp.zeros(3)))[0].tolist()]
    [0.0542, 0.7061, 0.7061]
  """
  def weights(step: Step):
    frob = jnp.sqrt(jnp.sum(jnp.square(step.gram)))
    w = solvers.power_fixed_point(safe_div(step.gram, frob), step.active, 1.0)
    norm = jnp.sqrt(jnp.maximum(w @ step.gram @ w, 0.0))
    clip = jnp.where((max_norm > 0) & (norm > max_norm), safe_div(max_norm, norm), 1.0)
    return w * clip

  return gramian_method("nash_mtl", backbone_mask, tasks, weighting(weights),
                        drop_nonfinite=drop_nonfinite)


@register("gradvac", checks={"beta": UNIT_INTERVAL})
def gradvac(backbone_mask: MaskOrFn | None = None, *, tasks: Sequence[str], beta: float = 0.5,
            seed: int = 0, drop_nonfinite: bool = True) -> GT:
  r"""GradVac: raise each pair's cosine to an EMA target where it falls below.

  For each task ``i`` and each other task ``j`` in a random order, with
  ``phi = cos(g_i^GV, g_j)`` and target ``phi_hat_ij``: if ``phi < phi_hat``,
  ``g_i^GV += ||g_i^GV|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
  / (||g_j|| sqrt(1 - phi_hat^2)) g_j`` (Wang et al., Eq. 4); then
  ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi`` (Eq. 5); update ``sum_i g_i^GV``. One
  target per task pair over the whole backbone (the paper also offers per-layer targets).

  Args:
    backbone_mask: bool pytree or callable of params, True on shared leaves (None: all).
    tasks: the task names; ``update`` expects exactly these keys.
    beta: EMA rate in [0, 1] (0.5: LibMTL's and TorchJD's default; the paper uses 1e-2).
    seed: seed of the state's key (the pair order).
    drop_nonfinite: drop a task with a non-finite gradient from the update.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a ``GramianState`` (inner:
    ``(key, targets f32[T, T])``).

  References:
    Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models`, ICLR 2021, Eqs. 4-5.

  Examples:
    >>> import jax.numpy as jnp, tbgc_jax
    >>> tx = tbgc_jax.gradvac(tasks=("a", "b"))
    >>> J = {"a": jnp.array([-4.0, 1.0, 1.0]), "b": jnp.array([6.0, 1.0, 1.0])}
    >>> out, state = tx.update(J, tx.init(jnp.zeros(3)))
    >>> [round(x, 4) for x in out.tolist()]  # first step: targets 0, as PCGrad
    [0.5848, 3.8012, 3.8012]
  """
  n = len(tasks)

  def combine(step: Step, inner):
    key, targets = inner
    key, sub = jax.random.split(key)
    orders = _orders(sub, n)
    gram, rows = step.gram, jnp.arange(n)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))

    def body(k, carry):
      comb, targets = carry
      j = orders[:, k]
      norm_i = jnp.sqrt(jnp.maximum(jnp.einsum("ts,su,tu->t", comb, gram, comb), 0.0))
      phi = safe_div(jnp.sum(comb * gram[:, j].T, axis=1), norm_i * norms[j])
      target = targets[rows, j]
      valid = (j != rows) & step.active & step.active[j]
      sin_t = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
      coef = safe_div(norm_i * (target * jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0)) - phi * sin_t),
                       norms[j] * sin_t)
      comb = comb + jnp.where(valid & (phi < target), coef, 0.0)[:, None] * jax.nn.one_hot(
          j, n, dtype=_F32)
      targets = targets.at[rows, j].set(
          jnp.where(valid, (1.0 - beta) * target + beta * phi, target))
      return comb, targets

    comb, targets = jax.lax.fori_loop(0, n, body, (jnp.eye(n, dtype=_F32), targets))
    return comb, (key, targets)

  return gramian_method(
      "gradvac", backbone_mask, tasks, combine,
      init_inner=lambda: (jax.random.PRNGKey(seed), jnp.zeros((n, n), _F32)),
      drop_nonfinite=drop_nonfinite)
