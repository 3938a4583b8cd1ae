"""The embedded three-task data (`tbgc_jax.data.embedded`) as small in-memory arrays.

Each task keeps its own images, read with the project's readers and downscaled 4x:

- ``cls``: the 64x64 images at 16x16, 20 classes; metric top-1 accuracy.
- ``seg``: 32x40 scenes, label maps downscaled by nearest neighbour (5 classes, 255 =
  ignore); metric mIoU over the classes present (`tbgc_jax.metrics.segmentation`).
- ``det``: 36x48 scenes. The box head of the real model is too slow for this benchmark,
  so detection is replaced by a box-free stand-in on the same scenes: which of the 10 digit
  classes appear (multi-label); metric mean average precision over classes.
"""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.problem import Problem
from tbgc_jax.data import embedded, readers
from tbgc_jax.schema import IGNORE_LABEL
from tbgc_jax.tasks import get_task

TASKS = ("cls", "det", "seg")
NUM_CLASSES = {"cls": 20, "det": 10, "seg": 5}
_SCALE = 4


def _image(path: str) -> np.ndarray:
  im = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  h, w = im.shape[:2]
  im = cv2.resize(im, (w // _SCALE, h // _SCALE), interpolation=cv2.INTER_AREA)
  return im.astype(np.float32) / 255.0


def load(split: str, root: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{task: (images f32[N, H, W, 3] in [0, 1], targets)}`` for ``split`` ("train"/"val").

  Targets: ``cls`` i32[N]; ``det`` f32[N, 10] (1 where the digit appears); ``seg``
  i32[N, H, W].
  """
  out = {}
  recs = readers.read_cls_list(**embedded.reader_args(get_task("cls").data, split, root),
                               num_classes=NUM_CLASSES["cls"])
  out["cls"] = (np.stack([_image(r.image_path) for r in recs]),
                np.array([r.label for r in recs], np.int32))
  recs, _ = readers.read_coco(**embedded.reader_args(get_task("det").data, split, root))
  present = np.zeros((len(recs), NUM_CLASSES["det"]), np.float32)
  for i, r in enumerate(recs):
    present[i, r.labels] = 1.0
  out["det"] = (np.stack([_image(r.image_path) for r in recs]), present)
  recs = readers.read_bdd100k_seg(**embedded.reader_args(get_task("seg").data, split, root),
                                  num_classes=NUM_CLASSES["seg"])
  images = np.stack([_image(r.image_path) for r in recs])
  h, w = images.shape[1:3]
  labels = np.stack([
      cv2.resize(cv2.imread(r.label_path, cv2.IMREAD_UNCHANGED), (w, h),
                 interpolation=cv2.INTER_NEAREST) for r in recs]).astype(np.int32)
  out["seg"] = (images, labels)
  return out


def _conv_init(key, k, c_in, c_out):
  return {"w": jax.nn.initializers.he_normal()(key, (k, k, c_in, c_out)), "b": jnp.zeros(c_out)}


def _conv(p, x, stride):
  y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["b"]


def _dense_init(key, n_in, n_out):
  return {"w": jax.nn.initializers.lecun_normal()(key, (n_in, n_out)), "b": jnp.zeros(n_out)}


_STRIDES = (2, 2, 1)
_WIDTHS = (16, 32, 32)


def problem(batch_size: int = 32, root: str | None = None):
  """The three embedded tasks as a `benchmarks.compare.Problem`: a small CNN.

  Model: a shared 3-layer CNN backbone (3x3 convs, widths 16-32-32, strides 2-2-1, ReLU)
  and per task one small head: ``cls`` global average pool + linear (softmax
  cross-entropy); ``det`` global max pool + linear (sigmoid cross-entropy per class);
  ``seg`` a 1x1 conv at stride 4, bilinearly upsampled (cross-entropy, 255 ignored). Every
  task samples ``batch_size`` of its own training images per step; metrics are scored on
  the val split after the last step (higher is better).
  """
  from sklearn.metrics import average_precision_score

  from tbgc_jax.metrics.segmentation import confusion_matrix, iou_from_confusion

  train = {t: tuple(jnp.asarray(a) for a in v) for t, v in load("train", root).items()}
  val = load("val", root)

  def init(key):
    keys = jax.random.split(key, len(_WIDTHS) + len(TASKS))
    c_in, backbone = 3, {}
    for i, c in enumerate(_WIDTHS):
      backbone[f"conv{i}"] = _conv_init(keys[i], 3, c_in, c)
      c_in = c
    heads = {"cls": _dense_init(keys[-3], c_in, NUM_CLASSES["cls"]),
             "det": _dense_init(keys[-2], c_in, NUM_CLASSES["det"]),
             "seg": _conv_init(keys[-1], 1, c_in, NUM_CLASSES["seg"])}
    return {"backbone": backbone, "heads": heads}

  def features(params, images):
    h = images
    for i, s in enumerate(_STRIDES):
      h = jax.nn.relu(_conv(params["backbone"][f"conv{i}"], h, s))
    return h

  def outputs(params, task, images):
    h = features(params, images)
    p = params["heads"][task]
    if task == "cls":
      return jnp.mean(h, axis=(1, 2)) @ p["w"] + p["b"]
    if task == "det":
      return jnp.max(h, axis=(1, 2)) @ p["w"] + p["b"]
    logits = _conv(p, h, 1)
    n, hh, ww, c = images.shape[0], images.shape[1], images.shape[2], logits.shape[-1]
    return jax.image.resize(logits, (n, hh, ww, c), "bilinear")

  def loss_fn(task):
    def fn(params, batch):
      images, targets = batch
      logits = outputs(params, task, images)
      if task == "cls":
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
      if task == "det":
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
      keep = targets != IGNORE_LABEL
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, targets, 0))
      return jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
    return fn

  def sample(key, tasks):
    keys = jax.random.split(key, len(TASKS))
    out = {}
    for k, t in enumerate(TASKS):
      if t in tasks:
        i = jax.random.randint(keys[k], (batch_size,), 0, train[t][0].shape[0])
        out[t] = (train[t][0][i], train[t][1][i])
    return out

  predict = jax.jit(outputs, static_argnums=1)

  def evaluate(params):
    cls_x, cls_y = val["cls"]
    acc = float(np.mean(np.argmax(predict(params, "cls", cls_x), -1) == cls_y))
    det_x, det_y = val["det"]
    scores = np.asarray(predict(params, "det", det_x))
    present = [c for c in range(det_y.shape[1]) if 0 < det_y[:, c].sum() < len(det_y)]
    ap = float(np.mean([average_precision_score(det_y[:, c], scores[:, c]) for c in present]))
    seg_x, seg_y = val["seg"]
    pred = np.argmax(np.asarray(predict(params, "seg", seg_x)), -1)
    conf = confusion_matrix(pred, seg_y, num_classes=NUM_CLASSES["seg"])
    miou = float(iou_from_confusion(np.asarray(conf))["miou"])
    return {"cls": acc, "det": ap, "seg": miou}

  return Problem(
      name="embedded3", tasks=TASKS, higher_better={t: True for t in TASKS}, init=init,
      loss_fns={t: loss_fn(t) for t in TASKS}, sample=sample, evaluate=evaluate,
      steps_per_epoch=max(1, min(len(v[0]) for v in train.values()) // batch_size),
      config={"batch_size": batch_size, "scale": _SCALE, "data": embedded.VERSION})
