"""Mask2Former head: presets, masked-attention mask, semantic inference, trainable loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.models.segmentation import (
    CHALLENGE_NUM_CLASSES,
    PRESETS,
    Mask2FormerHead,
    attention_mask,
)

_IN = (8, 12, 16, 20)


def _inputs(b=2, hw=32, seed=0):
  rng = np.random.default_rng(seed)
  feats = [jnp.asarray(rng.normal(size=(b, hw // s, hw // s, c)), jnp.float32)
           for s, c in zip((4, 8, 16, 32), _IN, strict=True)]
  label = rng.integers(0, 19, (b, hw, hw)).astype(np.uint8)
  label[:, :, -5:] = 255
  batch = {"image": np.zeros((b, hw, hw, 3), np.uint8), "image_mask": np.ones((b, hw, hw), bool),
           "label": label, "valid": np.array([True, False])[:b]}
  return feats, batch


def test_presets():
  cfg = PRESETS["challenge"]
  assert (cfg.num_queries, cfg.num_decoder_layers, cfg.hidden_dim, cfg.num_encoder_layers,
          CHALLENGE_NUM_CLASSES, cfg.num_points) == (100, 9, 256, 6, 19, 12544)
  assert (cfg.no_object_weight, cfg.class_weight, cfg.mask_weight, cfg.dice_weight) == (
      0.1, 2.0, 5.0, 5.0)
  assert PRESETS["tiny"].num_points == 256
  with pytest.raises(ValueError, match="num_queries"):
    Mask2FormerHead(_IN, 19, dataclasses.replace(cfg, num_queries=10), rngs=nnx.Rngs(0))


def test_attention_mask_matches_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  logits[0, ..., 1] = -1.0  # query 1 of image 0: empty mask
  valid = np.ones((2, 3, 4), bool)
  valid[1, :, 3] = False
  got = np.asarray(attention_mask(jnp.asarray(logits), jnp.asarray(valid)))
  for b in range(2):
    for q in range(5):
      want = (1 / (1 + np.exp(-logits[b, ..., q])) >= 0.5) & valid[b]
      if not want.any():
        want = valid[b]
      np.testing.assert_array_equal(got[b, q], want.reshape(-1))
  assert got[0, 1].all()


@pytest.mark.slow
def test_outputs_and_semantic_inference():
  cfg = PRESETS["tiny"]
  head = Mask2FormerHead(_IN, 19, cfg, rngs=nnx.Rngs(0))
  feats, batch = _inputs()
  # One compile for both (CPU compiles of the head take seconds).
  out, pred = nnx.jit(lambda h, f, b: (h(f, b["image_mask"]), h.predict(f, b, True)))(
      head, feats, batch)
  layers, q, c = cfg.num_decoder_layers + 1, cfg.num_queries, 19
  assert out["class_logits"].shape == (layers, 2, q, c + 1)
  assert out["mask_logits"].shape == (layers, 2, q, 8, 8)
  assert pred["seg"].shape == (2, 32, 32) and pred["seg"].dtype == jnp.int32
  # Independent inference: softmax without no-object, sigmoid of bilinearly upsampled masks.
  cls = np.asarray(out["class_logits"][-1], np.float64)
  prob = np.exp(cls - cls.max(-1, keepdims=True))
  prob = (prob / prob.sum(-1, keepdims=True))[..., :-1]
  up = jax.image.resize(out["mask_logits"][-1], (2, q, 32, 32), "bilinear")
  scores = np.einsum("bqc,bqhw->bhwc", prob, 1 / (1 + np.exp(-np.asarray(up, np.float64))))
  np.testing.assert_allclose(pred["seg_scores"], scores, rtol=1e-4, atol=1e-5)
  agree = (np.asarray(pred["seg"]) == scores.argmax(-1)).mean()
  assert agree > 0.999


@pytest.mark.slow
def test_loss_is_trainable_and_compiles_once():
  # Smallest structure that still has every part on the gradient path (CPU compiles of the
  # backward pass take tens of seconds); MSDeformAttn's gradients have their own tests.
  cfg = dataclasses.replace(PRESETS["tiny"], num_points=32, num_decoder_layers=1,
                            num_encoder_layers=0)
  head = Mask2FormerHead(_IN, 19, cfg, rngs=nnx.Rngs(0))
  # 64x64 input: the stride-32 level is 2x2 (at 1x1 a single key makes cross-attention
  # independent of the query and per-channel GroupNorm outputs its bias: zero gradients).
  feats, batch = _inputs(hw=64)
  graphdef, params = nnx.split(head)
  traces = []

  @jax.jit
  def grad_fn(params, feats, batch, key):
    traces.append(1)
    return jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p).loss(feats, batch, key), has_aux=True)(params)

  (loss, metrics), grads = grad_fn(params, feats, batch, jax.random.key(0))
  assert np.isfinite(float(loss)) and set(metrics) == {
      "loss_ce", "loss_mask", "loss_dice", "loss_aux"}
  flat = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in flat)
  # Gradient reaches the queries, the decoder's cross-attention and both pixel-decoder paths.
  assert np.abs(np.asarray(grads["query_feat"][...])).sum() > 0
  assert np.abs(np.asarray(grads["pixel_decoder"]["lateral"]["conv"]["kernel"][...])).sum() > 0
  for level in (0, 2):  # stride 32 (layer 0's memory) and 8 (FPN); 16 needs an encoder
    assert np.abs(np.asarray(
        grads["pixel_decoder"]["input_proj"][level]["conv"]["kernel"][...])).sum() > 0
  assert np.abs(np.asarray(grads["layers"][0]["cross"]["query"]["kernel"][...])).sum() > 0
  feats2 = [f + 1.0 for f in feats]
  grad_fn(params, feats2, dict(batch, label=batch["label"][::-1]), jax.random.key(1))
  assert len(traces) == 1
