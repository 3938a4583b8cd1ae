"""Detection box utilities, Hungarian matching path and set-prediction losses vs numpy/scipy."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from tbgc_jax.models.detection import losses
from tbgc_jax.ops import boxes as box_ops


def _np_giou(a, b):
  """Generalised IoU of two xyxy boxes, written out by hand."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  union = area(a) + area(b) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull, inter / union


def _rand_cxcywh(rng, *shape):
  c = rng.uniform(0.2, 0.8, size=(*shape, 2))
  wh = rng.uniform(0.05, 0.4, size=(*shape, 2))
  return np.concatenate([c, wh], -1).astype(np.float32)


@jax.jit
def _box_fns(a, b):
  ax = box_ops.box_cxcywh_to_xyxy(a)
  bx = box_ops.box_cxcywh_to_xyxy(b)
  return (ax, bx, box_ops.box_xyxy_to_cxcywh(ax), box_ops.pairwise_generalized_box_iou(ax, bx),
          box_ops.pairwise_box_iou(ax, bx), box_ops.generalized_box_iou(ax[:3], bx),
          box_ops.generalized_box_iou(ax, ax))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000))
def test_box_conversions_and_giou_match_numpy(seed):
  rng = np.random.default_rng(seed)
  a = _rand_cxcywh(rng, 5)
  b = _rand_cxcywh(rng, 3)
  ax, bx, back, pg, pi, el, self_giou = map(np.asarray, _box_fns(a, b))
  np.testing.assert_allclose(back, a, atol=1e-6)
  np.testing.assert_allclose(ax[:, 2] - ax[:, 0], a[:, 2], atol=1e-6)
  for i in range(5):
    for j in range(3):
      g, u = _np_giou(ax[i], bx[j])
      np.testing.assert_allclose(pg[i, j], g, atol=1e-5)
      np.testing.assert_allclose(pi[i, j], u, atol=1e-5)
  np.testing.assert_allclose(el, np.diag(pg[:3]), atol=1e-6)
  np.testing.assert_allclose(self_giou, 1.0, atol=1e-6)
  assert (pg >= -1 - 1e-6).all() and (pg <= 1 + 1e-6).all()


def test_focal_loss_matches_numpy_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(scale=3, size=(4, 7)).astype(np.float32)
  t = (rng.uniform(size=(4, 7)) < 0.3).astype(np.float32)
  p = 1 / (1 + np.exp(-x.astype(np.float64)))
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  pt = np.where(t == 1, p, 1 - p)
  ref = np.where(t == 1, 0.25, 0.75) * (1 - pt) ** 2 * ce
  np.testing.assert_allclose(losses.sigmoid_focal_loss(x, t), ref, rtol=1e-4, atol=1e-6)


def _np_cost(logits, boxes, tl, tb):
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  q, t = len(boxes), len(tl)
  cost = np.zeros((q, t))
  bx = np.asarray(box_ops.box_cxcywh_to_xyxy(boxes), np.float64)
  tx = np.asarray(box_ops.box_cxcywh_to_xyxy(tb), np.float64)
  for i in range(q):
    for j in range(t):
      pc = p[i, tl[j]]
      c_cls = 0.25 * (1 - pc) ** 2 * -np.log(pc + 1e-8) - 0.75 * pc ** 2 * -np.log(1 - pc + 1e-8)
      c_l1 = np.abs(boxes[i] - tb[j]).sum()
      cost[i, j] = 2 * c_cls + 5 * c_l1 - 2 * _np_giou(bx[i], tx[j])[0]
  return cost


def test_matcher_path_agrees_with_scipy_on_padded_targets():
  rng = np.random.default_rng(1)
  b, q, t, k = 4, 9, 6, 5
  logits = rng.normal(size=(b, q, k)).astype(np.float32)
  boxes = _rand_cxcywh(rng, b, q)
  tl = rng.integers(0, k, size=(b, t)).astype(np.int32)
  tb = _rand_cxcywh(rng, b, t)
  tv = np.array([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 1], [0] * 6, [1] * 6], bool)
  # Padded targets hold garbage that must not matter.
  tb[~tv] = rng.uniform(-5, 5, size=(int((~tv).sum()), 4))
  toq = np.asarray(jax.jit(losses.match_predictions)(logits, boxes, tl, tb, tv))
  for i in range(b):
    cost = _np_cost(logits[i], boxes[i], tl[i], tb[i])
    valid = np.flatnonzero(tv[i])
    np.testing.assert_allclose(
        np.asarray(losses.match_cost(logits[i], boxes[i], tl[i], tb[i]))[:, valid],
        cost[:, valid], rtol=1e-4, atol=1e-4)
    rows, cols = linear_sum_assignment(cost[:, valid])
    expected = np.full(q, -1)
    expected[rows] = valid[cols]
    np.testing.assert_array_equal(toq[i], expected)


def test_random_cost_matrices_match_scipy():
  rng = np.random.default_rng(2)
  from tbgc_jax.ops import hungarian_match
  fn = jax.jit(jax.vmap(hungarian_match))
  cost = rng.normal(size=(6, 12, 7)).astype(np.float32)
  valid = rng.uniform(size=(6, 7)) < 0.6
  qot, toq = map(np.asarray, fn(cost, valid))
  for i in range(6):
    v = np.flatnonzero(valid[i])
    rows, cols = linear_sum_assignment(cost[i][:, v])
    assert np.isclose(cost[i][qot[i, v], v].sum(), cost[i][rows, v[cols]].sum(), atol=1e-5)
    assert sorted(np.flatnonzero(toq[i] >= 0)) == sorted(qot[i, v])


def test_set_losses_match_numpy_and_normalise_by_global_count():
  rng = np.random.default_rng(3)
  b, q, t, k = 2, 5, 3, 4
  logits = rng.normal(size=(b, q, k)).astype(np.float32)
  boxes = _rand_cxcywh(rng, b, q)
  tl = rng.integers(0, k, size=(b, t)).astype(np.int32)
  tb = _rand_cxcywh(rng, b, t)
  toq = np.array([[2, -1, 0, -1, -1], [-1, 1, -1, -1, 0]], np.int32)
  qw = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.float32)  # last query is padding
  num_boxes = 4.0
  out = losses.set_prediction_losses(logits, boxes, tl, tb, toq, qw, jnp.float32(num_boxes))
  ce = l1 = gl = 0.0
  for i in range(b):
    for j in range(q):
      if qw[i, j] == 0:
        continue
      onehot = np.zeros(k, np.float32)
      if toq[i, j] >= 0:
        onehot[tl[i, toq[i, j]]] = 1
        tgt = tb[i, toq[i, j]]
        l1 += np.abs(boxes[i, j] - tgt).sum()
        gl += 1 - _np_giou(np.asarray(box_ops.box_cxcywh_to_xyxy(boxes[i, j])),
                           np.asarray(box_ops.box_cxcywh_to_xyxy(tgt)))[0]
      p = 1 / (1 + np.exp(-logits[i, j].astype(np.float64)))
      pt = np.where(onehot == 1, p, 1 - p)
      ce += (np.where(onehot == 1, 0.25, 0.75) * (1 - pt) ** 2 * -np.log(pt)).sum()
  np.testing.assert_allclose(out["loss_ce"], ce / num_boxes, rtol=1e-4)
  np.testing.assert_allclose(out["loss_bbox"], l1 / num_boxes, rtol=1e-4)
  np.testing.assert_allclose(out["loss_giou"], gl / num_boxes, rtol=1e-4)
