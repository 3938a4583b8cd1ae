"""InternImage backbone: shapes and strides, train/eval behaviour, official parameter counts;
the scanned form (``scan_blocks``) against the unrolled one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.compile import stablehlo_ops
from tbgc_jax.models.dcnv3 import depthwise_conv_by_shifts
from tbgc_jax.models.internimage import (
    PRESETS,
    InternImage,
    InternImageConfig,
    InternImageLayer,
    _drop_path,
    count_params,
    stack_blocks,
    unstack_blocks,
)
from tbgc_jax.models.rngs import construction_rngs

# Published sizes of the ImageNet classification models (OpenGVLab/InternImage README,
# "ImageNet-1K and ImageNet-22K Pretrained InternImage Models": #params, rounded to 1M).
_PUBLISHED_M = {"t": 30, "s": 50, "b": 97, "l": 223, "xl": 335}


def _rbg_rngs():
  # RBG keys: initialisers compile much faster on CPU than with threefry (see README).
  return nnx.Rngs(params=jax.random.key(0, impl="rbg"), dropout=jax.random.key(1, impl="rbg"))


def _official_cls_head_params(cfg):
  """Official classification head: conv_head (1x1 conv, no bias, x1.5 channels), BN, fc-1000."""
  features = cfg.channels * 8
  hidden = int(features * 1.5)
  return features * hidden + 2 * hidden + hidden * 1000 + 1000


def _abstract_count(build):
  return count_params(nnx.eval_shape(build))


def _backbone_count(cfg):
  """Parameter count of ``InternImage(cfg)`` from small abstract models.

  A full-depth ``nnx.eval_shape`` of InternImage-XL takes ~20 s (flax 0.12 checks the
  sharding of each traced rng counter, which walks the whole jaxpr: quadratic), so count the
  depth-1 model and add the extra blocks of each level, all abstract (no allocation).
  """
  one = dataclasses.replace(cfg, depths=(1, 1, 1, 1))
  total = _abstract_count(lambda: InternImage(one, rngs=nnx.Rngs(0)))
  for i, depth in enumerate(cfg.depths):
    layer = _abstract_count(lambda i=i: InternImageLayer(
        cfg.channels * 2**i, cfg.groups[i], mlp_ratio=cfg.mlp_ratio,
        layer_scale=cfg.layer_scale, post_norm=cfg.post_norm, rngs=nnx.Rngs(0)))
    total += (depth - 1) * layer
  return total


def test_backbone_count_decomposition_is_exact():
  cfg = dataclasses.replace(PRESETS["tiny"], depths=(2, 1, 3, 2), layer_scale=1e-5)
  assert _backbone_count(cfg) == _abstract_count(lambda: InternImage(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", sorted(_PUBLISHED_M))
def test_official_presets_match_published_parameter_counts(name):
  cfg = PRESETS[name]
  total = _backbone_count(cfg) + _official_cls_head_params(cfg)
  assert round(total / 1e6) == _PUBLISHED_M[name], total


def test_tiny_shapes_and_strides():
  # Abstract model and forward: shapes only, no initialisation or compilation cost.
  model = nnx.eval_shape(lambda: InternImage("tiny", rngs=nnx.Rngs(0)))
  assert model.out_channels == (16, 32, 64, 128)
  x = jax.ShapeDtypeStruct((2, 50, 70, 3), jnp.float32)
  for mode in ("eval", "train"):
    getattr(model, mode)()
    feats = nnx.eval_shape(lambda m, x: m(x), model, x)
    sizes = [(-(-50 // s), -(-70 // s)) for s in (4, 8, 16, 32)]
    assert [f.shape for f in feats] == [(2, h, w, c) for (h, w), c in zip(
        sizes, model.out_channels, strict=True)]


def test_block_drop_path_train_and_eval():
  layer = InternImageLayer(8, 2, layer_scale=0.5, drop_path=0.5, rngs=_rbg_rngs())
  x = jax.random.normal(jax.random.key(0), (16, 3, 3, 8))
  forward = nnx.jit(lambda m, x: m(x))
  layer.eval()
  out_eval = np.asarray(forward(layer, x))
  np.testing.assert_array_equal(out_eval, np.asarray(forward(layer, x)))
  layer.train()
  out1 = np.asarray(forward(layer, x))
  out2 = np.asarray(forward(layer, x))  # the dropout stream advanced
  assert not np.array_equal(out1, out2)
  # Per example, each residual branch is either dropped or scaled by 1 / (1 - 0.5): with
  # both branches dropped the example passes through unchanged.
  identity = np.all(np.isclose(out1, np.asarray(x)), axis=(1, 2, 3))
  changed = ~np.all(np.isclose(out1, out_eval), axis=(1, 2, 3))
  assert identity.any() and changed.all()


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown InternImage preset"):
    InternImage("huge", rngs=nnx.Rngs(0))


# Scanned vs unrolled: a micro backbone (compiles in a few seconds on CPU).
MICRO = InternImageConfig(channels=8, depths=(2, 2, 3, 2), groups=(1, 1, 2, 2), mlp_ratio=1.0,
                          layer_scale=1.0, drop_path_rate=0.3)


def _pair(config=MICRO, rngs=_rbg_rngs):
  unrolled = InternImage(config, rngs=rngs())
  scanned = InternImage(dataclasses.replace(config, scan_blocks=True), rngs=rngs())
  return unrolled, scanned


def _features_and_grads(model, x, key=None):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, x):
    m = nnx.merge(graphdef, params, rest, copy=True)
    if key is not None:
      nnx.reseed(m, default=key, dropout=key)
    feats = m(x)
    return sum(jnp.sum(jnp.sin(f)) for f in feats), feats

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest, x)


def _assert_trees_close(a, b, **tol):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_scanned_model_holds_the_stacked_unrolled_parameters():
  # Same seed, same keys drawn in the same order (nnx.Rngs with or without a dropout stream).
  for rngs in (_rbg_rngs, lambda: nnx.Rngs(3)):
    unrolled, scanned = _pair(rngs=rngs)
    want = stack_blocks(nnx.state(unrolled, nnx.Param))
    got = nnx.state(scanned, nnx.Param)
    assert got["levels"][2]["blocks"]["dcn"]["offset"]["kernel"].shape == (3, 8 * 4, 2 * 9 * 2)
    jax.tree.map(np.testing.assert_array_equal, want, got)


def test_stack_unstack_round_trip_is_exact():
  unrolled, scanned = _pair()
  params = nnx.state(unrolled, nnx.Param)
  back = unstack_blocks(stack_blocks(params))
  flat, flat_back = nnx.to_flat_state(params), nnx.to_flat_state(back)
  assert [p for p, _ in flat] == [p for p, _ in flat_back]
  for (path, a), (_, b) in zip(flat, flat_back, strict=True):
    assert type(a) is type(b), path
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
  # Pure dicts (numpy leaves) and the multi-task layout (backbone/levels/...).
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  stacked = stack_blocks({"backbone": pure, "heads": {"cls": {"w": np.ones(2)}}})
  assert stacked["backbone"]["levels"][2]["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 32, 32)
  assert stacked["heads"]["cls"]["w"].shape == (2,)
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(stacked)["backbone"], pure)
  # Abstract leaves, and the scanned model's own state back to the unrolled one.
  abstract = unstack_blocks(jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                         nnx.to_pure_dict(nnx.state(scanned, nnx.Param))))
  assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, pure)
  with pytest.raises(ValueError, match="every layer must have every leaf"):
    del pure["levels"][1]["blocks"][0]["mlp"]
    stack_blocks(pure)


@pytest.mark.slow
def test_scanned_equals_unrolled_in_eval_features_and_gradients():
  unrolled, scanned = _pair()
  unrolled.eval()
  scanned.eval()
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  (loss_u, feats_u), grads_u = _features_and_grads(unrolled, x)
  (loss_s, feats_s), grads_s = _features_and_grads(scanned, x)
  _assert_trees_close(feats_u, feats_s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss_u, loss_s, rtol=1e-5)
  _assert_trees_close(stack_blocks(grads_u), grads_s, rtol=1e-4, atol=1e-5)


def _forward(model):
  """``key, x -> features`` of ``model`` in its current mode, drop path keyed by ``key``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def forward(params, rest, key, x):
    m = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(m, default=key, dropout=key)
    return m(x)

  forward = jax.jit(forward)
  return lambda key, x: [np.asarray(f) for f in forward(params, rest, key, x)]


