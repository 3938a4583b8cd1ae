"""Float64 numpy references of the multi-task gradient methods, written from the papers'
equations on the Jacobian ``J`` (T x D, one task gradient per row) itself, not on the Gramian,
with exact (enumerating) or scipy solvers. Independent of ``tbgc_jax``'s implementation."""

import itertools

import numpy as np
import scipy.optimize


def _subsets(n):
  for k in range(1, n + 1):
    yield from itertools.combinations(range(n), k)


def project_dual_cone(J, y):
  """Projection of y onto {x : J x >= 0}: the nearest feasible projection onto the null space of
  a subset of rows (the projection lies on one face; every candidate is a feasible point)."""
  best = y if np.all(J @ y >= -1e-12 * np.linalg.norm(y) * np.abs(J).max()) else None
  for s in _subsets(len(J)):
    A = J[list(s)]
    x = y - A.T @ (np.linalg.pinv(A @ A.T) @ (A @ y))
    tol = 1e-9 * (np.linalg.norm(y) + 1e-300) * np.linalg.norm(J, axis=1)
    if np.all(J @ x >= -tol) and (best is None or np.linalg.norm(x - y) < np.linalg.norm(
        best - y) - 1e-15):
      best = x
  return best


def min_norm_hull(J):
  """Minimum-norm point of the convex hull of J's rows, by enumerating supports (KKT)."""
  best, best_norm = None, np.inf
  for s in _subsets(len(J)):
    A = J[list(s)]
    k = len(s)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = A @ A.T
    kkt[:k, k] = kkt[k, :k] = 1.0
    sol = np.linalg.lstsq(kkt, np.r_[np.zeros(k), 1.0], rcond=None)[0][:k]
    if np.all(sol >= -1e-12) and abs(sol.sum() - 1) < 1e-9:
      x = sol @ A
      if np.linalg.norm(x) < best_norm:
        best, best_norm = x, np.linalg.norm(x)
  return best


def mean(J):
  return J.mean(0)


def mgda(J):
  return min_norm_hull(J)


def upgrad(J):
  return sum(project_dual_cone(J, g / len(J)) for g in J)


def dualproj(J):
  return project_dual_cone(J, J.mean(0))


def pcgrad(J, orders):
  """orders[i]: the order in which task i visits the others (Yu et al., Algorithm 1)."""
  out = []
  for i, g in enumerate(J):
    g = g.copy()
    for j in orders[i]:
      if j != i and g @ J[j] < 0:
        g = g - (g @ J[j]) / (J[j] @ J[j]) * J[j]
    out.append(g)
  return np.sum(out, 0)


def all_orders(n):
  """Every combination of per-task orders of the other tasks."""
  per_task = [list(itertools.permutations([j for j in range(n) if j != i])) for i in range(n)]
  return list(itertools.product(*per_task))


def graddrop_choices(J, leak=0.0):
  """Per coordinate, the two possible GradDrop outputs (positive side kept, negative side kept)."""
  pos = np.where(J > 0, J, 0.0)
  neg = np.where(J < 0, J, 0.0)
  total = J.sum(0)
  return (leak * total + (1 - leak) * pos.sum(0),
          leak * total + (1 - leak) * neg.sum(0))


