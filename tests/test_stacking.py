"""Stacked, scanned layers: the layout converters, and the heads' ``scan_layers`` against the
unrolled heads (same parameters, same losses and gradients, program size independent of
depth)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.models import stacking
from tbgc_jax.models.detection import dino
from tbgc_jax.models.rngs import construction_rngs
from tbgc_jax.models.segmentation import head as m2f

# --- the generic converters ----------------------------------------------------------------


def _tree():
  return {"levels": {0: {"blocks": {0: {"w": np.zeros((2, 3)), "b": np.zeros(3)},
                                    1: {"w": np.ones((2, 3)), "b": np.ones(3)}},
                         "norm": np.full(3, 7.0)},
                     1: {"blocks": {0: {"w": np.full((2, 3), 2.0), "b": np.full(3, 2.0)}}}},
          "head": {0: np.ones(1)}}


def test_stack_and_unstack_are_exact_inverses_on_the_matched_lists_only():
  patterns = [("levels", None, "blocks")]
  stacked = stacking.stack(_tree(), patterns)
  assert stacked["levels"][0]["blocks"]["w"].shape == (2, 2, 3)
  np.testing.assert_array_equal(stacked["levels"][0]["blocks"]["w"][1], np.ones((2, 3)))
  assert stacked["levels"][1]["blocks"]["b"].shape == (1, 3)
  assert 0 in stacked["head"]  # an int key outside the patterns is left alone
  back = stacking.unstack(stacked, patterns)
  jax.tree.map(np.testing.assert_array_equal, back, _tree())
  assert jax.tree.structure(back) == jax.tree.structure(_tree())
  # Already stacked / not matched: unchanged.
  jax.tree.map(np.testing.assert_array_equal, stacking.stack(stacked, patterns), stacked)
  broken = _tree()
  del broken["levels"][0]["blocks"][1]["b"]
  with pytest.raises(ValueError, match="levels/0/blocks/b: layers \\[0\\], expected 0..1"):
    stacking.stack(broken, patterns)


class _Layer(nnx.Module):
  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    self.lin = nnx.Linear(3, 3, rngs=rngs)
    self.drop = nnx.Dropout(rate, rngs=rngs)

  def __call__(self, x):
    return self.drop(jnp.tanh(self.lin(x)))


def test_stacked_layers_run_like_the_list():
  def build(stacked):
    return stacking.layer_list([_Layer(0.0, rngs=nnx.Rngs(i)) for i in range(4)], stacked)

  listed, stacked = build(False), build(True)
  assert nnx.state(stacked, nnx.Param)["lin"]["kernel"].shape == (4, 3, 3)
  assert not jax.tree.leaves(nnx.state(stacked, nnx.RngState))  # no stream to reseed
  step = lambda layer, x: (layer(x), jnp.sum(x))
  x = jnp.arange(6.0).reshape(2, 3) / 6
  out_l, ys_l = stacking.run(listed, step, x)
  out_s, ys_s = jax.jit(lambda m, x: stacking.run(m, step, x))(stacked, x)
  np.testing.assert_allclose(out_s, out_l, rtol=1e-6)
  np.testing.assert_allclose(ys_s, ys_l, rtol=1e-6)
  assert ys_l.shape == (4,)
  np.testing.assert_array_equal(stacking.layer_at(stacked, 2).lin.kernel[...],
                                listed[2].lin.kernel[...])
  with pytest.raises(ValueError, match="drop: dropout rate 0.5"):
    stacking.layer_list([_Layer(0.5, rngs=nnx.Rngs(0))], True)
  with pytest.raises(ValueError, match="rng streams"):
    stacking.stack_modules([_Layer(0.0, rngs=nnx.Rngs(0))])


# --- DINO -----------------------------------------------------------------------------------

_CHANS = (4, 8, 12, 16)


def _det_cfg(layers=(2, 2), **kw):
  return dataclasses.replace(
      dino.PRESETS["tiny"], feature_levels=(3,), num_extra_levels=1, num_queries=10,
      num_denoising=12, num_select=15, num_encoder_layers=layers[0],
      num_decoder_layers=layers[1], **kw)


def _det_inputs(b=2, size=128):
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(b, size // s, size // s, c)), jnp.float32)
           for s, c in zip((4, 8, 16, 32), _CHANS, strict=True)]
  boxes = np.zeros((b, 3, 4), np.float32)
  boxes[0, :2] = [[10, 20, 60, 90], [70, 40, 120, 110]]
  boxes[1, 0] = [30, 30, 80, 70]
  batch = {"image_mask": np.ones((b, size, size), bool),
           "image_hw": np.array([[128, 128], [100, 120]], np.int32),
           "boxes": boxes, "labels": np.array([[1, 4, 0], [2, 0, 0]], np.int32),
           "box_mask": np.array([[1, 1, 0], [1, 0, 0]], bool)}
  return feats, batch


def _op_count(module, loss_fn) -> int:
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def f(p):
    return loss_fn(nnx.merge(graphdef, p, rest, copy=True))[0]

  text = jax.jit(jax.grad(f)).lower(params).as_text()
  return sum(1 for line in text.splitlines() if " = " in line)


def test_dino_scanned_head_holds_the_stacked_unrolled_parameters():
  unrolled = dino.DINOHead(_CHANS, 5, _det_cfg(), rngs=nnx.Rngs(3))
  scanned = dino.DINOHead(_CHANS, 5, _det_cfg(scan_layers=True), rngs=nnx.Rngs(3))
  want = dino.stack_layers(nnx.state(unrolled, nnx.Param))
  got = nnx.state(scanned, nnx.Param)
  assert got["decoder"]["ffn"]["lin1"]["kernel"].shape == (2, 32, 64)
  jax.tree.map(np.testing.assert_array_equal, want, got)
  # Round trip, and the multi-task layout (heads/det/...).
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)))
  tree = {"backbone": {"w": np.ones(2)}, "heads": {"det": pure}}
  stacked = dino.stack_layers(tree)
  assert stacked["heads"]["det"]["encoder"]["norm"]["scale"].shape == (2, 32)
  jax.tree.map(np.testing.assert_array_equal, dino.unstack_layers(stacked), tree)
  with pytest.raises(ValueError, match="scan_layers=True needs dropout=0"):
    dino.DINOHead(_CHANS, 5, _det_cfg(scan_layers=True, dropout=0.1), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_dino_scanned_head_equals_the_unrolled_head():
  # Same parameters (test above), the same loss and predictions with two encoder and two
  # decoder layers. (The gradients through the scanned decoder: tests/test_dino_head.py.)
  feats, batch = _det_inputs()

  def run(m):
    return m.loss(feats, batch, jax.random.key(1)), m.predict(feats, batch)

  run = jax.jit(run)
  (loss_u, diag_u), pred_u = run(dino.DINOHead(_CHANS, 5, _det_cfg(), rngs=nnx.Rngs(0)))
  (loss_s, diag_s), pred_s = run(dino.DINOHead(_CHANS, 5, _det_cfg(scan_layers=True),
                                               rngs=nnx.Rngs(0)))
  assert np.isfinite(loss_u) and diag_u["loss_aux"] > 0 and diag_u["loss_dn"] > 0
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5), diag_u, diag_s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4),
               pred_u, pred_s)


def test_dino_scanned_program_does_not_grow_with_depth():
  feats, batch = _det_inputs()
  loss = lambda m: m.loss(feats, batch, jax.random.key(1))

  def ops(layers, scan):
    cfg = _det_cfg(layers, scan_layers=scan)
    return _op_count(
        nnx.eval_shape(lambda: dino.DINOHead(_CHANS, 5, cfg, rngs=construction_rngs(0))), loss)

  # (A scan's trip count is a constant of the program, shared with an equal constant: with
  # depth 1 it would reuse an existing 1 and count fewer ops, so the compared depths are >= 2.)
  assert ops((5, 5), True) == ops((2, 2), True)
  assert ops((2, 2), False) > ops((1, 1), False) + 1000  # where unrolled layers add up


# --- Mask2Former ----------------------------------------------------------------------------

_IN = (8, 12, 16, 20)


def _seg_cfg(layers=4, **kw):
  return dataclasses.replace(m2f.PRESETS["tiny"], num_encoder_layers=2,
                             num_decoder_layers=layers, num_points=64, **kw)


def _seg_inputs(b=2, hw=32):
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(b, hw // s, hw // s, c)), jnp.float32)
           for s, c in zip((4, 8, 16, 32), _IN, strict=True)]
  label = rng.integers(0, 5, (b, hw, hw)).astype(np.uint8)
  mask = np.ones((b, hw, hw), bool)
  mask[1, :, 20:] = False
  return feats, {"image": np.zeros((b, hw, hw, 3), np.uint8), "image_mask": mask,
                 "label": label, "valid": np.array([True, True])}


def test_mask2former_scanned_head_holds_the_stacked_unrolled_parameters():
  unrolled = m2f.Mask2FormerHead(_IN, 5, _seg_cfg(), rngs=nnx.Rngs(3))
  scanned = m2f.Mask2FormerHead(_IN, 5, _seg_cfg(scan_layers=True), rngs=nnx.Rngs(3))
  want = m2f.stack_layers(nnx.state(unrolled, nnx.Param))
  got = nnx.state(scanned, nnx.Param)
  assert got["layers"]["ffn"]["fc1"]["kernel"].shape == (4, 32, 64)
  assert got["pixel_decoder"]["layers"]["norm1"]["scale"].shape == (2, 32)
  jax.tree.map(np.testing.assert_array_equal, want, got)
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)))
  tree = {"heads": {"seg": pure, "cls": {"layers": {0: np.ones(1)}}}}
  stacked = m2f.stack_layers(tree)
  assert stacked["heads"]["seg"]["layers"]["norm3"]["bias"].shape == (4, 32)
  assert 0 in stacked["heads"]["cls"]["layers"]  # another task's lists are left alone
  jax.tree.map(np.testing.assert_array_equal, m2f.unstack_layers(stacked), tree)


@pytest.mark.slow
def test_mask2former_scanned_head_equals_the_unrolled_head():
  # Four decoder layers: one scanned group of three, then one layer past it. Same parameters
  # (test above) and the same outputs and loss: the same function of them. (The gradient
  # through scanned layers is checked on DINO, whose decoder carries more across layers.)
  feats, batch = _seg_inputs()

  def run(m):
    return m(feats, batch["image_mask"]), m.loss(feats, batch, jax.random.key(1))[0]

  run = jax.jit(run)
  (out_u, loss_u) = run(m2f.Mask2FormerHead(_IN, 5, _seg_cfg(), rngs=nnx.Rngs(0)))
  (out_s, loss_s) = run(m2f.Mask2FormerHead(_IN, 5, _seg_cfg(scan_layers=True),
                                            rngs=nnx.Rngs(0)))
  assert out_s["mask_logits"].shape == (5, 2, 20, 8, 8)
  assert np.isfinite(loss_u)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5),
               out_u, out_s)


def test_mask2former_scanned_program_does_not_grow_with_depth():
  feats, batch = _seg_inputs()

  def loss(m):  # the layers' part of the program (the loss adds the same ops at any depth)
    out = m(feats, batch["image_mask"])
    return (jnp.sum(out["class_logits"]) + jnp.sum(jnp.sin(out["mask_logits"])),)

  def count(layers, scan, encoder=2):
    cfg = dataclasses.replace(_seg_cfg(layers, scan_layers=scan), num_encoder_layers=encoder)
    # construction_rngs: nnx.Rngs' keys without its tracing cost (docs/performance.md).
    return _op_count(nnx.eval_shape(lambda: m2f.Mask2FormerHead(_IN, 5, cfg,
                                                                rngs=construction_rngs(0))),
                     loss)

  # (A scan's trip count is a constant of the program, shared with an equal constant: the two
  # scans' trip counts differ from each other and from 1 in both programs.)
  assert count(12, True, encoder=6) == count(6, True, encoder=3)
  assert count(4, False, encoder=1) > count(3, False, encoder=1) + 300