def test_scanned_drop_path_is_keyed_by_the_reseed_key():
  _, scanned = _pair()
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  scanned.train()
  run = _forward(scanned)
  a, b, c = run(jax.random.key(1), x), run(jax.random.key(1), x), run(jax.random.key(2), x)
  assert all(np.isfinite(f).all() for f in a)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # same step key, same masks
  assert not np.array_equal(a[2], c[2])  # another step, other masks
  scanned.eval()
  out_eval = _forward(scanned)(jax.random.key(1), x)
  assert not np.array_equal(a[2], out_eval[2])
  # Drop path rate 0 everywhere: training is the eval forward exactly (no rng stream at all).
  no_drop = InternImage(dataclasses.replace(MICRO, drop_path_rate=0.0, scan_blocks=True),
                        rngs=_rbg_rngs())
  assert not nnx.state(no_drop, nnx.RngState)
  no_drop.train()
  train = _forward(no_drop)(jax.random.key(1), x)
  no_drop.eval()
  jax.tree.map(np.testing.assert_array_equal, train, _forward(no_drop)(jax.random.key(1), x))


def test_drop_path_per_example():
  y = jax.random.normal(jax.random.key(0), (64, 2, 2, 3)) + 10.0
  keep = lambda out: ~np.all(np.asarray(out) == 0, axis=(1, 2, 3))
  np.testing.assert_array_equal(_drop_path(y, jnp.float32(0.0), jax.random.key(1)), y)
  out = np.asarray(_drop_path(y, jnp.float32(0.5), jax.random.key(1)))
  kept = keep(out)
  assert 0 < kept.sum() < 64
  np.testing.assert_allclose(out[kept], 2 * np.asarray(y)[kept], rtol=1e-6)