def cagrad(J, c=0.5):
  g0 = J.mean(0)
  sqrt_phi = c * np.linalg.norm(g0)
  n = len(J)

  def objective(w):
    gw = w @ J
    return gw @ g0 + sqrt_phi * np.linalg.norm(gw)

  best = None
  for start in [np.full(n, 1.0 / n)] + [np.eye(n)[i] * 0.9 + 0.1 / n for i in range(n)]:
    res = scipy.optimize.minimize(
        objective, start, method="SLSQP", bounds=[(0, 1)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
        options={"ftol": 1e-15, "maxiter": 1000})
    if best is None or res.fun < best.fun:
      best = res
  gw = best.x @ J
  return g0 + sqrt_phi / np.linalg.norm(gw) * gw


def imtl_g(J):
  """Liu et al. 2021, Eq. 10: alpha_{2:T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum."""
  units = J / np.linalg.norm(J, axis=1, keepdims=True)
  D = J[0] - J[1:]
  U = units[0] - units[1:]
  alpha = J[0] @ U.T @ np.linalg.inv(D @ U.T)
  alpha = np.r_[1 - alpha.sum(), alpha]
  return alpha @ J


def aligned_mtl(J):
  """Senushkin et al. 2023: the aligned Jacobian sigma_min U V^T (J = U S V^T), mean of rows."""
  u, s, vt = np.linalg.svd(J, full_matrices=False)
  rank = np.sum(s > s[0] * 1e-7)
  aligned = s[rank - 1] * u[:, :rank] @ vt[:rank]
  return aligned.mean(0)


def config(J):
  units = J / np.linalg.norm(J, axis=1, keepdims=True)
  x = np.linalg.pinv(units) @ np.ones(len(J))
  x = x / np.linalg.norm(x)
  return np.sum(J @ x) * x


def _solve_power(G, alpha):
  """w > 0 with G w = w^(-1/alpha): the minimizer of the strictly convex
  1/2 w^T G w - sum phi(w_i), phi' = w^(-1/alpha), by scipy's L-BFGS-B, then float64 Newton."""
  phi = (np.log if alpha == 1 else lambda w: w ** (1 - 1 / alpha) / (1 - 1 / alpha))
  fun = lambda w: 0.5 * w @ G @ w - np.sum(phi(w))
  jac = lambda w: G @ w - w ** (-1.0 / alpha)
  w0 = np.diag(G) ** (-alpha / (1 + alpha))
  w = scipy.optimize.minimize(fun, w0, jac=jac, method="L-BFGS-B",
                              bounds=[(1e-12, None)] * len(G),
                              options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 10000}).x
  for _ in range(20):
    hess = G + np.diag(w ** (-1.0 / alpha - 1) / alpha)
    step = np.linalg.solve(hess, jac(w))
    t = 1.0
    while np.any(w - t * step <= 0):
      t /= 2
    w = w - t * step
  assert np.max(np.abs(w ** (1.0 / alpha) * (G @ w) - 1)) < 1e-8
  return w


def fairgrad(J, alpha=1.0):
  return _solve_power(J @ J.T, alpha) @ J


def nash_mtl(J, max_norm=1.0):
  G = J @ J.T
  w = _solve_power(G / np.linalg.norm(G), 1.0)
  d = w @ J
  n = np.linalg.norm(d)
  return d * (max_norm / n if 0 < max_norm < n else 1.0)


def gradvac(J, orders, targets, beta=0.5):
  """One GradVac step (Wang et al., Eqs. 4-5); returns (update, new targets)."""
  targets = targets.copy()
  out = []
  for i, g in enumerate(J):
    g = g.copy()
    for j in orders[i]:
      if j == i:
        continue
      phi = g @ J[j] / (np.linalg.norm(g) * np.linalg.norm(J[j]))
      t = targets[i, j]
      if phi < t:
        g = g + (np.linalg.norm(g) * (t * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - t**2))
                 / (np.linalg.norm(J[j]) * np.sqrt(1 - t**2))) * J[j]
      targets[i, j] = (1 - beta) * t + beta * phi
    out.append(g)
  return np.sum(out, 0), targets


def constant(J, weights):
  return np.asarray(weights, np.float64) @ J


def krum(J, n_byzantine, n_selected=1):
  """Blanchard et al. 2017, Sec. 4: score(i) = sum of the squared distances to the
  T - f - 2 nearest other rows; Multi-Krum (El Mhamdi et al. 2018) averages the n_selected rows
  of lowest score (ties: the first rows)."""
  n = len(J)
  scores = []
  for i in range(n):
    d = sorted(np.sum((J[i] - J[j]) ** 2) for j in range(n) if j != i)
    scores.append(sum(d[:n - n_byzantine - 2]))
  chosen = np.argsort(scores, kind="stable")[:n_selected]
  return J[chosen].mean(0)


def trimmed_mean(J, trim_number):
  """Yin et al. 2018, Definition 2: per coordinate, the mean without the b largest and b
  smallest values."""
  return np.sort(J, axis=0)[trim_number:len(J) - trim_number].mean(0)


