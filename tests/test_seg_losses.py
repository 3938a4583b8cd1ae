"""Mask2Former semantic losses against independent numpy/scipy formulas on small cases."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from tbgc_jax.models.segmentation.losses import (
    importance_points,
    layer_loss,
    losses_at_points,
    mask2former_loss,
    match_cost,
    num_uniform,
    sample_labels,
    semantic_targets,
)


def _np_bilinear(img, u, v):
  """grid_sample(align_corners=False, zeros) of one [h, w] map at normalised (u, v)."""
  h, w = img.shape
  x, y = u * w - 0.5, v * h - 0.5
  x0, y0 = int(np.floor(x)), int(np.floor(y))
  out = 0.0
  for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
    for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
      if 0 <= yi < h and 0 <= xi < w:
        out += wx * wy * img[yi, xi]
  return out


def _np_label_at(label, u, v):
  h, w = label.shape
  return label[min(int(np.floor(v * h)), h - 1), min(int(np.floor(u * w)), w - 1)]


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_cost(cl, xs, ys, ws, classes):
  """Loop over (query, target): -2 p + 5 weighted mean BCE + 5 weighted dice."""
  q, t = cl.shape[0], ys.shape[0]
  prob = np.exp(cl - cl.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  cost = np.zeros((q, t))
  for i in range(q):
    for j in range(t):
      p = _sig(xs[i])
      bce = -(ys[j] * np.log(p) + (1 - ys[j]) * np.log(1 - p))
      bce = (bce * ws).sum() / max(ws.sum(), 1)
      dice = 1 - (2 * (p * ws * ys[j]).sum() + 1) / ((p * ws).sum() + (ys[j] * ws).sum() + 1)
      cost[i, j] = -2 * prob[i, classes[j]] + 5 * bce + 5 * dice
  return cost


def _np_losses(cl, masks, label, valid, qot, tv, points, eos=0.1):
  """CE with no-object weight, then BCE/dice per matched target at its points."""
  b, q, c1 = cl.shape
  c = c1 - 1
  num, den = 0.0, 0.0
  for bi in range(b):
    if not valid[bi]:
      continue
    tgt = np.full(q, c)
    for t in range(c):
      if tv[bi, t]:
        tgt[qot[bi, t]] = t
    for i in range(q):
      lp = cl[bi, i] - cl[bi, i].max()
      lp = lp - np.log(np.exp(lp).sum())
      wgt = eos if tgt[i] == c else 1.0
      num += -wgt * lp[tgt[i]]
      den += wgt
  ce = num / den
  bce_sum, dice_sum, n = 0.0, 0.0, max(tv.sum(), 1)
  for bi in range(b):
    for t in range(c):
      if not tv[bi, t]:
        continue
      m = masks[bi, qot[bi, t]]
      xs = np.array([_np_bilinear(m, u, v) for u, v in points[bi, t]])
      lab = np.array([_np_label_at(label[bi], u, v) for u, v in points[bi, t]])
      ys = (lab == t).astype(float)
      ws = (lab != 255).astype(float)
      p = _sig(xs)
      bce = -(ys * np.log(p) + (1 - ys) * np.log(1 - p))
      bce_sum += (bce * ws).sum() / max(ws.sum(), 1)
      dice_sum += 1 - (2 * (p * ws * ys).sum() + 1) / ((p * ws).sum() + (ys * ws).sum() + 1)
  return ce, bce_sum / n, dice_sum / n


def _case(seed, b=2, q=6, c=3, h=4, w=6):
  rng = np.random.default_rng(seed)
  cl = rng.normal(size=(b, q, c + 1)).astype(np.float32)
  masks = (2 * rng.normal(size=(b, q, h, w))).astype(np.float32)
  label = rng.integers(0, c, size=(b, h * 2, w * 2)).astype(np.uint8)
  label[rng.uniform(size=label.shape) < 0.2] = 255
  label[0][label[0] == 1] = 0  # class 1 absent from image 0
  valid = np.array([True, True])
  return cl, masks, label, valid


def test_semantic_targets():
  label = np.array([[[0, 2], [255, 2]]], np.uint8)
  classes, masks, tv = semantic_targets(jnp.asarray(label), 3)
  np.testing.assert_array_equal(classes, [[0, 1, 2]])
  np.testing.assert_array_equal(tv, [[True, False, True]])
  np.testing.assert_array_equal(masks[0, 2], [[False, True], [False, True]])
  assert not np.asarray(masks[0, :, 1, 0]).any()  # the ignore pixel is nobody's foreground


def test_match_cost_matches_loops():
  rng = np.random.default_rng(0)
  cl = rng.normal(size=(5, 4)).astype(np.float32)
  xs = rng.normal(size=(5, 7)).astype(np.float32)
  ys = (rng.uniform(size=(3, 7)) < 0.5).astype(np.float32)
  ws = (rng.uniform(size=7) < 0.7).astype(np.float32)
  classes = np.array([0, 2, 1])
  got = match_cost(cl, xs, ys, ws, jnp.asarray(classes))
  np.testing.assert_allclose(got, _np_cost(cl, xs, ys, ws, classes), rtol=1e-4, atol=1e-5)


def test_layer_loss_matches_scipy_matching_and_numpy_losses():
  cl, masks, label, valid = _case(1)
  b, q, c1 = cl.shape
  c = c1 - 1
  k = 8
  rng = jax.random.key(3)
  got = _layer(rng, cl, masks, label, valid, num_points=k)
  # Reproduce the documented sampling: uniform matching points from the first key, loss
  # points from `importance_points` with the second, everything else independently.
  draws = jax.random.uniform(rng, (b, k + c * num_uniform(k), 2))
  mpts = np.asarray(draws[:, :k])
  qot = np.zeros((b, c), int)
  tv = np.zeros((b, c), bool)
  for bi in range(b):
    lab = np.array([_np_label_at(label[bi], u, v) for u, v in mpts[bi]])
    ys = np.stack([(lab == t).astype(float) for t in range(c)])
    ws = (lab != 255).astype(float)
    xs = np.array([[_np_bilinear(masks[bi, i], u, v) for u, v in mpts[bi]] for i in range(q)])
    present = [t for t in range(c) if (label[bi] == t).any()]
    tv[bi, present] = True
    cost = _np_cost(cl[bi], xs, ys[present], ws, np.array(present))
    rows, cols = linear_sum_assignment(cost)
    qot[bi, np.array(present)[cols]] = rows
  matched = jnp.take_along_axis(jnp.asarray(masks), jnp.asarray(qot)[:, :, None, None], axis=1)
  points = np.asarray(jax.jit(importance_points, static_argnums=3)(
      draws[:, k:].reshape(b, c, -1, 2), matched, jnp.asarray(label), k))
  ce, bce, dice = _np_losses(cl, masks, label, valid, qot, tv, points)
  np.testing.assert_allclose(got["loss_ce"], ce, rtol=1e-4)
  np.testing.assert_allclose(got["loss_mask"], bce, rtol=1e-4)
  np.testing.assert_allclose(got["loss_dice"], dice, rtol=1e-4)


def test_losses_at_points_padding_example_contributes_nothing():
  cl, masks, label, _ = _case(2)
  b, q, c1 = cl.shape
  rng = np.random.default_rng(0)
  toq = np.full((b, q), -1)
  qot = np.tile(np.arange(c1 - 1), (b, 1))
  toq[:, :c1 - 1] = np.arange(c1 - 1)
  toq[0, 1] = -1  # target 1 is absent from image 0
  tv = np.array([[True, False, True], [True, True, True]])
  points = rng.uniform(size=(b, c1 - 1, 8, 2)).astype(np.float32)
  valid = np.array([True, False])
  got = jax.jit(losses_at_points)(cl, masks, label, valid, toq, qot, tv & valid[:, None], points)
  ce, bce, dice = _np_losses(cl, masks, label, valid, qot, tv & valid[:, None], points)
  np.testing.assert_allclose([got["loss_ce"], got["loss_mask"], got["loss_dice"]],
                             [ce, bce, dice], rtol=1e-4)


def test_importance_points_prefer_uncertain_valid_candidates():
  uni = jax.random.uniform(jax.random.key(0), (1, 2, num_uniform(20), 2))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 6, 6)) * 3, jnp.float32)
  label = np.zeros((1, 12, 12), np.uint8)
  label[:, :, 6:] = 255
  pts = np.asarray(jax.jit(importance_points, static_argnums=3)(
      uni, logits, jnp.asarray(label), 20))
  assert pts.shape == (1, 2, 20, 2)
  # 15 importance points: all on valid pixels (plenty of valid candidates exist).
  assert (np.asarray(sample_labels(jnp.asarray(label), jnp.asarray(pts[:, :, :15]))) == 0).all()
  cand = np.asarray(uni[:, :, :60])
  np.testing.assert_array_equal(pts[:, :, 15:], np.asarray(uni[:, :, 60:]))
  for t in range(2):
    unc = np.array([-abs(_np_bilinear(np.asarray(logits[0, t]), u, v)) if u < 0.5 else -np.inf
                    for u, v in cand[0, t]])
    best = cand[0, t][np.argsort(-unc, kind="stable")[:15]]
    np.testing.assert_allclose(np.sort(pts[0, t, :15], 0), np.sort(best, 0))


# Compiled once, shared by the tests below (CPU compiles of the loss take seconds).
_layer = jax.jit(layer_loss, static_argnames=("num_points",))
_loss_and_grad = jax.jit(jax.value_and_grad(
    lambda m, key, cl, label, valid: mask2former_loss(key, cl, m, label, valid, num_points=8),
    has_aux=True))


def test_ignore_pixels_and_padding_examples_change_no_loss():
  rng = np.random.default_rng(5)
  cl, masks, label, _ = _case(5)
  w = masks.shape[-1]
  cl, masks = np.stack([cl, cl, cl]), np.stack([masks, -masks, masks])
  label[:, :, label.shape[2] // 2:] = 255  # right half of every image ignored
  valid = np.array([True, False])
  key = jax.random.key(0)
  (base_total, base), _ = _loss_and_grad(masks, key, cl, label, valid)
  # Mask columns >= w/2 + 1 are never read by a point on a valid pixel (bilinear reads
  # columns <= w/2 there); image 1 is padding, so anything of it may change.
  masks2 = masks.copy()
  masks2[..., w // 2 + 1:] = 50 * rng.normal(size=masks2[..., w // 2 + 1:].shape)
  masks2[:, 1] = rng.normal(size=masks2[:, 1].shape)
  cl2 = cl.copy()
  cl2[:, 1] = rng.normal(size=cl2[:, 1].shape)
  label2 = label.copy()
  half = label2[1, :, : label.shape[2] // 2]
  label2[1, :, : label.shape[2] // 2] = rng.integers(0, 3, size=half.shape)
  (total, other), _ = _loss_and_grad(masks2, key, cl2, label2, valid)
  np.testing.assert_allclose(total, base_total, rtol=1e-6)
  for name in base:
    np.testing.assert_allclose(other[name], base[name], rtol=1e-6)
  # The check can fail: changing a valid region's prediction changes the loss.
  masks3 = masks.copy()
  masks3[:, 0, :, :, :2] += 3.0
  assert abs(float(_loss_and_grad(masks3, key, cl, label, valid)[0][0]) - float(base_total)) > 1e-3


def test_deep_supervision_sums_layers_and_gradients_are_finite():
  cl, masks, label, valid = _case(4)
  cls3 = np.stack([cl, cl * 0.5, cl * 2])
  masks3 = np.stack([masks, masks * 0.5, masks])
  key = jax.random.key(1)
  (total, metrics), grads = _loss_and_grad(masks3, key, cls3, label, valid)
  keys = jax.random.split(key, 3)
  per = [_layer(keys[i], cls3[i], masks3[i], label, valid, num_points=8) for i in range(3)]
  ref = sum(2 * p["loss_ce"] + 5 * p["loss_mask"] + 5 * p["loss_dice"] for p in per)
  np.testing.assert_allclose(total, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_dice"], per[-1]["loss_dice"], rtol=1e-5)
  assert np.isfinite(np.asarray(grads)).all() and np.abs(np.asarray(grads)).sum() > 0
