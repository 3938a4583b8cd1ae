"""ArcFace classification head and the top-1 evaluator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from tbgc_jax.metrics.classification import Top1Accuracy, top1_accuracy, top1_counts
from tbgc_jax.models.classification import ClassificationHead, arcface_logits


def _numpy_arcface(cos, labels, margin, scale):
  """Reference by angles: target s*cos(theta + m) while theta + m <= pi, else the reference
  ArcFace fallback s*(cos - m*sin(m)); other classes s*cos."""
  out = scale * cos.astype(np.float64)
  for b, k in enumerate(labels):
    theta = math.acos(float(np.clip(cos[b, k], -1, 1)))
    if theta + margin < math.pi:
      out[b, k] = scale * math.cos(theta + margin)
    else:
      out[b, k] = scale * (cos[b, k] - margin * math.sin(margin))
  return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), margin=st.sampled_from([0.2, 0.4, 0.5]),
       scale=st.sampled_from([30.0, 64.0]))
def test_arcface_margin_only_on_target(seed, margin, scale):
  rng = np.random.default_rng(seed)
  cos = rng.uniform(-1, 1, size=(4, 6)).astype(np.float32)
  labels = rng.integers(0, 6, size=4)
  got = np.asarray(arcface_logits(cos, labels, margin=margin, scale=scale))
  np.testing.assert_allclose(got, _numpy_arcface(cos, labels, margin, scale), rtol=1e-4,
                             atol=1e-3)
  off_target = np.ones_like(got, bool)
  off_target[np.arange(4), labels] = False
  np.testing.assert_array_equal(got[off_target], (scale * cos)[off_target])


def test_arcface_gradients_finite_at_the_poles():
  cos = jnp.array([[1.0, -1.0], [-1.0, 1.0], [1 - 1e-7, 0.0], [-1 + 1e-7, 0.5]])
  labels = jnp.array([0, 0, 0, 0])
  for easy in (False, True):
    f = lambda c, easy=easy: arcface_logits(c, labels, easy_margin=easy).sum()
    grad = jax.jit(jax.grad(f))(cos)
    assert bool(jnp.all(jnp.isfinite(grad))), grad


def _head(num_classes=5, channels=8):
  return ClassificationHead([2, 4, 6, channels], num_classes, margin=0.4, scale=30.0,
                            rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def _features(rng, batch, channels=8):
  return [jnp.zeros((batch, 1, 1, 2))] * 3 + [
      jnp.asarray(rng.normal(size=(batch, 3, 3, channels)), jnp.float32)]


def test_padded_examples_contribute_nothing_and_eval_has_no_margin():
  head = _head()
  rng = np.random.default_rng(0)
  feats = _features(rng, 3)
  batch = {"label": jnp.array([1, 4, 2]), "valid": jnp.array([True, True, False])}

  @nnx.jit
  def run(h, f, b):  # one compile for everything the test looks at
    loss_fn = lambda h, f: h.loss(f, b, jax.random.key(0))
    (loss, aux), grads = nnx.value_and_grad(loss_fn, argnums=1, has_aux=True)(h, f)
    return loss, aux, grads, h.predict(f, b), h.cosine(f, b)

  loss, aux, grads, pred, cos = run(head, feats, batch)
  # The padding example replaced by anything (even an invalid label) changes nothing.
  other = [f.at[2].set(7.0) for f in feats]
  loss2, *_ = run(head, other, {**batch, "label": jnp.array([1, 4, -1])})
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)
  assert float(jnp.abs(grads[-1][2]).max()) == 0.0
  assert float(jnp.abs(grads[-1][:2]).max()) > 0.0
  # Independent loss of the two valid examples from the cosines (numpy ArcFace).
  cos = np.asarray(cos, np.float64)
  logits = _numpy_arcface(cos[:2], [1, 4], 0.4, 30.0)
  ce = np.log(np.exp(logits).sum(-1)) - logits[np.arange(2), [1, 4]]
  np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-4)
  # Evaluation: plain scaled cosines, no margin.
  np.testing.assert_allclose(pred["logits"], 30.0 * cos, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pred["label"], cos.argmax(-1))
  top1 = np.mean(cos[:2].argmax(-1) == [1, 4])
  assert float(aux["cls_top1"]) == pytest.approx(top1)
  # Collapse diagnostics: cosine of the two valid embeddings, mean cosine between centres.
  emb = np.asarray(head.embed(feats, batch), np.float64)
  np.testing.assert_allclose(aux["embedding_cos"], emb[0] @ emb[1], rtol=1e-5, atol=1e-6)
  centers = np.asarray(head.centers[...], np.float64)
  centers /= np.linalg.norm(centers, axis=0)
  gram = centers.T @ centers
  k = gram.shape[0]
  np.testing.assert_allclose(aux["center_cos"], (gram.sum() - np.trace(gram)) / (k * k - k),
                             rtol=1e-5, atol=1e-6)


def test_embedding_is_mlp_plus_shortcut_over_valid_cells():
  head = _head()
  rng = np.random.default_rng(1)
  feats = _features(rng, 2)
  image_mask = np.zeros((2, 6, 6), bool)
  image_mask[0] = True
  image_mask[1, :4, :2] = True  # valid cells of the 3x3 map: rows 0-1, column 0
  emb = np.asarray(nnx.jit(lambda h, f, m: h.embed(f, {"image_mask": m}))(
      head, feats, jnp.asarray(image_mask)))
  last = np.asarray(feats[-1], np.float64)
  pooled = np.stack([last[0].mean((0, 1)), last[1, :2, :1].mean((0, 1))])
  w1, b1 = np.asarray(head.fc1.kernel[...]), np.asarray(head.fc1.bias[...])
  w2, b2 = np.asarray(head.fc2.kernel[...]), np.asarray(head.fc2.bias[...])
  hidden = pooled @ w1 + b1
  hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
  feat = pooled + hidden @ w2 + b2
  np.testing.assert_allclose(emb, feat / np.linalg.norm(feat, axis=-1, keepdims=True),
                             rtol=1e-4, atol=1e-6)


def test_top1_accumulates_over_batches_respecting_valid():
  rng = np.random.default_rng(3)
  pairs, correct, count = [], 0, 0
  for _ in range(3):
    pred, label = rng.integers(0, 3, 7), rng.integers(0, 3, 7)
    valid = rng.uniform(size=7) < 0.7
    pairs.append(({"label": pred}, {"label": label, "valid": valid}))
    correct += sum(int(p == t) for p, t, v in zip(pred, label, valid, strict=True) if v)
    count += int(valid.sum())
  assert top1_accuracy(pairs) == pytest.approx(correct / count)
  assert top1_counts([1, 2], [1, 1]) == (1, 2)
  with pytest.raises(ValueError, match="no valid"):
    Top1Accuracy().result()
  with pytest.raises(ValueError, match="differ"):
    top1_counts([1, 2, 3], [1, 2])
