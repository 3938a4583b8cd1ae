"""Shows that the tiny Mask2Former head learns: overfit a few synthetic scenes, report mIoU.

Scenes (drawn here, no downloads): 64x64 images with a "sky" (class 0) over a "road"
(class 1) background, noisy colours, and 2-3 sklearn handwritten digits (0-4 -> classes 2-6)
pasted at 3x scale in random colours, so classes must be told apart by shape; a 4-pixel
ignore band (255) at the bottom edge. The feature extractor is a SMALL CONV PYRAMID STAND-IN
defined here (not InternImage: the backbone lives on another branch), strides 4/8/16/32.
Training: optax adamw, the head's full loss (matching, importance-sampled points, deep
supervision); mIoU on the training scenes (the point is fitting, not generalising).

  python -m benchmarks.seg_overfit --seconds 120
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from tbgc_jax.metrics.segmentation import ConfusionMatrix
from tbgc_jax.models.segmentation import PRESETS, Mask2FormerHead
from tbgc_jax.schema import IGNORE_LABEL


def make_scenes(n: int, size: int = 64, seed: int = 0):
  """``n`` scenes: uint8 images [n, size, size, 3] and uint8 labels (255 = ignore)."""
  rng = np.random.default_rng(seed)
  digits = load_digits()
  pick = np.flatnonzero(digits.target < 5)
  images = np.zeros((n, size, size, 3), np.float32)
  labels = np.zeros((n, size, size), np.uint8)
  for i in range(n):
    horizon = rng.integers(size // 3, 2 * size // 3)
    labels[i, horizon:] = 1
    images[i, :horizon] = [90, 140, 220]
    images[i, horizon:] = [80, 80, 80]
    for _ in range(rng.integers(2, 4)):
      j = rng.choice(pick)
      glyph = np.kron(digits.images[j], np.ones((3, 3))) / 16.0  # 24x24
      y, x = rng.integers(0, size - 24, 2)
      on = glyph > 0.4
      labels[i, y:y + 24, x:x + 24][on] = 2 + digits.target[j]
      images[i, y:y + 24, x:x + 24][on] = rng.uniform(0, 255, 3)
    images[i] += rng.normal(0, 12, images[i].shape)
    labels[i, -4:] = IGNORE_LABEL
  return np.clip(images, 0, 255).astype(np.uint8), labels


class ConvPyramid(nnx.Module):
  """Stand-in backbone: patchify stem (stride 4) then stride-2 conv stages, 4 NHWC maps."""

  def __init__(self, channels=(16, 24, 32, 48), *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, channels[0], (4, 4), strides=4, padding="VALID", rngs=rngs)
    self.stem2 = nnx.Conv(channels[0], channels[0], (3, 3), rngs=rngs)
    self.stages = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs)
                            for a, b in zip(channels[:-1], channels[1:], strict=True)])
    self.out_channels = tuple(channels)

  def __call__(self, x):
    x = jax.nn.gelu(self.stem2(jax.nn.gelu(self.stem(x))))
    outs = [x]
    for stage in self.stages:
      x = jax.nn.gelu(stage(x))
      outs.append(x)
    return outs


def _normalise(image):
  mean = jnp.asarray([0.485, 0.456, 0.406]) * 255
  std = jnp.asarray([0.229, 0.224, 0.225]) * 255
  return (image.astype(jnp.float32) - mean) / std


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seconds", type=float, default=120.0, help="training time budget")
  parser.add_argument("--scenes", type=int, default=8)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--eval-every", type=int, default=25)
  args = parser.parse_args()

  images, labels = make_scenes(args.scenes)
  backbone = ConvPyramid(rngs=nnx.Rngs(0))
  head = Mask2FormerHead(backbone.out_channels, 19, PRESETS["tiny"], rngs=nnx.Rngs(1))
  graphdef, params = nnx.split((backbone, head))
  tx = optax.adamw(args.lr, weight_decay=1e-4)
  opt_state = tx.init(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def loss_fn(params, batch, key):
    bb, hd = nnx.merge(graphdef, params)
    return hd.loss(bb(_normalise(batch["image"])), batch, key)

  @jax.jit
  def step(params, opt_state, batch, key):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, image):
    bb, hd = nnx.merge(graphdef, params)
    return hd.predict(bb(_normalise(image)), {"image": image})["seg"]

  def miou(params):
    acc = ConfusionMatrix(19)
    for s in range(0, args.scenes, args.batch):
      acc.update(np.asarray(predict(params, images[s:s + args.batch])),
                 labels[s:s + args.batch])
    return float(acc.compute()["miou"])

  def batch_at(i):
    idx = (np.arange(args.batch) + i * args.batch) % args.scenes
    return {"image": images[idx], "label": labels[idx], "valid": np.ones(args.batch, bool),
            "image_mask": np.ones(labels[idx].shape, bool)}

  print(f"params: {n_params}, jax {jax.__version__}, {jax.devices()[0].platform}")
  t0 = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, batch_at(0), jax.random.key(0))
  loss.block_until_ready()
  compile_s = time.perf_counter() - t0
  print(f"first step (compile) {compile_s:.1f}s, loss {float(loss):.3f}, mIoU "
        f"{miou(params):.3f}")
  t0 = time.perf_counter()
  i, best = 1, 0.0
  while time.perf_counter() - t0 < args.seconds:
    params, opt_state, loss = step(params, opt_state, batch_at(i), jax.random.key(i))
    i += 1
    if i % args.eval_every == 0:
      m = miou(params)
      best = max(best, m)
      print(f"step {i:5d}  {time.perf_counter() - t0:6.1f}s  loss {float(loss):7.3f}  "
            f"mIoU {m:.3f}", flush=True)
  final = miou(params)
  print(f"RESULT: mIoU {final:.3f} (best {max(best, final):.3f}) on {args.scenes} scenes after "
        f"{i} steps, {time.perf_counter() - t0:.0f}s of training (+{compile_s:.0f}s compile)")


if __name__ == "__main__":
  main()
