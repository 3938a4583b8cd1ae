"""Cost of the gradient methods on the same per-task gradients, side by side.

~24M parameters (16M backbone, three 2.7M heads) x 3 tasks, float32, each method jitted;
rounds interleave the methods so machine noise hits them alike. Prints median milliseconds
per update and ratios to the vanilla clip (optax.clip_by_global_norm of the summed gradient).

  python -m benchmarks.transform [--rounds 15] [--backbone-leaves 16] [--leaf 1024]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import tbgc_jax
from tbgc_jax.schema import TASKS


def make_grads(backbone_leaves: int, leaf: int, seed: int = 0):
  """Per-task gradients: full backbone, own head; other heads zero (as jax.grad gives)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  head_shape = (leaf, int(leaf * 2.7))  # ~2.7M with leaf=1024
  grads = {}
  for k, task in enumerate(TASKS):
    scale = 10.0 ** (1 - k)  # det >> seg >> cls, as in the paper's Figure 1
    grads[task] = {
        "backbone": {f"w{i}": scale * jax.random.normal(next(keys), (leaf, leaf))
                     for i in range(backbone_leaves)},
        "heads": {t: (scale * jax.random.normal(next(keys), head_shape) if t == task
                      else jnp.zeros(head_shape)) for t in TASKS},
    }
  return grads


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--backbone-leaves", type=int, default=16)
  parser.add_argument("--leaf", type=int, default=1024)
  args = parser.parse_args()

  grads = make_grads(args.backbone_leaves, args.leaf)
  params = jax.tree.map(jnp.zeros_like, grads["det"])
  n_params = sum(x.size for x in jax.tree.leaves(params))
  mask = tbgc_jax.path_mask("^backbone/")

  def bare_sum(g):
    return jax.tree.map(lambda *xs: sum(xs), *g.values())

  clip = optax.clip_by_global_norm(0.1)

  def optax_vanilla(g):
    return clip.update(bare_sum(g), optax.EmptyState())[0]

  def ours(tx):
    state = tx.init(params)
    return lambda g: tx.update(g, state, params)[0]

  methods = {
      "sum (no clip)": bare_sum,
      "vanilla (optax clip of sum)": optax_vanilla,
      "tbgc_jax.vanilla_clip": ours(tbgc_jax.vanilla_clip(0.1, mask, tasks=TASKS)),
      "tbgc_jax.per_task_clip": ours(tbgc_jax.per_task_clip(0.1, mask, tasks=TASKS)),
      "tbgc_jax.tbgc": ours(tbgc_jax.tbgc(0.1, mask, tasks=TASKS)),
      "tbgc_jax.tbgc(rescale_heads=False)": ours(
          tbgc_jax.tbgc(0.1, mask, tasks=TASKS, rescale_heads=False)),
  }
  compiled = {name: jax.jit(fn).lower(grads).compile() for name, fn in methods.items()}
  for fn in compiled.values():
    jax.block_until_ready(fn(grads))  # warm-up
  times = {name: [] for name in compiled}
  for _ in range(args.rounds):
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(grads))
      times[name].append(time.perf_counter() - t0)

  base = statistics.median(times["vanilla (optax clip of sum)"])
  print(f"{n_params / 1e6:.1f}M parameters x {len(TASKS)} tasks, float32, "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{args.rounds} interleaved rounds")
  print(f"{'method':38s} {'median ms':>10s} {'vs vanilla':>11s}")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"{name:38s} {med * 1e3:10.1f} {med / base:10.2f}x")
  tbgc_ratio = statistics.median(times["tbgc_jax.tbgc"]) / base
  print(f"goal tbgc <= 1.2x vanilla: {'met' if tbgc_ratio <= 1.2 else 'NOT met'} "
        f"({tbgc_ratio:.2f}x)")


if __name__ == "__main__":
  main()
