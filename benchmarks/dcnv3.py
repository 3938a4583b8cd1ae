"""Forward+backward time and compiled memory: DCNv3 block vs depthwise-conv block.

Both are full InternImage blocks (norm, core op, layer scale, MLP); the depthwise block
replaces DCNv3 by input projection -> 3x3 depthwise conv -> output projection (same
channels, same projections), i.e. a ConvNeXt-style block of the same size. Times are medians
over interleaved repeats of one jitted ``value_and_grad`` step (parameters and input);
memory is XLA's compiled ``memory_analysis().temp_size_in_bytes``.

  python -m benchmarks.dcnv3 [--batch 8] [--repeats 7]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from tbgc_jax.models.internimage import InternImageLayer


class _DWConvCore(nnx.Module):
  """DCNv3 stand-in: input_proj -> depthwise 3x3 conv -> output_proj."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.input_proj = nnx.Linear(channels, channels, rngs=rngs)
    self.dw_conv = nnx.Conv(channels, channels, (3, 3), feature_group_count=channels,
                            rngs=rngs)
    self.output_proj = nnx.Linear(channels, channels, rngs=rngs)

  def __call__(self, x):
    return self.output_proj(self.dw_conv(self.input_proj(x)))


def _block(kind: str, channels: int, group: int) -> nnx.Module:
  rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
  layer = InternImageLayer(channels, group, layer_scale=1e-5, rngs=rngs)
  if kind == "dwconv":
    layer.dcn = _DWConvCore(channels, rngs=rngs)
  return layer


def _step_fn(layer: nnx.Module, x: jax.Array):
  graph, params = nnx.split(layer)

  def loss(params, x):
    return jnp.mean(jnp.square(nnx.merge(graph, params)(x)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(params, x).compile()
  return (lambda: jax.block_until_ready(compiled(params, x))), compiled.memory_analysis()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  # InternImage-T at 224x224: level 1 (56x56, C=64, 4 groups) and level 3 (14x14, C=256, 16).
  shapes = [(56, 64, 4), (14, 256, 16)]
  header = f"{'shape (B,H,W,C) g':<24}{'op':<8}{'fwd+bwd ms':>12}{'temp MiB':>10}"
  print(header)
  for size, channels, group in shapes:
    x = jax.random.normal(jax.random.key(1), (args.batch, size, size, channels))
    runs, mems = {}, {}
    for kind in ("dcnv3", "dwconv"):
      runs[kind], mem = _step_fn(_block(kind, channels, group), x)
      mems[kind] = mem.temp_size_in_bytes / 2**20
      runs[kind]()  # warm up
    times = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved so both see the same machine load
      for kind, run in runs.items():
        start = time.perf_counter()
        run()
        times[kind].append(1e3 * (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in times.items()}
    label = f"({args.batch},{size},{size},{channels}) g={group}"
    for kind in runs:
      print(f"{label:<24}{kind:<8}{med[kind]:>12.1f}{mems[kind]:>10.1f}")
    print(f"{'':<24}{'ratio':<8}{med['dcnv3'] / med['dwconv']:>12.2f}x"
          f"{mems['dcnv3'] / mems['dwconv']:>9.2f}x")


if __name__ == "__main__":
  main()
