"""InternImage backbone: shapes and strides, train/eval behaviour, official parameter counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.models.internimage import PRESETS, InternImage, InternImageLayer, count_params

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
