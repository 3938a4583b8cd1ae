"""Writers of tiny datasets in the challenge's real on-disk formats, for tests.

- `write_coco`: COCO detection (how the challenge ships TT100K): ``annotations/instances_
  {split}.json`` + ``images/{split}/``, with the caller's category and image ids.
- `write_tt100k`: TT100K's own ``annotations.json`` layout.
- `write_bdd100k_seg`: BDD100K semantic segmentation (``images/10k/{split}/*.jpg``,
  ``labels/sem_seg/masks/{split}/*.png``).
- `write_cls_list`: the classification list file ``{split}.txt`` (``<image_name> <class_id>``)
  + ``images/``.

Images are random noise with each box's region filled by a flat colour (so a detector has
something to see); sizes are the caller's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import cv2
import numpy as np


def write_image(path: str, hw: Sequence[int], seed: int = 0,
                boxes_xywh: Sequence[Sequence[float]] = ()) -> None:
  """Writes a ``hw`` JPEG (PNG if the name ends in .png) of noise with filled boxes."""
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 256, (int(hw[0]), int(hw[1]), 3), dtype=np.uint8)
  for x, y, w, h in boxes_xywh:
    img[int(y):int(y + h), int(x):int(x + w)] = rng.integers(0, 256, 3, dtype=np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not cv2.imwrite(path, img):
    raise OSError(f"could not write {path}")


def write_coco(root: str, split: str, images: Sequence[dict],
               categories: Sequence[tuple[int, str]]) -> str:
  """Writes a COCO detection split; returns the annotation file's path.

  Args:
    root: dataset folder (``annotations/instances_{split}.json``, ``images/{split}/``).
    split: "train" or "val".
    images: ``{"id", "file_name", "hw": (h, w), "anns": [(category_id, [x, y, w, h],
      iscrowd), ...]}`` per image.
    categories: ``(id, name)`` pairs, any ids.
  """
  out_images, anns = [], []
  for n, im in enumerate(images):
    h, w = im["hw"]
    boxes = [b for _, b, _ in im["anns"]]
    write_image(os.path.join(root, "images", split, im["file_name"]), (h, w), seed=n,
                boxes_xywh=boxes)
    out_images.append({"id": im["id"], "file_name": im["file_name"], "height": h, "width": w})
    for cat, box, crowd in im["anns"]:
      anns.append({"id": 100 + len(anns), "image_id": im["id"], "category_id": cat,
                   "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                   "iscrowd": int(crowd)})
  path = os.path.join(root, "annotations", f"instances_{split}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"images": out_images, "annotations": anns,
               "categories": [{"id": c, "name": name} for c, name in categories]}, f)
  return path


def write_tt100k(root: str, images: Sequence[dict], types: Sequence[str]) -> str:
  """Writes TT100K's ``annotations.json`` layout; returns its path.

  Args:
    root: dataset folder.
    images: ``{"id", "path": "train/1.jpg", "hw": (h, w), "objects": [(name, [x0, y0, x1,
      y1]), ...]}`` per image.
    types: the category names.
  """
  imgs = {}
  for n, im in enumerate(images):
    boxes = [(x0, y0, x1 - x0, y1 - y0) for _, (x0, y0, x1, y1) in im["objects"]]
    write_image(os.path.join(root, im["path"]), im["hw"], seed=n, boxes_xywh=boxes)
    imgs[str(im["id"])] = {"id": im["id"], "path": im["path"], "objects": [
        {"category": name, "bbox": dict(zip(("xmin", "ymin", "xmax", "ymax"), map(float, b),
                                            strict=True))}
        for name, b in im["objects"]]}
  path = os.path.join(root, "annotations.json")
  with open(path, "w") as f:
    json.dump({"types": list(types), "imgs": imgs}, f)
  return path


def write_bdd100k_seg(root: str, split: str, labels: dict[str, np.ndarray]) -> None:
  """Writes BDD100K semantic segmentation: one JPEG and one uint8 label PNG per name."""
  for n, (name, label) in enumerate(sorted(labels.items())):
    label = np.asarray(label, np.uint8)
    write_image(os.path.join(root, "images", "10k", split, f"{name}.jpg"), label.shape, seed=n)
    mask = os.path.join(root, "labels", "sem_seg", "masks", split, f"{name}.png")
    os.makedirs(os.path.dirname(mask), exist_ok=True)
    if not cv2.imwrite(mask, label):
      raise OSError(f"could not write {mask}")


def write_cls_list(root: str, split: str, items: Sequence[tuple[str, int]],
                   hw: Sequence[int] = (24, 32)) -> str:
  """Writes ``{root}/{split}.txt`` (``<image_name> <class_id>`` lines) and the images."""
  for n, (name, _) in enumerate(items):
    write_image(os.path.join(root, "images", name), hw, seed=n)
  path = os.path.join(root, f"{split}.txt")
  with open(path, "w") as f:
    f.writelines(f"{name} {cid}\n" for name, cid in items)
  return path


def label_with_halves(hw: Sequence[int], thin_row: int | None = None) -> np.ndarray:
  """Label map: class 0 on the left half, 1 on the right, and optionally class 2 on one
  1-pixel row of the left half (a class thinner than a downsampled pixel)."""
  h, w = int(hw[0]), int(hw[1])
  label = np.zeros((h, w), np.uint8)
  label[:, w // 2:] = 1
  if thin_row is not None:
    label[thin_row, : w // 2] = 2
  return label
