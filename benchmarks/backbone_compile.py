"""Compile and step time of the InternImage backbone alone: unrolled vs scanned blocks.

  python -m benchmarks.backbone_compile [--preset t] [--size 224] [--batch 1] [--rounds 5]

For each layout of the same preset (``scan_blocks`` False, then True; the scanned parameters
are `stack_blocks` of the unrolled ones), the gradient with respect to the parameters of the
sum of the four feature maps, in train mode (drop path on, its keys from a step key through
``nnx.reseed`` as the trainer does), jitted on concrete parameters. Prints per layout:
- ``lower``: tracing + lowering to StableHLO, and the StableHLO op count
  (`benchmarks.compile.stablehlo_ops`);
- ``compile``: XLA compile of that module (cold: no persistent cache), with the process CPU
  seconds (all threads) and the optimised-HLO instruction count;
- ``step``: median wall time of one gradient over interleaved rounds, and the ratio to the
  unrolled layout.
The scanned model built from the same seed holds exactly the stacked unrolled parameters
(checked). Gradients are not compared: the drop-path masks of the two layouts come from
different keys (tests/test_internimage.py compares them in eval mode).
"""

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.compile import hlo_ops, stablehlo_ops
from tbgc_jax.models.internimage import PRESETS, InternImage, stack_blocks


def _grad_fn(graphdef):
  def loss(params, rest, key, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, default=key, dropout=key)
    return sum(jnp.sum(f) for f in model(x))

  return jax.jit(jax.grad(loss))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="t", choices=sorted(PRESETS))
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  print(f"{jax.devices()[0].platform}, {os.cpu_count()} cpu(s), jax {jax.__version__}; "
        f"InternImage-{args.preset} {args.size}x{args.size} batch {args.batch}, "
        "gradient of the sum of the features (train mode)", flush=True)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  key = jax.random.key(1)
  cfg = PRESETS[args.preset]
  rngs = lambda: nnx.Rngs(params=jax.random.key(0, impl="rbg"), dropout=1)
  params = None
  runs = {}
  print(f"{'layout':9s} {'lower s':>8s} {'ops':>7s} {'compile s':>10s} {'cpu s':>7s} "
        f"{'hlo instrs':>11s}")
  for scan in (False, True):
    c = dataclasses.replace(cfg, scan_blocks=scan)
    graphdef, abstract_params, rest = nnx.split(
        nnx.eval_shape(lambda c=c: InternImage(c, rngs=rngs())), nnx.Param, ...)
    # Concrete parameters once (unrolled); the scanned layout gets the same values stacked.
    built_params, rest = jax.jit(
        lambda c=c: tuple(nnx.split(InternImage(c, rngs=rngs()), nnx.Param, ...)[1:]))()
    if params is None:
      params = layout_params = built_params
    else:
      layout_params = stack_blocks(params)
      assert all(bool(jnp.array_equal(a, b)) for a, b in zip(
          jax.tree.leaves(layout_params), jax.tree.leaves(built_params), strict=True))
    assert jax.tree.structure(layout_params) == jax.tree.structure(abstract_params)
    fn = _grad_fn(graphdef)
    t0 = time.perf_counter()
    lowered = fn.lower(layout_params, rest, key, x)
    lower_s = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    name = "scanned" if scan else "unrolled"
    print(f"{name:9s} {lower_s:8.1f} {stablehlo_ops(lowered):7d} {compile_s:10.1f} "
          f"{cpu_s:7.1f} {hlo_ops(compiled):11d}", flush=True)
    jax.block_until_ready(compiled(layout_params, rest, key, x))  # warm up
    runs[name] = (compiled, (layout_params, rest, key, x), [])
  for r in range(args.rounds):
    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
      compiled, inputs, times = runs[name]
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*inputs))
      times.append(time.perf_counter() - t0)
  base = statistics.median(runs["unrolled"][2])
  print(f"step time, median of {args.rounds} interleaved rounds")
  for name, (_, _, times) in runs.items():
    med = statistics.median(times)
    print(f"  {name:9s} {med * 1e3:8.1f} ms  ({med / base:.2f} x unrolled)")


if __name__ == "__main__":
  main()
