"""Embedded default data: three small datasets built from images shipped inside PyPI packages.

scikit-learn's handwritten digits (8x8, 1,797 samples; ``sklearn.datasets.load_digits``) are
upscaled, coloured and composed onto crops of scikit-image's sample photos
(``skimage.data``). Nothing is downloaded. Generation is deterministic and takes a few
seconds on first use; the result is cached in ``embedded_dir()``:
``$TBGC_DATA_DIR`` if set, else ``~/.cache/tbgc_jax/embedded-v1``.

The datasets are written in the challenge's real on-disk formats and read back with the
real readers (``tbgc_jax.data.readers``):

- ``det/``: COCO JSON ``annotations/instances_{train,val}.json`` + ``images/{split}/*.jpg``;
  192x144 (w x h) scenes with 2-5 digits, 10 classes (the digit).
- ``seg/``: BDD100K layout ``images/10k/{split}/*.jpg`` + ``labels/sem_seg/masks/{split}/
  *.png``; 160x128 scenes, 11 classes (0 background, d+1 for digit d pixels, 255 on the
  anti-aliased stroke border).
- ``cls/``: list files ``{train,val}.txt`` (``<image_name> <class_id>``) + ``images/*.jpg``;
  64x64, 20 fine-grained classes: digit x ink colour variant (two close hues).

Train images use digits 0..1399 of the sklearn set, val images the other 397.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import cv2
import numpy as np

from tbgc_jax.schema import IGNORE_LABEL, TASKS

VERSION = "embedded-v2"
NUM_CLASSES = {"det": 10, "seg": 11, "cls": 20}
SIZES = {"det": {"train": 800, "val": 100}, "seg": {"train": 800, "val": 100},
         "cls": {"train": 2000, "val": 400}}
DET_HW = (144, 192)
SEG_HW = (128, 160)
CLS_HW = (64, 64)
_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
                "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "page")
_TRAIN_DIGITS = 1400
# Two close ink hues per digit for the fine-grained classes (OpenCV hue units, 0..180).
_CLS_HUES = (100.0, 118.0)


def embedded_dir() -> str:
  """Cache folder of the embedded data: ``$TBGC_DATA_DIR`` or ``~/.cache/tbgc_jax/<ver>``."""
  env = os.environ.get("TBGC_DATA_DIR")
  if env:
    return env
  return os.path.join(os.path.expanduser("~"), ".cache", "tbgc_jax", VERSION)


def _load_backgrounds() -> list[np.ndarray]:
  import skimage.data

  out = []
  for name in _BACKGROUNDS:
    im = np.asarray(getattr(skimage.data, name)())
    if im.dtype == bool:
      im = im.astype(np.uint8) * 255
    if im.ndim == 2:
      im = np.repeat(im[..., None], 3, axis=-1)
    out.append(np.ascontiguousarray(im[..., :3].astype(np.uint8)))
  return out


def _background(rng: np.random.Generator, bgs: list[np.ndarray], hw: tuple[int, int]
                ) -> np.ndarray:
  bg = bgs[int(rng.integers(len(bgs)))]
  h, w = hw
  H, W = bg.shape[:2]
  s = rng.uniform(max(h / H, w / W), max(h / H, w / W) * 3)
  ch, cw = min(H, int(np.ceil(h / s))), min(W, int(np.ceil(w / s)))
  y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
  crop = cv2.resize(bg[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
  # Dim and flatten the photo so digits stand out but the background still varies.
  return (crop.astype(np.float32) * 0.6).astype(np.uint8)


def _digit_alpha(digit: np.ndarray, size: int) -> np.ndarray:
  """Upscales an 8x8 sklearn digit (0..16) to a [0,1] alpha map of ``size`` x ``size``."""
  a = cv2.resize((digit / 16.0).astype(np.float32), (size, size),
                 interpolation=cv2.INTER_CUBIC)
  return np.clip(a, 0.0, 1.0)


def _ink(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
  h = rng.uniform(0, 180) if hue is None else hue + rng.uniform(-4, 4)
  hsv = np.uint8([[[int(h) % 180, int(rng.uniform(170, 255)), int(rng.uniform(210, 255))]]])
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _compose(img: np.ndarray, alpha: np.ndarray, x: int, y: int, color: np.ndarray) -> None:
  s = alpha.shape[0]
  region = img[y:y + s, x:x + s].astype(np.float32)
  a = alpha[..., None]
  img[y:y + s, x:x + s] = (region * (1 - a) + color * a).astype(np.uint8)


def _place(rng, hw, size, placed, tries=30):
  """Picks a top-left for a size x size square overlapping earlier ones by < 10% IoU."""
  h, w = hw
  for _ in range(tries):
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    ok = True
    for px, py, ps in placed:
      ix = max(0, min(x + size, px + ps) - max(x, px))
      iy = max(0, min(y + size, py + ps) - max(y, py))
      inter = ix * iy
      if inter / (size * size + ps * ps - inter) > 0.1:
        ok = False
        break
    if ok:
      return x, y
  return None


def _digit_pool(split: str, images: np.ndarray, targets: np.ndarray):
  idx = np.arange(_TRAIN_DIGITS) if split == "train" else np.arange(_TRAIN_DIGITS, len(images))
  return images[idx], targets[idx]


def _paste_digits(img, rng, digits, hw, count, size_range):
  """Pastes a random number of digits onto ``img``; yields ``(x, y, digit_index, alpha)``."""
  placed = []
  for _ in range(int(rng.integers(*count))):
    size = int(rng.integers(*size_range))
    pos = _place(rng, hw, size, placed)
    if pos is None:
      continue
    placed.append((*pos, size))
    k = int(rng.integers(len(digits)))
    alpha = _digit_alpha(digits[k], size)
    _compose(img, alpha, pos[0], pos[1], _ink(rng))
    yield pos[0], pos[1], k, alpha


def _write_det(root: str, split: str, n: int, rng, bgs, digits, targets) -> None:
  os.makedirs(os.path.join(root, "det", "images", split), exist_ok=True)
  os.makedirs(os.path.join(root, "det", "annotations"), exist_ok=True)
  images, anns = [], []
  for i in range(n):
    img = _background(rng, bgs, DET_HW)
    for x, y, k, alpha in _paste_digits(img, rng, digits, DET_HW, (2, 6), (20, 45)):
      ys, xs = np.nonzero(alpha > 0.25)
      x0, y0 = x + xs.min(), y + ys.min()
      bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(targets[k]) + 1,
                   "bbox": [float(x0), float(y0), float(bw), float(bh)],
                   "area": float(bw * bh), "iscrowd": 0})
    name = f"{split}_{i:05d}.jpg"
    cv2.imwrite(os.path.join(root, "det", "images", split, name),
                cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    images.append({"id": i + 1, "file_name": name, "height": DET_HW[0], "width": DET_HW[1]})
  cats = [{"id": d + 1, "name": f"digit_{d}"} for d in range(10)]
  with open(os.path.join(root, "det", "annotations", f"instances_{split}.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def _write_seg(root: str, split: str, n: int, rng, bgs, digits, targets) -> None:
  idir = os.path.join(root, "seg", "images", "10k", split)
  mdir = os.path.join(root, "seg", "labels", "sem_seg", "masks", split)
  os.makedirs(idir, exist_ok=True)
  os.makedirs(mdir, exist_ok=True)
  for i in range(n):
    img = _background(rng, bgs, SEG_HW)
    lab = np.zeros(SEG_HW, np.uint8)
    for x, y, k, alpha in _paste_digits(img, rng, digits, SEG_HW, (2, 5), (28, 57)):
      size = alpha.shape[0]
      region = lab[y:y + size, x:x + size]
      region[alpha > 0.15] = IGNORE_LABEL
      region[alpha > 0.5] = int(targets[k]) + 1
    name = f"{split}_{i:05d}"
    cv2.imwrite(os.path.join(idir, name + ".jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 92])
    cv2.imwrite(os.path.join(mdir, name + ".png"), lab)


def _write_cls(root: str, split: str, n: int, rng, bgs, digits, targets) -> None:
  idir = os.path.join(root, "cls", "images")
  os.makedirs(idir, exist_ok=True)
  lines = []
  for i in range(n):
    label = i % NUM_CLASSES["cls"]  # balanced classes
    digit, variant = divmod(label, 2)
    pool = np.nonzero(targets == digit)[0]
    k = int(pool[rng.integers(len(pool))])
    img = _background(rng, bgs, CLS_HW)
    size = int(rng.integers(36, 57))
    x, y = int(rng.integers(0, CLS_HW[1] - size + 1)), int(rng.integers(0, CLS_HW[0] - size + 1))
    _compose(img, _digit_alpha(digits[k], size), x, y, _ink(rng, _CLS_HUES[variant]))
    name = f"{split}_{i:05d}.jpg"
    cv2.imwrite(os.path.join(idir, name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95])
    lines.append(f"{name} {label}\n")
  with open(os.path.join(root, "cls", f"{split}.txt"), "w") as f:
    f.writelines(lines)


def generate(root: str, tasks: tuple[str, ...] = TASKS) -> None:
  """Writes the embedded datasets of ``tasks`` under ``root`` (deterministic per task)."""
  from sklearn.datasets import load_digits

  d = load_digits()
  bgs = _load_backgrounds()
  writers = {"det": _write_det, "seg": _write_seg, "cls": _write_cls}
  for ti, task in enumerate(TASKS):
    if task not in tasks:
      continue
    for si, split in enumerate(("train", "val")):
      digits, targets = _digit_pool(split, d.images, d.target)
      rng = np.random.default_rng([20230623, ti, si])
      writers[task](root, split, SIZES[task][split], rng, bgs, digits, targets)


def ensure_embedded(root: str | None = None) -> str:
  """Returns the embedded data folder, generating it first if missing (safe across processes:
  one process generates under a file lock, the others wait; the result appears atomically).

  Args:
    root: folder to use (default ``embedded_dir()``).
  """
  import fcntl

  root = root or embedded_dir()
  if os.path.isfile(os.path.join(root, "DONE")):
    return root
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  with open(os.path.abspath(root) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.isfile(os.path.join(root, "DONE")):
      return root
    tmp = tempfile.mkdtemp(prefix=".embedded-tmp-", dir=parent)
    try:
      generate(tmp)
      with open(os.path.join(tmp, "DONE"), "w") as f:
        f.write(VERSION + "\n")
      if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
      if os.path.exists(root):  # never delete a user's folder
        raise FileExistsError(f"{root}: exists without a DONE marker; remove it or point "
                              "TBGC_DATA_DIR at an empty or new folder")
      os.rename(tmp, root)
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
  return root


def reader_args(task: str, split: str, root: str | None = None) -> dict[str, str]:
  """Where the embedded files of (task, split) lie, as keyword arguments of the real reader."""
  root = ensure_embedded(root)
  if task == "det":
    return {"ann_file": os.path.join(root, "det", "annotations", f"instances_{split}.json"),
            "image_dir": os.path.join(root, "det", "images", split)}
  if task == "seg":
    return {"root": os.path.join(root, "seg"), "split": split}
  if task == "cls":
    return {"list_file": os.path.join(root, "cls", f"{split}.txt"),
            "image_dir": os.path.join(root, "cls", "images")}
  raise ValueError(f"task must be one of {TASKS}, got {task!r}")
