r"""Host data-pipeline throughput per task at the paper's resolutions, vs one training step.

Usage:
  python -m benchmarks.data [--num_images 12] [--repeats 3] [--step_time 0.5]
                            [--devices_per_host 1] [--workers 0]

Writes small datasets in the real on-disk formats at the challenge's image sizes (TT100K
2048x2048 JPEG in COCO format with 4 boxes each; BDD100K 1280x720 JPEG + PNG masks;
Stanford-Cars-like 700x480 JPEG with a list file), built from scikit-image photos, then
measures with the ``challenge`` data config, single process:
- decode: ``source[i]`` (JPEG/PNG decode, median per image);
- augmentation: each branch of the training augmentation and the full (multi-branch or
  chain) augmentation (median per image);
- batching: ``pad_example`` + ``collate`` (median per image);
- images/s per worker = 1 / (decode + augmentation + batching);
- end to end: ``train_iterator`` with ``--workers`` worker processes (images/s).

Ratio vs training: one multi-task training step consumes ``batch_size x devices_per_host``
images per task (det 2, seg 2, cls 8 per device) in ``--step_time`` seconds (an assumption:
the paper gives none; pass your measured step time). The ratio is the images/s one worker
delivers over the images/s the step consumes; ``workers needed for 4x`` is how many worker
processes give 4x headroom for all three tasks together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import cv2
import numpy as np


def _photos():
  import skimage.data

  out = []
  for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
    out.append(np.ascontiguousarray(getattr(skimage.data, name)()[..., :3]))
  return out


def _write_fixtures(root: str, n: int) -> dict[str, str]:
  rng = np.random.default_rng(0)
  photos = _photos()
  pic = lambda i, h, w: cv2.cvtColor(cv2.resize(photos[i % len(photos)], (w, h)),
                                     cv2.COLOR_RGB2BGR)
  # Detection: COCO JSON + 2048x2048 JPEGs (TT100K size), 4 small boxes each.
  os.makedirs(f"{root}/det/images/train", exist_ok=True)
  os.makedirs(f"{root}/det/annotations", exist_ok=True)
  images, anns = [], []
  for i in range(n):
    cv2.imwrite(f"{root}/det/images/train/{i}.jpg", pic(i, 2048, 2048))
    images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 2048, "width": 2048})
    for _ in range(4):
      x, y, s = rng.uniform(100, 1800), rng.uniform(100, 1800), rng.uniform(16, 120)
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(45)),
                   "bbox": [x, y, s, s]})
  cats = [{"id": c, "name": f"c{c}"} for c in range(45)]
  for split in ("train", "val"):
    with open(f"{root}/det/annotations/instances_{split}.json", "w") as f:
      json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  os.makedirs(f"{root}/det/images/val", exist_ok=True)
  # Segmentation: BDD100K layout, 1280x720.
  for split in ("train", "val"):
    os.makedirs(f"{root}/seg/images/10k/{split}", exist_ok=True)
    os.makedirs(f"{root}/seg/labels/sem_seg/masks/{split}", exist_ok=True)
  for i in range(n):
    cv2.imwrite(f"{root}/seg/images/10k/train/{i}.jpg", pic(i, 720, 1280))
    lab = (np.arange(1280)[None, :] // 70 + np.arange(720)[:, None] // 90) % 19
    cv2.imwrite(f"{root}/seg/labels/sem_seg/masks/train/{i}.png", lab.astype(np.uint8))
  # Classification: list file + ~700x480 JPEGs (Stanford Cars' typical size).
  os.makedirs(f"{root}/cls/images", exist_ok=True)
  with open(f"{root}/cls/train.txt", "w") as f:
    for i in range(n):
      h, w = int(rng.integers(400, 560)), int(rng.integers(600, 800))
      cv2.imwrite(f"{root}/cls/images/{i}.jpg", pic(i, h, w))
      f.write(f"{i}.jpg {i % 196}\n")
  return {"det": f"{root}/det", "seg": f"{root}/seg", "cls": f"{root}/cls"}


def _median_time(fn, items, repeats):
  ts = []
  for _ in range(repeats):
    for it in items:
      t = time.perf_counter()
      fn(it)
      ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_images", type=int, default=12)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--step_time", type=float, default=0.5,
                 help="assumed seconds per multi-task training step (one step = one batch "
                      "per task)")
  p.add_argument("--devices_per_host", type=int, default=1)
  p.add_argument("--workers", type=int, default=0, help="worker processes for end to end")
  args = p.parse_args()
  cv2.setNumThreads(1)  # per-worker figures: one core per worker process

  from tbgc_jax.data import batching, configs, pipeline
  from tbgc_jax.data.augment import branch_chains
  from tbgc_jax.schema import TASKS
  from tbgc_jax.tasks import get_task

  tmp = tempfile.mkdtemp(prefix="tbgc-bench-")
  roots = _write_fixtures(tmp, args.num_images)
  data = configs.challenge(det_root=roots["det"], seg_root=roots["seg"], cls_root=roots["cls"])
  data.cls.source.val = data.cls.source.train
  print(f"step_time assumption: {args.step_time} s per multi-task step, "
        f"{args.devices_per_host} device(s) per host; {args.num_images} images x "
        f"{args.repeats} repeats; medians per image")
  header = (f"{'task':4} {'decode ms':>9} {'aug ms':>7} {'batch ms':>8} {'img/s/worker':>12} "
            f"{'need img/s':>10} {'ratio':>6} {'e2e img/s':>9}  branches (aug ms)")
  print(header)
  total_cost, total_need = 0.0, 0.0
  for task in TASKS:
    cfg, spec = data[task], get_task(task).data
    src = pipeline.make_source(cfg, spec, "train")
    idx = list(range(len(src)))
    decode = _median_time(lambda i, s=src: s[i], idx, 1)
    decoded = [src[i] for i in idx]
    aug = pipeline.augmentation(cfg, spec, src)
    branch_ms = []
    for b, chain in enumerate(branch_chains(aug)):
      t = _median_time(lambda e, c=chain, b=b: c.random_map(
          dict(e), np.random.default_rng([b, int(e["index"])])), decoded, args.repeats)
      branch_ms.append(t * 1e3)
    rngs = iter(np.random.default_rng([9, k]) for k in range(10**6))
    aug_t = _median_time(lambda e, a=aug, r=rngs: a.random_map(dict(e) | {"progress": 0.0},
                                                                 next(r)),
                         decoded, args.repeats)
    outs = [aug.random_map(dict(e), np.random.default_rng(k)) for k, e in enumerate(decoded)]
    fields = pipeline.fields(cfg, spec)
    bs = int(cfg.batch_size)
    size = tuple(cfg.image_size)

    def _batch(k, outs=outs, bs=bs, fields=fields, size=size):
      batching.collate([batching.pad_example(outs[(k + j) % len(outs)], fields, size)
                        for j in range(bs)])

    batch_t = _median_time(_batch, range(len(outs)), args.repeats) / bs
    per_img = decode + aug_t + batch_t
    need = bs * args.devices_per_host / args.step_time
    total_cost += per_img * need
    total_need += need
    # One read thread: grain's default (16 threads, 500-element buffer) would run ahead of
    # the timed loop and measure the buffer, not the pipeline.
    it = pipeline.train_iterator(cfg, spec, seed=0, num_epochs=100,
                                 num_workers=args.workers, read_threads=1, source=src)
    next(it)
    n_b = max(4, 2 * args.num_images // bs)
    t = time.perf_counter()
    for _ in range(n_b):
      next(it)
    e2e = n_b * bs / (time.perf_counter() - t)
    print(f"{task:4} {decode * 1e3:9.1f} {aug_t * 1e3:7.1f} {batch_t * 1e3:8.2f} "
          f"{1 / per_img:12.1f} {need:10.1f} {1 / per_img / need:6.2f} {e2e:9.1f}  "
          + ", ".join(f"b{b}: {m:.1f}" for b, m in enumerate(branch_ms)))
    del it
  # All three tasks share the host: CPU-seconds needed per second of training.
  print(f"all tasks: one worker delivers {1 / total_cost:.2f}x what training consumes; "
        f"workers needed for 4x headroom: {int(np.ceil(4 * total_cost))}")


if __name__ == "__main__":
  main()