class Adam:
  """Adam (Kingma & Ba 2015, Algorithm 1) with optional L2 decay added to the gradient."""

  def __init__(self, lr, decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.decay, self.b1, self.b2, self.eps = lr, decay, b1, b2, eps
    self.m = self.v = 0.0
    self.t = 0

  def step(self, x, g):
    g = g + self.decay * x
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    mh, vh = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
    return x - self.lr * mh / (np.sqrt(vh) + self.eps)


# ---------------------------------------------------------------- loss scalarizations
def numeric_grad(fn, x, h=1e-6):
  """Central differences of a scalar function of a float64 vector."""
  x = np.asarray(x, np.float64)
  return np.array([(fn(x + h * e) - fn(x - h * e)) / (2 * h) for e in np.eye(len(x))])


def geometric_mean(L):
  return np.prod(L) ** (1.0 / len(L))


def stch(L, mu, lam, z):
  return mu * np.log(np.sum(np.exp(lam * (L - z) / mu)))


def pbi(L, theta, lam, z):
  f = L - z
  d = lam / np.linalg.norm(lam)
  d1 = f @ d
  return d1 + theta * np.linalg.norm(f - d1 * d)


# ---------------------------------------------------------------- stateful methods over steps
# Each takes ``steps = [(J: T x D backbone Jacobian, L: T losses)]`` and returns the backbone
# updates, one per step, in float64.
def imtl_l_updates(steps, lr=1e-3, hybrid=False):
  """IMTL-L (loss e^s L - s, s trained by Adam); ``hybrid``: IMTL-G on the scaled J."""
  s, adam, out = np.zeros(len(steps[0][1])), Adam(lr), []
  for J, L in steps:
    scaled = np.exp(s)[:, None] * J
    out.append(imtl_g(scaled) if hybrid else scaled.sum(0))
    s = adam.step(s, np.exp(s) * L - 1.0)
  return out


def gradnorm_updates(steps, alpha=1.5, lr=1e-3):
  """Chen et al. 2018, Algorithm 1, with the norms of the rows of J."""
  T = len(steps[0][1])
  w, adam, L0, out = np.ones(T), Adam(lr), None, []
  for J, L in steps:
    L0 = L if L0 is None else L0
    out.append(w @ J)
    norms = np.linalg.norm(J, axis=1)
    rate = (L / L0) / np.mean(L / L0)
    target = np.mean(w * norms) * rate ** alpha
    w = np.maximum(adam.step(w, norms * np.sign(w * norms - target)), 0.0)
    w = T * w / w.sum()
  return out


def project_simplex_qp(v):
  """argmin_{w in simplex} ||w - v|| by scipy (SLSQP)."""
  n = len(v)
  res = scipy.optimize.minimize(
      lambda w: np.sum((w - v) ** 2), np.full(n, 1.0 / n), jac=lambda w: 2 * (w - v),
      method="SLSQP", bounds=[(0, None)] * n,
      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
      options={"ftol": 1e-15, "maxiter": 1000})
  return res.x


def moco_updates(steps, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
  """Fernando et al. 2023, Algorithm 1 (projection onto the simplex)."""
  T, D = steps[0][0].shape
  y, lam, out = np.zeros((T, D)), np.full(T, 1.0 / T), []
  for k, (J, _) in enumerate(steps, start=1):
    y = y - beta / k ** beta_sigma * (y - J)
    lam = project_simplex_qp(lam - gamma / k ** gamma_sigma * (y @ y.T + rho * np.eye(T)) @ lam)
    out.append(lam @ y)
  return out


def db_mtl_updates(steps, beta=0.9, beta_sigma=0.0, eps=1e-8):
  """Lin et al. 2023: EMA of grad log L_t, each rescaled to the largest norm."""
  T, D = steps[0][0].shape
  est, out = np.zeros((T, D)), []
  for k, (J, L) in enumerate(steps, start=1):
    b = beta / k ** beta_sigma
    est = b * est + (1 - b) * J / (L[:, None] + eps)
    n = np.linalg.norm(est, axis=1)
    out.append((n.max() / (n + eps)) @ est)
  return out


DETERMINISTIC = {
    "mean": mean, "mgda": mgda, "upgrad": upgrad, "dualproj": dualproj, "cagrad": cagrad,
    "imtl_g": imtl_g, "aligned_mtl": aligned_mtl, "config": config, "fairgrad": fairgrad,
    "nash_mtl": nash_mtl,
    # With the hyperparameters of `hyperparameters` below.
    "constant": lambda J: constant(J, **hyperparameters("constant", len(J))),
    "krum": lambda J: krum(J, **hyperparameters("krum", len(J))),
    "trimmed_mean": lambda J: trimmed_mean(J, **hyperparameters("trimmed_mean", len(J))),
}


def hyperparameters(name, n):
  """What the tests and benchmarks/accuracy.py give the methods that require hyperparameters
  (per task, or naming a task), for ``n`` tasks named t0, t1, ... (Krum needs n >= 3)."""
  return {"constant": {"weights": tuple(0.5 * 2.0**k for k in range(n))},
          "krum": {"n_byzantine": 0, "n_selected": 2},
          "trimmed_mean": {"trim_number": (n - 1) // 2},
          "pcd": {"primary": "t0", "tau": 0.3}}.get(name, {})


# ------------------------------------------------------------- methods with state across steps
def project_simplex(v):
  """Euclidean projection onto the simplex: v - tau clipped at 0, tau found by root finding."""
  v = np.asarray(v, np.float64)
  tau = scipy.optimize.brentq(lambda t: np.maximum(v - t, 0).sum() - 1, v.min() - 1, v.max())
  return np.maximum(v - tau, 0)


def modo(Js, gamma=0.1, rho=0.1):
  """Chen et al. 2024, Eqs. 2.9a-b with G = J J^T: the update of each step."""
  lam = np.full(len(Js[0]), 1.0 / len(Js[0]))
  out = []
  for J in Js:
    lam = project_simplex(lam - gamma * (J @ J.T @ lam + rho * lam))
    out.append(lam @ J)
  return out


def sdmgrad(Js, lr=10.0, momentum=0.5, iterations=20, lam=0.3, pref=None):
  """Xiao et al. 2023, Eq. 9 by heavy-ball projected steps on G / (mean ||g_t||)^2 (the
  authors' normalisation), warm-started across steps."""
  n = len(Js[0])
  pref = np.full(n, 1.0 / n) if pref is None else np.asarray(pref, np.float64)
  w = np.full(n, 1.0 / n)
  out = []
  for J in Js:
    a = J @ J.T / (np.mean(np.linalg.norm(J, axis=1)) ** 2 + 1e-8)
    v = None
    for _ in range(iterations):
      grad = a @ (w + lam * pref)
      v = grad if v is None else momentum * v + grad
      w = project_simplex(w - lr * v)
    out.append((w + lam * pref) @ J / (1 + lam))
  return out


def weights_of(J, update):
  """The weights w with J^T w = update (unique for full-rank J)."""
  return np.linalg.lstsq(J.T, update, rcond=None)[0]


def crmogm(Js, inner, alpha=0.9, initial=None):
  """Zhou et al. 2022, Eq. 5 on the weights of ``inner`` (a reference update function)."""
  lam, out = initial, []
  for J in Js:
    w_hat = weights_of(J, inner(J))
    lam = w_hat if lam is None else alpha * lam + (1 - alpha) * w_hat
    out.append(lam @ J)
  return out


def pcd_direction(Jn, taus):
  """argmin 1/2 ||d - Jn[0]||^2 s.t. Jn[j] . d >= tau_j ||Jn[j]||^2 (j >= 1): the feasible
  point among the projections of Jn[0] onto the intersections of subsets of the constraint
  planes (KKT: the multipliers of the subset are >= 0); None if none is feasible."""
  g, rows = Jn[0], Jn[1:]
  b = np.asarray(taus) * np.sum(rows**2, axis=1)
  best = g if np.all(rows @ g >= b - 1e-12) else None
  for s in _subsets(len(rows)):
    A = rows[list(s)]
    mu = np.linalg.lstsq(A @ A.T, b[list(s)] - A @ g, rcond=None)[0]
    d = g + mu @ A
    if np.all(mu >= -1e-12) and np.all(rows @ d >= b - 1e-9 * np.abs(b).max()):
      if best is None or np.linalg.norm(d - g) < np.linalg.norm(best - g):
        best = d
  return best


def pcd(Js, primary=0, tau=0.02, beta=0.999, eps=1e-8):
  """Priority-Constrained Descent (Varam et al. 2026) on EMA-normalised gradients, rescaled to
  the primary gradient's norm; g_p when infeasible."""
  n = len(Js[0])
  ema, out = np.zeros(n), []
  order = [primary] + [k for k in range(n) if k != primary]
  for k, J in enumerate(Js, 1):
    ema = beta * ema + (1 - beta) * np.sum(J**2, axis=1)
    s = 1 / np.sqrt(ema / (1 - beta**k) + eps)
    d = pcd_direction((s[:, None] * J)[order], np.broadcast_to(tau, [n - 1]))
    g = J[primary]
    out.append(g if d is None else d * np.linalg.norm(g) / np.linalg.norm(d))
  return out


def excess_mtl(Js, eta=1.0, n_warmup=0):
  """He et al. 2024, Eqs. 6-9 with the baseline of Sec. 3.2 (ratio at every step)."""
  n = len(Js[0])
  alpha, sq, warm_sum, base, out = np.full(n, 1.0 / n), 0.0, 0.0, None, []
  for k, J in enumerate(Js):
    sq = sq + J**2
    risk = np.sum(J**2 / np.sqrt(sq + 1e-7), axis=1)
    if k < n_warmup:
      warm_sum = warm_sum + risk
    else:
      if base is None:
        base = risk if n_warmup == 0 else warm_sum / n_warmup
      logits = np.log(alpha) + eta * risk / (base + 1e-7)  # alpha e^x, normalised, without
      e = np.exp(logits - logits.max())  # overflow where the risk ratios span decades
      alpha = e / e.sum()
    out.append(alpha @ J)
  return out
