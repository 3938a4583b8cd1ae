"""Multi-task container: per-task forward touches only the backbone and that head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.models.classification import ClassificationHead
from tbgc_jax.models.internimage import InternImage, InternImageConfig
from tbgc_jax.models.multitask import MultiTaskModel, backbone_mask, normalize_images

# One DCNv3 block: compiling InternImage's backward is slow on CPU (see README).
_SMALLEST = InternImageConfig(channels=8, depths=(1, 0, 0, 0), groups=(1, 1, 1, 1),
                              drop_path_rate=0.0)


def _build(backbone_fn):
  rngs = nnx.Rngs(0)
  backbone = backbone_fn(rngs)
  heads = {"cls": ClassificationHead(backbone.out_channels, 5, rngs=rngs),
           "other": ClassificationHead(backbone.out_channels, 3, rngs=rngs)}
  return MultiTaskModel(backbone, heads)


def _random_model(backbone_fn, seed=0):
  """Abstract construction, then random host values: no initialiser compiles (fast tests)."""
  model = nnx.eval_shape(lambda: _build(backbone_fn))
  rng = np.random.default_rng(seed)
  flat = nnx.to_flat_state(nnx.state(model))
  assert all(isinstance(v, nnx.Param) for _, v in flat)  # no rng/batch-stat state here
  nnx.update(model, nnx.from_flat_state([
      (p, v.replace(jnp.asarray(0.3 * rng.normal(size=v.shape), jnp.float32)))
      for p, v in flat]))
  return model


def _loss_and_grads(model, batch):
  @nnx.jit
  def run(m, b):
    return nnx.value_and_grad(
        lambda m: m.task_loss("cls", b, jax.random.key(0)), has_aux=True)(m)
  (loss, _), grads = run(model, batch)
  return loss, grads


def _max_abs(tree):
  return max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.slow
def test_task_loss_touches_only_backbone_and_that_head():
  model = _random_model(lambda rngs: InternImage(_SMALLEST, rngs=rngs))
  batch = {"image": jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)),
                                jnp.uint8),
           "label": jnp.array([1, 3]), "valid": jnp.array([True, True])}
  loss, grads = _loss_and_grads(model, batch)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  assert _max_abs(grads["heads"]["other"]) == 0.0  # exactly: the head was never run
  assert _max_abs(grads["heads"]["cls"]) > 0.0
  dcn = grads["backbone"]["levels"][0]["blocks"][0]["dcn"]
  assert _max_abs(dcn["offset"]) > 0.0 and _max_abs(dcn["mask"]) > 0.0
  assert set(grads.keys()) == {"backbone", "heads"}

  mask = backbone_mask(grads)
  flat_mask = nnx.to_flat_state(mask)
  assert {p for p, v in flat_mask if v.get_value()} == {
      ("backbone", *p) for p, _ in nnx.to_flat_state(nnx.state(model.backbone, nnx.Param))}
  assert all(p[0] == "heads" for p, v in flat_mask if not v.get_value())
  pure = backbone_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert all(pure["backbone"]["patch_embed"]["conv1"].values())
  assert not any(pure["heads"]["cls"]["fc1"].values())


def test_unknown_task_and_normalisation():
  model = nnx.eval_shape(lambda: _build(lambda rngs: InternImage(_SMALLEST, rngs=rngs)))
  with pytest.raises(KeyError, match="no head for task 'det'"):
    model.task_loss("det", {}, jax.random.key(0))
  img = np.array([[[[0, 128, 255]]]], np.uint8)
  want = (img / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(normalize_images(jnp.asarray(img)), want, rtol=1e-5)
