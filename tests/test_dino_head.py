"""DINO head: loss/grad on padded batches (one compile), predict, denoising queries, presets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from tbgc_jax.models.detection import (
  PRESETS,
  DINOHead,
  denoising_layout,
  rescale_boxes,
)
from tbgc_jax.models.detection.dino import stack_layers
from tbgc_jax.models.stacking import num_layers

_CHANS = (4, 8, 12, 16)
_K = 5


def _cfg(**kw):
  # Two levels (stride 32 + one extra) keep the CPU compile short.
  return dataclasses.replace(PRESETS["tiny"], feature_levels=(3,), num_extra_levels=1,
                             num_queries=10, num_denoising=12, num_select=15, **kw)


def _features(rng, b=3, size=192):
  return [jnp.asarray(rng.normal(size=(b, size // s, size // s, c)), jnp.float32)
          for s, c in zip((4, 8, 16, 32), _CHANS, strict=True)]


def _batch(b=3, size=192):
  boxes = np.zeros((b, 3, 4), np.float32)
  boxes[0, :2] = [[10, 20, 60, 90], [100, 40, 150, 120]]
  boxes[1, 0] = [30, 30, 80, 70]
  return {
      "image_mask": np.ones((b, size, size), bool),
      "image_hw": np.array([[192, 192], [150, 120], [192, 192]], np.int32)[:b],
      "boxes": boxes, "labels": np.array([[1, 4, 0], [2, 0, 0], [3, 3, 3]], np.int32)[:b],
      "box_mask": np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)[:b],
      "valid": np.array([True, True, False])[:b],
  }


@pytest.mark.slow
def test_loss_is_finite_ignores_padding_and_compiles_once():
  # No encoder layer here (its MSDeformAttn is the decoder's, and the backward pass is the
  # costly compile on CPU); `test_predict...` runs one.
  head = DINOHead(_CHANS, _K, _cfg(num_encoder_layers=0), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(head, nnx.Param, ...)

  @jax.jit
  def step(params, feats, batch, rng):
    fn = lambda p: nnx.merge(graphdef, p, rest).loss(feats, batch, rng)
    return jax.value_and_grad(fn, has_aux=True)(params)

  rng = np.random.default_rng(0)
  feats = _features(rng)
  batch = _batch()
  (loss, diag), grads = step(params, feats, batch, jax.random.key(1))
  assert set(diag) == {"loss_ce", "loss_bbox", "loss_giou", "loss_aux", "loss_enc", "loss_dn",
                       "num_boxes"}
  assert float(diag["num_boxes"]) == 3.0  # the invalid example's boxes don't count
  for k in ("loss_aux", "loss_enc", "loss_dn", "loss_ce", "loss_bbox", "loss_giou"):
    assert float(diag[k]) > 0, k
  flat = jax.tree.leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in flat)
  assert sum(float(jnp.abs(g).sum()) for g in flat) > 0
  # Garbage in padded targets and in the padding example changes nothing.
  junk = {k: v.copy() for k, v in batch.items()}
  junk["boxes"][0, 2] = [1e4, -3, 5, 7]
  junk["labels"][0, 2] = 99
  junk["boxes"][2] = rng.uniform(0, 200, (3, 4))
  junk["image_hw"][2] = 0
  feats2 = [f.at[2].set(jnp.asarray(rng.normal(size=f.shape[1:]) * 100, f.dtype))
            for f in feats]
  (loss2, _), grads2 = step(params, feats2, junk, jax.random.key(1))
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  for g, g2 in zip(flat, jax.tree.leaves(grads2), strict=True):
    np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-6)
  assert step._cache_size() == 1
  # Another real box count (here 1 per image): other active groups, the same executable.
  one = {k: v.copy() for k, v in batch.items()}
  one["box_mask"][0, 1] = False
  (loss3, diag3), _ = step(params, feats, one, jax.random.key(1))
  assert np.isfinite(float(loss3)) and float(diag3["num_boxes"]) == 2.0
  assert float(diag3["loss_dn"]) > 0
  assert step._cache_size() == 1
  # The scanned decoder (`scan_layers`, same seed: the stacked parameters) gives the same
  # loss and gradients: the second layer reads the first's undetached boxes (look forward
  # twice) through the scan's carry, and the references stay detached.
  scanned = DINOHead(_CHANS, _K, _cfg(num_encoder_layers=0, scan_layers=True),
                     rngs=nnx.Rngs(0))
  graphdef_s, params_s, rest_s = nnx.split(scanned, nnx.Param, ...)
  fn_s = lambda p: nnx.merge(graphdef_s, p, rest_s).loss(feats, batch, jax.random.key(1))
  (loss_s, diag_s), grads_s = jax.jit(jax.value_and_grad(fn_s, has_aux=True))(params_s)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5), diag, diag_s)
  want = nnx.to_flat_state(stack_layers(grads))
  got = nnx.to_flat_state(grads_s)
  assert [p for p, _ in want] == [p for p, _ in got]
  for (path, a), (_, b) in zip(want, got, strict=True):
    a, b = np.asarray(a[...]), np.asarray(b[...])
    # Attention key biases get a zero gradient (softmax is shift-invariant): rounding only.
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6 * max(1.0, np.abs(a).max()),
                               err_msg="/".join(map(str, path)))


def test_predict_top_k_in_input_pixels_and_rescale():
  head = DINOHead(_CHANS, _K, _cfg(), rngs=nnx.Rngs(0))
  batch = _batch()
  out = jax.jit(lambda f, b: head.predict(f, b))(_features(np.random.default_rng(1)), batch)
  assert out["scores"].shape == (3, 15) and out["labels"].shape == (3, 15)
  assert out["boxes"].shape == (3, 15, 4) and out["labels"].dtype == jnp.int32
  s = np.asarray(out["scores"])
  assert (np.diff(s, axis=1) <= 0).all() and ((s >= 0) & (s <= 1)).all()
  assert ((out["labels"] >= 0) & (out["labels"] < _K)).all()
  b = np.asarray(out["boxes"])
  hw = batch["image_hw"][:, None, ::-1]
  assert (b[..., :2] >= -1e-3).all() and (b[..., 2:] <= np.tile(hw, 1) + 1e-3).all()
  # Back to the original image: x scales by orig_w / w, y by orig_h / h, then clipped.
  boxes = np.array([[[10, 20, 30, 40], [0, 0, 150, 120]]], np.float32)
  image_hw, orig_hw = np.array([[100, 150]]), np.array([[200, 300]])
  want = np.array([[[20, 40, 60, 80], [0, 0, 300, 200]]], np.float32)
  np.testing.assert_allclose(rescale_boxes(boxes, image_hw, orig_hw), want)
  np.testing.assert_allclose(rescale_boxes(jnp.asarray(boxes), image_hw, orig_hw), want)


def test_denoising_queries_noise_bounds_and_attention_mask():
  # 2 real boxes of 3 padded, dn_number 24: 24 // 2 = 12 groups of 2 + 2 queries in 48 slots.
  cfg = dataclasses.replace(PRESETS["tiny"], num_queries=4, num_denoising=24)
  boxes = jnp.asarray([[[0.5, 0.5, 0.2, 0.4], [0.3, 0.3, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0]]])
  labels = jnp.asarray([[1, 2, 0]])
  valid = jnp.asarray([[True, True, False]])

  @jax.jit
  def run(key):  # one small compile instead of many eager ops
    head = DINOHead(_CHANS, _K, cfg, rngs=nnx.Rngs(0))
    return head._denoising(boxes, labels, valid, key)

  tgt, ref_unact, target_of_dn, active, groups, mask = run(jax.random.key(0))
  m, groups_want, d = 2, 12, 48
  assert int(groups) == groups_want
  assert tgt.shape == (1, d, cfg.hidden_dim)
  slot = np.arange(d)
  pos = (slot % (2 * m)) < m
  np.testing.assert_array_equal(active[0], slot < 2 * m * groups_want)
  want = np.where(pos, slot % m, -1)
  np.testing.assert_array_equal(target_of_dn[0], want)
  # Positive queries' corners move by < half the box size, negatives' by 1 to 2 halves.
  noised = jax.nn.sigmoid(ref_unact[0])
  from tbgc_jax.models.detection import box_cxcywh_to_xyxy
  gt = jnp.tile(boxes[0, :m], (d // m, 1))
  shift = np.abs(np.asarray(box_cxcywh_to_xyxy(noised) - box_cxcywh_to_xyxy(gt)))
  half = np.tile(np.asarray(gt[:, 2:]) / 2, (1, 2))
  rel = shift / half
  assert (rel[pos] <= 1 + 1e-4).all()
  # Negatives can be clipped at the image border or flipped (width < 0 becomes ~0, as in
  # DINO): check the others.
  xyxy = np.asarray(box_cxcywh_to_xyxy(noised))
  inside = (xyxy > 1e-4).all(-1) & (xyxy < 1 - 1e-4).all(-1) & (noised[:, 2:] > 1e-3).all(-1)
  neg = ~pos & inside
  assert neg.any() and (rel[neg] >= 1 - 1e-4).all() and (rel[neg] <= 2 + 1e-4).all()
  mk = np.asarray(mask[0, 0])
  assert mk.shape == (d + 4, d + 4)
  assert not mk[d:, :d].any() and mk[d:, d:].all()  # matching queries never see DN queries
  assert not mk[:2 * m, 2 * m:d].any() and not mk[2 * m:d, :2 * m].any()  # groups separated
  assert mk[:2 * m, :2 * m].all()  # a group sees itself
  assert mk[:d, d:].all()  # DN queries may see matching queries


@pytest.mark.parametrize("counts,num_dn,groups", [
    ((3, 1), 50, 16),  # a budget of 100 slots, 3 real boxes: 100 // 6 groups
    ((3, 0), 100, 33),  # the official default: 200 // 6
    ((0, 0), 50, 1),  # no box: one (empty) group, as in the official code
    ((5, 5), 2, 1),  # budget smaller than a group: one group, slots grown to 2 N
])
def test_denoising_groups_follow_real_box_count(counts, num_dn, groups):
  n = 5
  valid = np.arange(n)[None] < np.asarray(counts)[:, None]
  lay = jax.jit(denoising_layout, static_argnums=1)(valid, num_dn)
  assert int(lay.groups) == groups
  assert lay.active.shape == (2, max(2 * num_dn, 2 * n))
  # Each image has, per active group, one positive and one negative query per real box.
  np.testing.assert_array_equal(lay.active.sum(1), 2 * groups * np.asarray(counts))
  act = np.asarray(lay.active)
  for b, c in enumerate(counts):
    for g in range(groups):
      sel = act[b] & (np.asarray(lay.group) == g)
      assert sorted(np.asarray(lay.target)[sel & ~np.asarray(lay.is_neg)]) == list(range(c))
      assert sorted(np.asarray(lay.target)[sel & np.asarray(lay.is_neg)]) == list(range(c))
  assert not act[:, np.asarray(lay.group) >= groups].any()


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=2), st.integers(1, 60))
def test_denoising_layout_properties(counts, num_dn):
  n = 6
  valid = np.arange(n)[None] < np.asarray(counts)[:, None]
  lay = denoising_layout(jnp.asarray(valid), num_dn)
  m = max(counts)
  groups = max(1, num_dn // m) if m else 1
  assert int(lay.groups) == groups
  act = np.asarray(lay.active)
  assert act.sum() == 2 * groups * sum(counts)
  assert act.shape[1] == max(2 * num_dn, 2 * n) >= 2 * max(m, 1) * groups
  tgt = np.asarray(lay.target)
  assert (valid[np.arange(len(counts))[:, None], tgt[None]] | ~act).all()


def test_box_refinement_reads_the_decoder_output_before_the_final_norm():
  cfg = _cfg(num_encoder_layers=0, num_decoder_layers=2)
  head = DINOHead(_CHANS, _K, cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  # Non-trivial final norm and box head, so normed and raw outputs give different boxes.
  head.decoder_norm.scale.value = jnp.asarray(rng.uniform(0.2, 3.0, cfg.hidden_dim), jnp.float32)
  head.decoder_norm.bias.value = jnp.asarray(rng.normal(size=cfg.hidden_dim), jnp.float32)
  last = head.bbox_embed.layers[-1]
  last.kernel.value = jnp.asarray(rng.normal(size=last.kernel.shape) * 0.3, jnp.float32)

  seen = []

  class Spy(nnx.Module):
    def __init__(self, layer):
      self.layer = layer

    def __call__(self, tgt, query_pos, ref, *args):
      out = self.layer(tgt, query_pos, ref, *args)
      seen.append((ref, out))
      return out

  head.decoder = nnx.List([Spy(layer) for layer in head.decoder])
  from tbgc_jax.ops.boxes import inverse_sigmoid

  @jax.jit
  def run(feats, batch):  # one compile instead of many eager ops
    memory, shapes, masks, props, token_mask, ratio = head._encode(feats, batch)
    _, ref_unact = head._select_queries(memory, props, token_mask)
    tgt = head._content_queries(3)
    outputs = head._decode(tgt, ref_unact, memory, shapes, masks, ratio, None)
    (_, out0), (ref1, _) = seen
    scale = jnp.concatenate([ratio[:, ::-1], ratio[:, ::-1]], -1)[:, None, :]
    ref = jax.nn.sigmoid(ref_unact)
    raw = jax.nn.sigmoid(head.bbox_embed(out0) + inverse_sigmoid(ref))
    normed = jax.nn.sigmoid(head.bbox_embed(head.decoder_norm(out0)) + inverse_sigmoid(ref))
    return ref1[:, :, 0] / scale, raw, normed, outputs[1][0]

  ref1, raw, normed, boxes0 = run(_features(rng), _batch())
  assert float(jnp.abs(raw - normed).max()) > 1e-2  # the two rules differ here
  np.testing.assert_allclose(ref1, raw, rtol=1e-5, atol=1e-6)
  # The returned boxes read the normed output (DINO's outputs_coord).
  np.testing.assert_allclose(boxes0, normed, rtol=1e-5, atol=1e-6)


def test_presets():
  from configs import challenge
  from tbgc_jax.tasks.detection import det_config

  det = challenge.get_config().model.det
  assert det.preset == "challenge"
  cfg = det_config(challenge.get_config())  # what build_model makes of the challenge config
  assert (cfg.num_queries, cfg.num_denoising, cfg.num_encoder_layers, cfg.num_decoder_layers,
          cfg.hidden_dim, cfg.num_heads, cfg.num_points) == (900, 100, 6, 6, 256, 8, 4)
  assert (cfg.cost_class, cfg.cost_bbox, cfg.cost_giou) == (2.0, 5.0, 2.0)
  head = nnx.eval_shape(lambda: DINOHead((64, 128, 256, 512), 45, cfg, rngs=nnx.Rngs(0)))
  assert head.num_levels == 4 and cfg.scan_layers
  assert num_layers(head.decoder) == 6 and num_layers(head.encoder) == 6
  assert head.tgt_embed.embedding.shape == (900, 256) and head.class_embed.kernel.shape[1] == 45
  with pytest.raises(ValueError, match="feature_levels"):
    DINOHead((8, 8), 3, PRESETS["tiny"], rngs=nnx.Rngs(0))