def test_depthwise_conv_by_shifts_matches_the_conv():
  for k in (3, 5):
    conv = nnx.Conv(6, 6, (k, k), padding=(k - 1) // 2, feature_group_count=6,
                    rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 7, 5, 6))
    np.testing.assert_allclose(depthwise_conv_by_shifts(conv, x), conv(x), rtol=1e-5,
                               atol=1e-5)


def test_scanned_construction_with_construction_rngs_is_bit_identical():
  config = dataclasses.replace(MICRO, scan_blocks=True)

  def build(rngs):
    return nnx.split(InternImage(config, rngs=rngs), nnx.Param, ...)[1:]

  data = lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(
      a.dtype, jax.dtypes.prng_key) else a
  # Traced (as the trainer builds) and eager: each against nnx.Rngs in the same mode.
  for run in (jax.jit, lambda f: f):
    want = run(lambda: build(nnx.Rngs(0)))()
    got = run(lambda: build(construction_rngs(0)))()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(data(a), data(b)), want, got)


def _grad_ops(config):
  model = nnx.eval_shape(lambda: InternImage(config, rngs=construction_rngs(0)))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, key, x):
    m = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(m, default=key, dropout=key)
    return sum(jnp.sum(f) for f in m(x))

  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return stablehlo_ops(jax.jit(jax.grad(loss)).lower(params, rest, key, x))


def test_scanned_gradient_size_does_not_grow_with_depth():
  shallow = dataclasses.replace(MICRO, depths=(2, 2, 2, 2))
  deep = dataclasses.replace(MICRO, depths=(2, 2, 6, 2))
  scanned = [_grad_ops(dataclasses.replace(c, scan_blocks=True)) for c in (shallow, deep)]
  unrolled = [_grad_ops(c) for c in (shallow, deep)]
  assert abs(scanned[1] - scanned[0]) <= 0.02 * scanned[0], scanned
  assert unrolled[1] > unrolled[0] + 4 * 500, unrolled  # ~875 ops per unrolled block
