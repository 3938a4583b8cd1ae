"""Small solvers on the T x T Gramian of the task gradients, in JAX with fixed iteration counts.

Every solver takes ``active`` (bool[T]): inactive tasks (zero or dropped gradients) get weight
0 and do not constrain the others. All run in float32 under ``jit``; accuracies against float64
references are measured in ``tests/test_methods.py`` and listed in ``docs/methods.md``.
"""

import jax
import jax.numpy as jnp

from tbgc_jax._src.base import safe_div

_F32 = jnp.float32
_TINY = 1e-30


def normalized(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(gram / s, s)`` with ``s`` the trace (1 for an all-zero Gramian)."""
  s = jnp.trace(gram)
  s = jnp.where(s > 0, s, 1.0)
  return gram / s, s


def _lipschitz(gram: jax.Array) -> jax.Array:
  """Largest eigenvalue of a PSD matrix (at least a tiny positive number)."""
  return jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 1e-12)


def project_simplex(v: jax.Array, active: jax.Array) -> jax.Array:
  """Euclidean projection of ``v`` onto ``{w >= 0, sum(w) = 1, w[~active] = 0}``.

  The sort-based algorithm (Held et al. 1974; Duchi et al. 2008); all zeros if no task is
  active. Works on the last axis.
  """
  v = jnp.where(active, v, -1e30)
  u = -jnp.sort(-v, axis=-1)
  css = jnp.cumsum(u, axis=-1)
  k = jnp.arange(1, v.shape[-1] + 1, dtype=v.dtype)
  ok = (u - (css - 1.0) / k > 0) & active.sort(axis=-1)[..., ::-1]
  rho = jnp.maximum(jnp.sum(ok, axis=-1, keepdims=True), 1)
  tau = (jnp.take_along_axis(css, rho - 1, axis=-1) - 1.0) / rho.astype(v.dtype)
  return jnp.where(active, jnp.maximum(v - tau, 0.0), 0.0)


def _fista(grad_fn, project, x0, step, iterations):
  """Accelerated projected gradient (FISTA) with a fixed iteration count."""
  def body(_, carry):
    x, y, t = carry
    x_new = project(y - step * grad_fn(y))
    t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    y = x_new + ((t - 1.0) / t_new) * (x_new - x)
    return x_new, y, t_new

  x, _, _ = jax.lax.fori_loop(0, iterations, body, (x0, x0, jnp.ones([], x0.dtype)))
  return x


def _quadratic(gram, w):
  return jnp.einsum("...i,ij,...j->...", w, gram, w)


def simplex_qp(g: jax.Array, lin: jax.Array, active: jax.Array, w0: jax.Array,
               iterations: int = 300) -> jax.Array:
  """``argmin_{w in simplex, w[~active] = 0} w^T g w + lin^T w`` for a normalized PSD ``g``.

  FISTA from ``w0`` (``iterations``), then ``2 T`` active-set steps from the support it found:
  solve the KKT system ``2 g_FF w_F + lin_F = mu 1, sum w_F = 1`` on the support ``F``; if a
  weight is negative, drop the most negative task, else add the task that most violates
  ``(2 g w + lin)_i >= mu``. The best feasible point seen is returned (never worse than
  FISTA's), exact once the support is right.
  """
  n = g.shape[0]
  step = 0.5 / _lipschitz(g)
  w = _fista(lambda w: 2.0 * g @ w + lin, lambda w: project_simplex(w, active), w0, step,
             iterations)
  eye = jnp.eye(n, dtype=_F32)
  objective = lambda w: _quadratic(g, w) + lin @ w

  def kkt_solution(free):
    m = jnp.zeros((n + 1, n + 1), _F32)
    m = m.at[:n, :n].set(jnp.where(free[:, None] & free[None, :], 2.0 * g, eye))
    m = m.at[:n, n].set(-free.astype(_F32)).at[n, :n].set(free.astype(_F32))
    rhs = jnp.concatenate([jnp.where(free, -lin, 0.0), jnp.ones([1], _F32)])
    return jnp.where(free, jnp.linalg.solve(m, rhs)[:n], 0.0)

  def body(_, carry):
    free, best = carry
    x = kkt_solution(free)
    feasible = jnp.all(jnp.isfinite(x)) & jnp.all(x >= 0) & jnp.any(free)
    best = jnp.where(feasible & (objective(x) < objective(best)), x, best)
    grad = 2.0 * g @ best + lin
    mu = best @ grad
    violation = jnp.where(free | ~active, jnp.inf, grad - mu)
    add = jnp.argmin(violation)
    scale = jnp.maximum(jnp.abs(mu), jnp.max(jnp.abs(grad)))
    grow = free.at[add].set(free[add] | (violation[add] < -1e-6 * scale))
    shrink = free.at[jnp.argmin(jnp.where(free, x, jnp.inf))].set(False)
    return jnp.where(feasible, grow, shrink), best

  _, best = jax.lax.fori_loop(0, 2 * n, body, (active & (w > 1e-6 * w.max()), w))
  return best


def min_norm_simplex(gram: jax.Array, active: jax.Array) -> jax.Array:
  """``argmin_{w in simplex, w[~active] = 0} w^T G w``: MGDA's min-norm point (weights), by
  `simplex_qp` on the trace-normalized Gramian from the uniform point."""
  g, _ = normalized(gram.astype(_F32))
  a = active.astype(_F32)
  return simplex_qp(g, jnp.zeros_like(a), active, a / jnp.maximum(jnp.sum(a), 1.0))


def cagrad_inner(gram: jax.Array, active: jax.Array, c: float | jax.Array,
                 iterations: int = 100) -> jax.Array:
  """``argmin_{w in simplex} w^T G m + c sqrt(m^T G m) sqrt(w^T G w)``, ``m = 1 / T``
  (CAGrad's inner problem), by majorize-minimize: ``sqrt(q) <= q / (2 s) + s / 2`` with
  equality at ``q = s^2``, so each of the ``iterations`` steps solves the simplex QP
  ``min w^T G w + (2 s / beta) (G m)^T w`` (`simplex_qp`, 50 FISTA steps warm-started, then
  the exact active-set steps) and the objective never increases. Its convergence is linear:
  with norms two decades apart 20 steps can stop 10% short of the optimum's weights; 100
  reach float32's fixed point on such cases (T x T work: nothing beside the gradient passes)."""
  g, _ = normalized(gram.astype(_F32))
  n = g.shape[0]
  m = jnp.full([n], 1.0 / n, _F32)
  gm = g @ m
  beta = c * jnp.sqrt(jnp.maximum(m @ gm, 0.0))
  a = active.astype(_F32)
  objective = lambda w: w @ gm + beta * jnp.sqrt(jnp.maximum(_quadratic(g, w), 0.0))

  def body(_, w):
    s = jnp.sqrt(jnp.maximum(_quadratic(g, w), 1e-20))
    x = simplex_qp(g, safe_div(2.0 * s, beta) * gm, active, w, iterations=50)
    return jnp.where(objective(x) <= objective(w), x, w)

  return jax.lax.fori_loop(0, iterations, body, a / jnp.maximum(jnp.sum(a), 1.0))


def unit_diagonal(gram: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(C, d)`` with ``G = D C D``, ``D = diag(d)``, ``d = sqrt(diag G)`` (1 for inactive tasks,
  whose rows of ``C`` are zero but for a unit diagonal): the cosine matrix, as well conditioned
  as the tasks' directions whatever the spread of their norms."""
  d = jnp.where(active, jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0)), 1.0)
  c = gram / (d[:, None] * d[None, :])
  both = active[:, None] & active[None, :]
  return jnp.where(both, c, jnp.eye(gram.shape[0], dtype=gram.dtype)), d


def min_norm_above(gram: jax.Array, lower: jax.Array, active: jax.Array,
                   iterations: int = 200, reg_eps: float = 0.0) -> jax.Array:
  """``argmin_{v >= lower} v^T G v`` for each row of ``lower`` (the dual-cone projections of
  UPGrad and DualProj: ``J^T v`` is the projection of ``J^T lower`` onto ``{x : J x >= 0}``).

  Solved in ``y = D v`` on the cosine matrix (`unit_diagonal`; the bound stays a box,
  ``y >= D lower``): FISTA from the bound (clamping is the projection), then one exact polish
  per row, the linear system on the coordinates found above their bound, kept when finite,
  feasible and no worse. Inactive coordinates stay at their bound.

  Args:
    gram: f32[T, T].
    lower: f32[..., T], the lower bounds (the weights to project).
    active: bool[T].
    iterations: FISTA iterations.
    reg_eps: added to the diagonal of the trace-normalized Gramian first (TorchJD adds 1e-4).

  Returns:
    f32[..., T].
  """
  g, _ = normalized(gram.astype(_F32))
  n = g.shape[0]
  eye = jnp.eye(n, dtype=_F32)
  g = g + reg_eps * eye
  active = active | (reg_eps > 0)
  c, d = unit_diagonal(g, active)
  low = lower * d
  step = 0.5 / _lipschitz(c)
  project = lambda y: jnp.where(active, jnp.maximum(y, low), low)
  y = _fista(lambda y: 2.0 * y @ c, project, low, step, iterations)

  def polish(y, low):
    free = active & (y > low + 1e-6 * jnp.maximum(jnp.abs(low).max(), _TINY))
    m = jnp.where(free[:, None] & free[None, :], c, eye)
    rhs = jnp.where(free, -(c @ jnp.where(free, 0.0, low)), low)
    x = jnp.linalg.solve(m, rhs)
    ok = (jnp.all(jnp.isfinite(x)) & jnp.all(x >= low - 1e-6 * jnp.abs(low))
          & (_quadratic(c, x) <= _quadratic(c, y) * (1 + 1e-6) + 1e-12))
    return jnp.where(ok, jnp.maximum(x, low), y)

  flat_y, flat_low = y.reshape(-1, n), jnp.broadcast_to(low, y.shape).reshape(-1, n)
  return (jax.vmap(polish)(flat_y, flat_low).reshape(y.shape)) / d


def power_fixed_point(gram: jax.Array, active: jax.Array, alpha: float | jax.Array,
                      iterations: int = 40) -> jax.Array:
  """Solves ``G w = w^(-1/alpha)`` with ``w > 0`` on the active tasks (FairGrad; Nash-MTL is
  ``alpha = 1``).

  It is the optimality condition of the strictly convex
  ``min_w 1/2 w^T G w - sum_i phi(w_i)`` with ``phi'(w) = w^(-1/alpha)``; solved by damped
  Newton (best of 16 halvings of the fraction-to-the-boundary step) on the trace-normalized
  Gramian, then rescaled. Inactive tasks get 0.
  """
  g, s = normalized(gram.astype(_F32))
  a = jnp.asarray(alpha, _F32)
  n = g.shape[0]
  eye = jnp.eye(n, dtype=_F32)
  both = active[:, None] & active[None, :]

  def phi(w):
    log_w = jnp.log(w)
    return jnp.where(jnp.abs(a - 1.0) < 1e-6, log_w,
                     jnp.exp((1.0 - 1.0 / a) * log_w) / jnp.where(
                         jnp.abs(a - 1.0) < 1e-6, 1.0, 1.0 - 1.0 / a))

  def objective(w):
    return 0.5 * w @ jnp.where(both, g, 0.0) @ w - jnp.sum(jnp.where(active, phi(w), 0.0))

  w0 = jnp.where(active, jnp.maximum(jnp.diag(g), 1e-6) ** (-a / (1.0 + a)), 1.0)
  halvings = 0.5 ** jnp.arange(16, dtype=_F32)

  def body(_, w):
    grad = jnp.where(active, g @ jnp.where(active, w, 0.0) - w ** (-1.0 / a), 0.0)
    hess = jnp.where(both, g, 0.0) + jnp.diag(jnp.where(active, w ** (-1.0 / a - 1.0) / a, 1.0))
    hess = jnp.where(both | jnp.eye(n, dtype=bool), hess, 0.0) + 1e-9 * eye
    d = -jnp.linalg.solve(hess, grad)
    to_boundary = jnp.min(jnp.where(d < 0, -0.99 * w / jnp.minimum(d, -_TINY), 1.0))
    t = jnp.minimum(1.0, to_boundary) * halvings
    cands = w[None, :] + t[:, None] * d[None, :]
    vals = jax.vmap(objective)(cands)
    best = jnp.argmin(jnp.where(jnp.isfinite(vals), vals, jnp.inf))
    return jnp.where(vals[best] <= objective(w), cands[best], w)

  w = jax.lax.fori_loop(0, iterations, body, w0)
  # G = s * g: w_G = s^(-alpha / (1 + alpha)) * w_g.
  return jnp.where(active, w * s ** (-a / (1.0 + a)), 0.0)
