"""Small solvers on the T x T Gramian of the task gradients, in JAX with fixed iteration counts.

Every solver takes ``active`` (bool[T]): inactive tasks (zero or dropped gradients) get weight
0 and do not constrain the others. All run in float32 under ``jit``; accuracies against float64
references are measured in ``tests/test_methods.py`` and listed in ``docs/methods.md``.
"""

import jax
import jax.numpy as jnp

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


def min_norm_simplex(gram: jax.Array, active: jax.Array, iterations: int = 200) -> jax.Array:
  """``argmin_{w in simplex, w[~active] = 0} w^T G w``: MGDA's min-norm point (weights).

  FISTA from the uniform point, then one exact polish: the KKT system on the support found,
  kept when its solution is feasible and no worse.
  """
  g, _ = normalized(gram.astype(_F32))
  a = active.astype(_F32)
  x0 = a / jnp.maximum(jnp.sum(a), 1.0)
  step = 0.5 / _lipschitz(g)
  w = _fista(lambda w: 2.0 * g @ w, lambda w: project_simplex(w, active), x0, step, iterations)
  free = active & (w > 1e-6)
  n = g.shape[0]
  eye = jnp.eye(n, dtype=_F32)
  both = free[:, None] & free[None, :]
  kkt = jnp.zeros((n + 1, n + 1), _F32)
  kkt = kkt.at[:n, :n].set(jnp.where(both, g + 1e-7 * eye, eye))
  kkt = kkt.at[:n, n].set(free.astype(_F32)).at[n, :n].set(free.astype(_F32))
  rhs = jnp.zeros(n + 1, _F32).at[n].set(1.0)
  polished = jnp.where(free, jnp.linalg.solve(kkt, rhs)[:n], 0.0)
  ok = (jnp.all(jnp.isfinite(polished)) & jnp.all(polished >= 0)
        & (_quadratic(g, polished) <= _quadratic(g, w) * (1 + 1e-6) + 1e-12))
  return jnp.where(ok, polished, w)


def min_norm_above(gram: jax.Array, lower: jax.Array, active: jax.Array,
                   iterations: int = 200, reg_eps: float = 0.0) -> jax.Array:
  """``argmin_{v >= lower} v^T G v`` for each row of ``lower`` (the dual-cone projections of
  UPGrad and DualProj: ``J^T v`` is the projection of ``J^T lower`` onto ``{x : J x >= 0}``).

  FISTA from ``lower`` (clamping is the projection), then one exact polish per row: the
  linear system on the coordinates found above their bound, kept when feasible and no worse.
  Inactive coordinates stay at their bound.

  Args:
    gram: f32[T, T].
    lower: f32[..., T], the lower bounds (the weights to project).
    active: bool[T].
    iterations: FISTA iterations.
    reg_eps: added to the diagonal of the trace-normalized Gramian (TorchJD adds 1e-4).

  Returns:
    f32[..., T].
  """
  g, _ = normalized(gram.astype(_F32))
  g = g + reg_eps * jnp.eye(g.shape[0], dtype=_F32)
  step = 0.5 / _lipschitz(g)
  project = lambda v: jnp.where(active, jnp.maximum(v, lower), lower)
  v = _fista(lambda v: 2.0 * v @ g, project, lower, step, iterations)
  n = g.shape[0]
  eye = jnp.eye(n, dtype=_F32)

  def polish(v, low):
    free = active & (v > low + 1e-6 * jnp.maximum(jnp.abs(low).max(), _TINY))
    both = free[:, None] & free[None, :]
    m = jnp.where(both, g + 1e-7 * eye, eye)
    rhs = jnp.where(free, -(g @ jnp.where(free, 0.0, low)), low)
    x = jnp.linalg.solve(m, rhs)
    ok = (jnp.all(jnp.isfinite(x)) & jnp.all(x >= low - 1e-7)
          & (_quadratic(g, x) <= _quadratic(g, v) * (1 + 1e-6) + 1e-12))
    return jnp.where(ok, jnp.maximum(x, low), v)

  flat_v, flat_low = v.reshape(-1, n), jnp.broadcast_to(lower, v.shape).reshape(-1, n)
  return jax.vmap(polish)(flat_v, flat_low).reshape(v.shape)


def best_step_descent(objective, w0: jax.Array, active: jax.Array, iterations: int = 100,
                      num_steps: int = 24) -> jax.Array:
  """Projected gradient on the simplex for a convex ``objective``, taking at each iteration the
  best of ``num_steps`` step sizes ``2^-k`` (k = 0..num_steps-1) along the gradient: a line
  search evaluated in one vectorised call, so the loop has a fixed count and no inner loop."""
  steps = 2.0 ** -jnp.arange(num_steps, dtype=_F32)
  value_and_grad = jax.value_and_grad(objective)

  def body(_, w):
    f, grad = value_and_grad(w)
    grad = grad / jnp.maximum(jnp.linalg.norm(grad), _TINY)
    cands = project_simplex(w[None, :] - steps[:, None] * grad[None, :], active[None, :])
    vals = jax.vmap(objective)(cands)
    best = jnp.argmin(vals)
    return jnp.where(vals[best] < f, cands[best], w)

  return jax.lax.fori_loop(0, iterations, body, w0)


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
