"""Shows that the tiny DINO head learns: overfits a handful of synthetic digit scenes.

Scenes are drawn on the fly: 8x8 digits from ``sklearn.datasets.load_digits`` scaled up and
pasted on noisy backgrounds (1-3 per image), boxes and labels known exactly. The feature
extractor is a STAND-IN small conv pyramid defined here (strides 4-32), not InternImage.
Trains with optax adamw for a wall-clock budget and reports mAP50 (pycocotools) on the
training scenes.

  python -m benchmarks.det_overfit --seconds 120
"""

import argparse
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from tbgc_jax.metrics.detection import DetectionAccumulator
from tbgc_jax.models.detection import PRESETS, DINOHead


class StandInPyramid(nnx.Module):
  """Stand-in backbone: stride-2 3x3 convs giving NHWC maps at strides 4, 8, 16, 32."""

  def __init__(self, widths=(16, 32, 48, 64), *, rngs: nnx.Rngs):
    self.out_channels = tuple(widths)
    self.stem = nnx.Conv(3, widths[0], (3, 3), strides=2, rngs=rngs)
    chans = (widths[0], *widths)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs)
                           for a, b in zip(chans[:-1], chans[1:], strict=True)])

  def __call__(self, x):
    x = jax.nn.gelu(self.stem(x))
    outs = []
    for conv in self.convs:
      x = jax.nn.gelu(conv(x))
      outs.append(x)
    return outs


def make_scenes(num_images, size, max_boxes, seed):
  """Digits pasted on noisy backgrounds; returns a "det" batch dict of numpy arrays."""
  digits = load_digits()
  rng = np.random.default_rng(seed)
  image = np.zeros((num_images, size, size, 3), np.uint8)
  boxes = np.zeros((num_images, max_boxes, 4), np.float32)
  labels = np.zeros((num_images, max_boxes), np.int32)
  box_mask = np.zeros((num_images, max_boxes), bool)
  for i in range(num_images):
    bg = rng.integers(0, 60, size=3)
    image[i] = np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    placed = []
    for _ in range(int(rng.integers(1, max_boxes))):
      s = int(rng.integers(size // 5, size // 3))
      for _try in range(20):
        x0, y0 = (int(v) for v in rng.integers(0, size - s, 2))
        if all(x0 + s <= a or a + b <= x0 or y0 + s <= c or c + b <= y0
               for a, c, b in placed):
          break
      else:
        continue
      k = int(rng.integers(len(digits.images)))
      patch = cv2.resize((digits.images[k] / 16.0).astype(np.float32), (s, s),
                         interpolation=cv2.INTER_LINEAR)
      colour = rng.integers(150, 256, size=3)
      region = image[i, y0:y0 + s, x0:x0 + s].astype(np.float32)
      image[i, y0:y0 + s, x0:x0 + s] = (region * (1 - patch[..., None])
                                        + colour * patch[..., None]).astype(np.uint8)
      n = len(placed)
      placed.append((x0, y0, s))
      boxes[i, n] = (x0, y0, x0 + s, y0 + s)
      labels[i, n] = digits.target[k]
      box_mask[i, n] = True
  return {
      "image": image, "image_mask": np.ones(image.shape[:3], bool),
      "image_hw": np.full((num_images, 2), size, np.int32),
      "orig_hw": np.full((num_images, 2), size, np.int32),
      "index": np.arange(num_images, dtype=np.int32),
      "image_id": np.arange(1, num_images + 1, dtype=np.int32),
      "valid": np.ones(num_images, bool),
      "boxes": boxes, "labels": labels, "box_mask": box_mask,
  }


class Detector(nnx.Module):
  def __init__(self, num_classes, *, rngs):
    self.backbone = StandInPyramid(rngs=rngs)
    self.head = DINOHead(self.backbone.out_channels, num_classes, PRESETS["tiny"],
                         rngs=rngs)

  def features(self, image):
    mean = jnp.asarray([0.485, 0.456, 0.406]) * 255
    std = jnp.asarray([0.229, 0.224, 0.225]) * 255
    return self.backbone((image.astype(jnp.float32) - mean) / std)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=120.0, help="training wall-clock budget")
  parser.add_argument("--images", type=int, default=8)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  args = parser.parse_args()

  batch = make_scenes(args.images, args.size, max_boxes=4, seed=0)
  model = Detector(10, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(args.lr, weight_decay=1e-4))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch, rng):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, rest)
      return m.head.loss(m.features(batch["image"]), batch, rng)

    (loss, diag), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, diag

  @jax.jit
  def predict(params, batch):
    m = nnx.merge(graphdef, params, rest)
    return m.head.predict(m.features(batch["image"]), batch)

  def evaluate(params):
    acc = DetectionAccumulator(num_classes=10)
    acc.add(batch, jax.device_get(predict(params, batch)))
    return acc.compute()["mAP50"]

  dev_batch = jax.device_put(batch)
  t0 = time.perf_counter()
  params, opt_state, loss, _ = train_step(params, opt_state, dev_batch, jax.random.key(0))
  loss.block_until_ready()
  print(f"compile + first step: {time.perf_counter() - t0:.1f} s, loss {float(loss):.3f}")
  print(f"mAP50 at start: {evaluate(params):.3f} ({int(batch['box_mask'].sum())} boxes, "
        f"{args.images} images of {args.size} px, 10 classes)")
  start, step, next_report = time.perf_counter(), 1, 15.0
  while time.perf_counter() - start < args.seconds:
    params, opt_state, loss, diag = train_step(params, opt_state, dev_batch,
                                               jax.random.fold_in(jax.random.key(0), step))
    step += 1
    if time.perf_counter() - start >= next_report:
      next_report += 15.0
      print(f"{time.perf_counter() - start:6.1f} s  step {step:4d}  loss {float(loss):.3f}  "
            f"ce {float(diag['loss_ce']):.3f}  giou {float(diag['loss_giou']):.3f}  "
            f"mAP50 {evaluate(params):.3f}", flush=True)
  elapsed = time.perf_counter() - start
  print(f"final: {step} steps in {elapsed:.1f} s ({1000 * elapsed / max(step - 1, 1):.0f} ms/step"
        f"), mAP50 {evaluate(params):.3f}")


if __name__ == "__main__":
  main()
