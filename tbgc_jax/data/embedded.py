"""Embedded default data: small datasets built from images shipped inside PyPI packages.

scikit-learn's handwritten digits (8x8, 1,797 samples; ``sklearn.datasets.load_digits``) are
upscaled, coloured and composed onto crops of scikit-image's sample photos
(``skimage.data``). Nothing is downloaded. Generation is deterministic and takes a few
seconds on first use; the result is cached in ``embedded_dir()``:
``$TBGC_DATA_DIR`` if set, else ``~/.cache/tbgc_jax/embedded-v3``.

Each task writes its own under ``<root>/<task>`` (``DataSpec.write_embedded``, in
``tbgc_jax.tasks``) with the drawing helpers below, in the challenge's real on-disk formats,
read back with the real readers (``tbgc_jax.data.readers``); the source format
``"embedded"`` reads it. The built-in tasks' data:

- ``det/``: COCO JSON ``annotations/instances_{train,val}.json`` + ``images/{split}/*.jpg``;
  192x144 (w x h) scenes with 2-5 digits, 10 classes (the digit).
- ``seg/``: BDD100K layout ``images/10k/{split}/*.jpg`` + ``labels/sem_seg/masks/{split}/
  *.png``; 160x128 scenes, 5 classes (0 background, c+1 for the strokes of a digit inked in
  hue family c of four, 255 on the anti-aliased stroke border).
- ``cls/``: list files ``{train,val}.txt`` (``<image_name> <class_id>``) + ``images/*.jpg``;
  64x64, 20 fine-grained classes: digit x ink colour variant (two close hues).

Train images use digits 0..1399 of the sklearn set, val images the other 397.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from tbgc_jax.data.formats import ReadContext, get_reader, register_reader
from tbgc_jax.data.spec import DataSpec, EmbeddedPool

VERSION = "embedded-v3"
_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
                "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "page")
_TRAIN_DIGITS = 1400


def embedded_dir() -> str:
  """Cache folder of the embedded data: ``$TBGC_DATA_DIR`` or ``~/.cache/tbgc_jax/<ver>``."""
  env = os.environ.get("TBGC_DATA_DIR")
  if env:
    return env
  return os.path.join(os.path.expanduser("~"), ".cache", "tbgc_jax", VERSION)


def load_backgrounds() -> list[np.ndarray]:
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


def background(rng: np.random.Generator, bgs: list[np.ndarray], hw: tuple[int, int]
               ) -> np.ndarray:
  """A dimmed random crop of one of the photos ``bgs``, resized to ``hw``."""
  bg = bgs[int(rng.integers(len(bgs)))]
  h, w = hw
  H, W = bg.shape[:2]
  s = rng.uniform(max(h / H, w / W), max(h / H, w / W) * 3)
  ch, cw = min(H, int(np.ceil(h / s))), min(W, int(np.ceil(w / s)))
  y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
  crop = cv2.resize(bg[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
  # Dim and flatten the photo so digits stand out but the background still varies.
  return (crop.astype(np.float32) * 0.6).astype(np.uint8)


def digit_alpha(digit: np.ndarray, size: int) -> np.ndarray:
  """Upscales an 8x8 sklearn digit (0..16) to a [0,1] alpha map of ``size`` x ``size``."""
  a = cv2.resize((digit / 16.0).astype(np.float32), (size, size),
                 interpolation=cv2.INTER_CUBIC)
  return np.clip(a, 0.0, 1.0)


def ink(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
  """A saturated, bright RGB colour of a random hue (or ``hue`` +- 4)."""
  h = rng.uniform(0, 180) if hue is None else hue + rng.uniform(-4, 4)
  hsv = np.uint8([[[int(h) % 180, int(rng.uniform(170, 255)), int(rng.uniform(210, 255))]]])
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def compose(img: np.ndarray, alpha: np.ndarray, x: int, y: int, color: np.ndarray) -> None:
  """Blends ``color`` into ``img`` with ``alpha`` (square) at top-left (x, y), in place."""
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


def paste_digits(img, rng, digits, hw, count, size_range, hues: Sequence[float] = ()):
  """Pastes a random number of digits onto ``img``.

  Yields ``(x, y, digit_index, alpha, hue_index)``: each digit's ink has a random hue, or
  ``hues[hue_index]`` (+- 4) with ``hue_index`` uniform when ``hues`` is given (else -1).
  """
  placed = []
  for _ in range(int(rng.integers(*count))):
    size = int(rng.integers(*size_range))
    pos = _place(rng, hw, size, placed)
    if pos is None:
      continue
    placed.append((*pos, size))
    k = int(rng.integers(len(digits)))
    alpha = digit_alpha(digits[k], size)
    hue_index = int(rng.integers(len(hues))) if hues else -1
    compose(img, alpha, pos[0], pos[1], ink(rng, hues[hue_index] if hues else None))
    yield pos[0], pos[1], k, alpha, hue_index


def _required(specs: Sequence[DataSpec]) -> list[DataSpec]:
  """The specs whose data ``specs`` read (`DataSpec.embedded_requires`), each once."""
  out: dict[str, DataSpec] = {}
  for spec in specs:
    for s in spec.embedded_requires():
      out.setdefault(s.name, s)
  return list(out.values())


def generate(root: str, specs: Sequence[DataSpec]) -> None:
  """Writes the embedded data of ``specs`` under ``root`` (deterministic per task).

  Each task's ``DataSpec.write_embedded`` draws from its own stream
  (``[20230623, spec.stream, split]``), so a subset of tasks writes the same files.
  """
  from sklearn.datasets import load_digits

  d = load_digits()
  bgs = load_backgrounds()
  for spec in specs:
    for si, split in enumerate(("train", "val")):
      digits, targets = _digit_pool(split, d.images, d.target)
      rng = np.random.default_rng([20230623, spec.stream, si])
      spec.write_embedded(root, split, rng, EmbeddedPool(bgs, digits, targets))


def _once(lock_path: str, done: Callable[[], bool], build: Callable[[], None]) -> None:
  """Runs ``build`` unless ``done()``, under an exclusive file lock (process-safe)."""
  import fcntl

  if done():
    return
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done():
      build()


def ensure_embedded(root: str | None = None, specs: Sequence[DataSpec] = ()) -> str:
  """Returns the embedded data folder, first generating the data ``specs`` read (their
  ``embedded_requires``) where missing: ``root/<task>`` per task, written in a temporary
  folder and renamed into place (safe across processes: one generates under a file lock, the
  others wait).

  Args:
    root: folder to use (default ``embedded_dir()``).
    specs: the data specs of the tasks whose embedded data must be there.
  """
  root = root or embedded_dir()
  os.makedirs(root, exist_ok=True)
  needed = _required(specs)
  missing = lambda: [s for s in needed if not os.path.isdir(os.path.join(root, s.name))]

  def build():
    tmp = tempfile.mkdtemp(prefix=".embedded-tmp-", dir=root)
    try:
      todo = missing()
      generate(tmp, todo)
      for spec in todo:
        os.rename(os.path.join(tmp, spec.name), os.path.join(root, spec.name))
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  _once(os.path.join(root, ".lock"), lambda: not missing(), build)
  return root


def reader_args(spec: DataSpec, split: str, root: str | None = None) -> dict[str, Any]:
  """Where the embedded files of (task, split) lie, as keyword arguments of the task's
  reader (``DataSpec.embedded_format``), generating them first if missing."""
  return spec.embedded_reader_args(ensure_embedded(root, (spec,)), split)


def _read_embedded(kwargs: Mapping[str, Any], ctx: ReadContext) -> Any:
  """The ``embedded`` format: the task's embedded data, read with its ``embedded_format``."""
  del kwargs
  spec = ctx.spec
  if not spec.embedded_format:
    raise ValueError(f"task {spec.name!r} has no embedded data (DataSpec.embedded_format)")
  args = reader_args(spec, ctx.split, ctx.source.get("root", None) or None)
  return get_reader(spec.embedded_format)(args, ctx)


register_reader("embedded", _read_embedded)
