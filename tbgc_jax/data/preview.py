"""PNG grids of what the model is fed, per task and per augmentation branch.

``write_previews`` writes ``DIR/{task}_branch{b}.png`` (training augmentation, branch ``b``
forced, at epoch 0) and ``DIR/{task}_eval.png`` (evaluation transform) for the tasks it is
given (name -> data spec). ``draw`` draws a fixed-shape example by the kinds of its fields
(``tbgc_jax.data.fields``): maps overlaid in colour (their fill grey), the padding region
dimmed, then boxes with their class id, keypoints and image-level labels. The command line
is ``python -m tbgc_jax.trainer.preview`` (it resolves the config's tasks).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from tbgc_jax.data import pipeline
from tbgc_jax.data.augment import branch_chains
from tbgc_jax.data.batching import pad_example
from tbgc_jax.data.fields import Fields, as_fields
from tbgc_jax.data.fields import palette as palette
from tbgc_jax.data.spec import DataSpec


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


def draw(ex: dict, fields: Fields | dict, num_classes: int) -> np.ndarray:
  """Draws one fixed-shape example: maps overlaid, padding dimmed, then the other fields."""
  fields = as_fields(fields)
  img = ex["image"].copy()
  for key, kind in fields:
    if kind.under_padding:
      img = kind.draw(img, ex, key, num_classes)
  img[~ex["image_mask"]] = (img[~ex["image_mask"]] * 0.3 + 40).astype(np.uint8)
  for key, kind in fields:
    if not kind.under_padding:
      img = kind.draw(img, ex, key, num_classes)
  return img


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


def write_previews(data_cfg: Mapping, specs: Mapping[str, DataSpec], out_dir: str,
                   num: int = 8, seed: int = 0) -> list[str]:
  """Writes the PNG grids of every task of ``specs`` (name -> data spec) that ``data_cfg``
  has; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for task, spec in specs.items():
    if task not in data_cfg:
      continue
    cfg = data_cfg[task]
    nc = int(cfg.num_classes)
    fields = pipeline.fields(cfg, spec)
    src = pipeline.make_source(cfg, spec, "train")
    aug = pipeline.augmentation(cfg, spec, src)
    idx = list(range(min(num, len(src))))
    for b, chain in enumerate(branch_chains(aug)):
      tiles = []
      for i in idx:
        ex = chain.random_map(src[i], np.random.default_rng([seed, 0, i]))
        tiles.append(draw(pad_example(ex, fields, tuple(cfg.image_size)), fields, nc))
      path = os.path.join(out_dir, f"{task}_branch{b}.png")
      cv2.imwrite(path, cv2.cvtColor(grid(tiles), cv2.COLOR_RGB2BGR))
      written.append(path)
    vsrc = pipeline.make_source(cfg, spec, "val")
    ev = pipeline.eval_transform(cfg, spec)
    tiles = [draw(pad_example(ev.random_map(vsrc[i], np.random.default_rng(0)), fields,
                              tuple(cfg.eval_image_size)), fields, nc)
             for i in range(min(num, len(vsrc)))]
    path = os.path.join(out_dir, f"{task}_eval.png")
    cv2.imwrite(path, cv2.cvtColor(grid(tiles), cv2.COLOR_RGB2BGR))
    written.append(path)
  return written
