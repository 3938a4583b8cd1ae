r"""Writes PNG grids of what the model is fed, per task and per augmentation branch.

Usage:
  python -m tbgc_jax.data.preview --config path/to/config.py --out DIR [--num 8] [--seed 0]

The config file's ``get_config()`` returns a ``ConfigDict`` with a ``data`` section
(``tbgc_jax.data.configs``). Output: ``DIR/{task}_branch{b}.png`` (training augmentation,
branch ``b`` forced, at epoch 0) and ``DIR/{task}_eval.png`` (evaluation transform), for
every registered task the data section has. Label maps are overlaid in colour (ignore =
grey), the padding region is dimmed, then the task's spec draws the rest (``TaskSpec.draw``:
boxes with their class id, the class id).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

import cv2
import numpy as np

from tbgc_jax.data import pipeline
from tbgc_jax.data.augment import branch_chains
from tbgc_jax.data.batching import pad_example
from tbgc_jax.schema import IGNORE_LABEL
from tbgc_jax.tasks import get_task, task_names


def load_config(path: str):
  """Imports a config file and returns its ``get_config()``."""
  spec = importlib.util.spec_from_file_location("_tbgc_preview_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"{path}: cannot import config file")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise AttributeError(f"{path}: expected a function get_config()")
  return mod.get_config()


def palette(n: int) -> np.ndarray:
  """``n`` fixed random RGB colours, the first black."""
  rng = np.random.default_rng(0)
  pal = rng.integers(60, 256, (max(n, 1), 3)).astype(np.uint8)
  pal[0] = 0
  return pal


def draw(ex: dict, task: str, num_classes: int) -> np.ndarray:
  """Draws one fixed-shape example: label-map overlay, dimmed padding, the task's drawing."""
  spec = get_task(task)
  img = ex["image"].copy()
  for key in spec.label_maps:
    lab = ex[key]
    pal = palette(num_classes)
    over = np.zeros_like(img)
    known = (lab != IGNORE_LABEL) & (lab < num_classes)
    over[known] = pal[lab[known]]
    over[lab == IGNORE_LABEL] = 128
    show = (lab != 0)
    img[show] = (0.45 * img[show] + 0.55 * over[show]).astype(np.uint8)
  img[~ex["image_mask"]] = (img[~ex["image_mask"]] * 0.3 + 40).astype(np.uint8)
  return spec.draw(img, ex, num_classes)


def grid(tiles: Sequence[np.ndarray], cols: int = 4, gap: int = 2) -> np.ndarray:
  """Arranges equal-size RGB tiles in a grid with a white gap."""
  h, w = tiles[0].shape[:2]
  rows = -(-len(tiles) // cols)
  out = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
  for k, t in enumerate(tiles):
    r, c = divmod(k, cols)
    y0, x0 = gap + r * (h + gap), gap + c * (w + gap)
    out[y0:y0 + h, x0:x0 + w] = t
  return out


def write_previews(data_cfg, out_dir: str, num: int = 8, seed: int = 0) -> list[str]:
  """Writes the PNG grids for every task in ``data_cfg``; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for task in task_names():
    if task not in data_cfg:
      continue
    cfg = data_cfg[task]
    nc = int(cfg.num_classes)
    max_boxes = int(cfg.get("max_boxes", 0) or 0)
    src = pipeline.make_source(cfg, task, "train")
    aug = pipeline.augmentation(cfg, task, src)
    idx = list(range(min(num, len(src))))
    for b, chain in enumerate(branch_chains(aug)):
      tiles = []
      for i in idx:
        ex = chain.random_map(src[i], np.random.default_rng([seed, 0, i]))
        tiles.append(draw(pad_example(ex, task, tuple(cfg.image_size), max_boxes), task, nc))
      path = os.path.join(out_dir, f"{task}_branch{b}.png")
      cv2.imwrite(path, cv2.cvtColor(grid(tiles), cv2.COLOR_RGB2BGR))
      written.append(path)
    vsrc = pipeline.make_source(cfg, task, "val")
    ev = pipeline.eval_transform(cfg, task)
    tiles = [draw(pad_example(ev.random_map(vsrc[i], np.random.default_rng(0)), task,
                              tuple(cfg.eval_image_size), max_boxes), task, nc)
             for i in range(min(num, len(vsrc)))]
    path = os.path.join(out_dir, f"{task}_eval.png")
    cv2.imwrite(path, cv2.cvtColor(grid(tiles), cv2.COLOR_RGB2BGR))
    written.append(path)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="config file with get_config() -> .data")
  p.add_argument("--out", required=True, help="output folder for the PNG grids")
  p.add_argument("--num", type=int, default=8, help="examples per grid")
  p.add_argument("--seed", type=int, default=0, help="augmentation seed")
  args = p.parse_args(argv)
  cfg = load_config(args.config)
  for path in write_previews(cfg.data, args.out, args.num, args.seed):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
