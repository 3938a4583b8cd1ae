"""The library against TorchJD, side by side in one process: aggregations and multi-task steps.

Needs torch (CPU) and torchjd 0.18 beside jax (the `torch` environment, not the test one);
not run in CI.

1. Aggregation: every method the two share, on the same per-task gradients (3 tasks x 25M
   float32 parameters, norms over two decades): the project's jitted transform (every leaf
   shared, one leaf per 1M parameters) against TorchJD's aggregator called on the 3 x 25M
   Jacobian matrix. ``tbgc`` (no TorchJD counterpart) is timed beside them.
2. Multi-task step: an MLP trunk (3 layers, width 1024, ReLU) with T linear heads, one batch
   per step, UPGrad then Adam: ``per_task_value_and_grad`` + ``upgrad`` + ``optax.adam`` in
   one jitted step against TorchJD's ``mtl_backward`` + ``jac_to_grad(trunk, UPGrad())`` +
   ``torch.optim.Adam``, for T = 2, 4, 8.

Both sides use 2 CPU threads (torch.set_num_threads; XLA's CPU pool on the 2-core machine).
Rounds interleave the two sides and the methods so machine noise hits them alike; medians in
milliseconds and the ratio project / TorchJD are printed, and written as JSON with --out.

  OMP_NUM_THREADS=2 nice -n 10 python benchmarks/vs_torchjd.py --out docs/results/vs_torchjd.json
  python benchmarks/vs_torchjd.py --part step --tasks 2,4 --rounds 5
"""

import argparse
import importlib.metadata as md
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torchjd import aggregation as tja
from torchjd.autojac import jac_to_grad, mtl_backward

import tbgc_jax

LEAF = 1 << 20
THREADS = 2


def torchjd_aggregators(num_tasks: int) -> dict:
  """The project's method name -> TorchJD's aggregator with the same hyperparameters."""
  return {
      "mean": tja.Mean(), "upgrad": tja.UPGrad(), "dualproj": tja.DualProj(),
      "mgda": tja.MGDA(), "imtl_g": tja.IMTLG(), "aligned_mtl": tja.AlignedMTL(),
      "cagrad": tja.CAGrad(c=0.5), "pcgrad": tja.PCGrad(), "graddrop": tja.GradDrop(),
      "gradvac": tja.GradVac(beta=0.5), "nash_mtl": tja.NashMTL(n_tasks=num_tasks),
      "config": tja.ConFIG(), "fairgrad": tja.FairGrad(alpha=1.0),
  }


def _median_ms(times):
  return 1e3 * statistics.median(times)


def aggregation(num_tasks: int, millions: int, rounds: int, names) -> dict:
  rng = np.random.default_rng(0)
  leaves = millions
  jac = np.empty((num_tasks, leaves * LEAF), np.float32)
  for k in range(num_tasks):
    jac[k] = rng.standard_normal(leaves * LEAF, dtype=np.float32) * 10.0 ** (1 - k % 3)
  tasks = tuple(f"task{k}" for k in range(num_tasks))
  grads = {t: {f"w{i:02d}": jnp.asarray(jac[k, i * LEAF:(i + 1) * LEAF].reshape(1024, 1024))
               for i in range(leaves)} for k, t in enumerate(tasks)}
  params = jax.tree.map(jnp.zeros_like, grads[tasks[0]])
  torch_jac = torch.from_numpy(jac)
  aggregators = torchjd_aggregators(num_tasks)
  names = [n for n in names if n in aggregators and n in tbgc_jax.method_names()]

  jax_fns, torch_fns = {}, {}
  for name in [*names, "tbgc"]:
    hp = {"max_norm": 0.1} if name == "tbgc" else {}
    mask = (lambda p: jax.tree.map(lambda _: True, p)) if name == "tbgc" else None
    tx = tbgc_jax.make_method(name, mask, tasks=tasks, **hp)
    state = tx.init(params)
    update = jax.jit(lambda g, s, tx=tx: tx.update(g, s, params)[0])
    jax.block_until_ready(update(grads, state))  # compile
    jax_fns[name] = lambda update=update, state=state: jax.block_until_ready(
        update(grads, state))
  for name in names:
    agg = aggregators[name]
    agg(torch_jac)  # warm-up (solver set-up)
    torch_fns[name] = lambda agg=agg: agg(torch_jac)

  times = {("jax", n): [] for n in jax_fns} | {("torch", n): [] for n in torch_fns}
  for r in range(rounds):
    order = list(times) if r % 2 == 0 else list(reversed(times))
    for side, name in order:
      fn = (jax_fns if side == "jax" else torch_fns)[name]
      t0 = time.perf_counter()
      fn()
      times[(side, name)].append(time.perf_counter() - t0)
  out = {}
  for name in jax_fns:
    j = _median_ms(times[("jax", name)])
    row = {"jax_ms": round(j, 1)}
    if name in torch_fns:
      t = _median_ms(times[("torch", name)])
      row |= {"torchjd_ms": round(t, 1), "ratio": round(j / t, 3)}
    out[name] = row
  return out


def _mlp_sizes(d_in: int, width: int, depth: int):
  return [(d_in if i == 0 else width, width) for i in range(depth)]


def step(num_tasks: int, rounds: int, batch: int = 256, d_in: int = 256, width: int = 1024,
         depth: int = 3) -> dict:
  rng = np.random.default_rng(num_tasks)
  sizes = _mlp_sizes(d_in, width, depth)
  w0 = [(rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a), np.zeros(b, np.float32))
        for a, b in sizes]
  h0 = [(rng.standard_normal((width, 1), dtype=np.float32) / np.sqrt(width),
         np.zeros(1, np.float32)) for _ in range(num_tasks)]
  x = rng.standard_normal((batch, d_in), dtype=np.float32)
  ys = rng.standard_normal((num_tasks, batch, 1), dtype=np.float32)
  tasks = tuple(f"t{k}" for k in range(num_tasks))

  # --- JAX: per-task forward/backward, UPGrad on the trunk, Adam; one jitted, donated step.
  params = {"trunk": [(jnp.asarray(w), jnp.asarray(b)) for w, b in w0],
            "heads": {t: (jnp.asarray(w), jnp.asarray(b))
                      for t, (w, b) in zip(tasks, h0, strict=True)}}

  def trunk(p, xb):
    for w, b in p["trunk"]:
      xb = jax.nn.relu(xb @ w + b)
    return xb

  def loss_fn(task):
    def fn(p, data):
      xb, yb = data
      w, b = p["heads"][task]
      return jnp.mean((trunk(p, xb) @ w + b - yb) ** 2)
    return fn

  grad_fn = tbgc_jax.per_task_value_and_grad({t: loss_fn(t) for t in tasks})
  tx = optax.chain(tbgc_jax.upgrad(tbgc_jax.path_mask("^trunk"), tasks=tasks), optax.adam(1e-3))
  opt_state = tx.init(params)
  batches = {t: (jnp.asarray(x), jnp.asarray(ys[k])) for k, t in enumerate(tasks)}

  def jax_step(params, opt_state, batches):
    losses, grads = grad_fn(params, batches)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses

  jax_step = jax.jit(jax_step, donate_argnums=(0, 1))
  state = [params, opt_state]

  def run_jax():
    state[0], state[1], losses = jax_step(state[0], state[1], batches)
    jax.block_until_ready(losses)

  # --- TorchJD: shared forward, mtl_backward, jac_to_grad(UPGrad), Adam.
  layers = []
  for w, b in w0:
    lin = torch.nn.Linear(*w.shape)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(w.T.copy()))
      lin.bias.copy_(torch.from_numpy(b))
    layers += [lin, torch.nn.ReLU()]
  trunk_t = torch.nn.Sequential(*layers)
  heads_t = torch.nn.ModuleList()
  for w, b in h0:
    lin = torch.nn.Linear(width, 1)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(w.T.copy()))
      lin.bias.copy_(torch.from_numpy(b))
    heads_t.append(lin)
  optimizer = torch.optim.Adam([*trunk_t.parameters(), *heads_t.parameters()], lr=1e-3)
  upgrad = tja.UPGrad()
  xt, yt = torch.from_numpy(x), torch.from_numpy(ys)

  def run_torch():
    features = trunk_t(xt)
    losses = [torch.mean((head(features) - yt[k]) ** 2) for k, head in enumerate(heads_t)]
    mtl_backward(losses, features=features)
    jac_to_grad(list(trunk_t.parameters()), upgrad)
    optimizer.step()
    optimizer.zero_grad()

  run_jax()  # compile
  run_torch()
  times = {"jax": [], "torch": []}
  for r in range(rounds):
    for side in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
      t0 = time.perf_counter()
      (run_jax if side == "jax" else run_torch)()
      times[side].append(time.perf_counter() - t0)
  j, t = _median_ms(times["jax"]), _median_ms(times["torch"])
  return {"jax_ms": round(j, 2), "torchjd_ms": round(t, 2), "ratio": round(j / t, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("all", "aggregation", "step"), default="all")
  parser.add_argument("--tasks", default="2,4,8", help="T of the multi-task step")
  parser.add_argument("--agg_tasks", type=int, default=3)
  parser.add_argument("--millions", type=int, default=25, help="parameters (x 2^20)")
  parser.add_argument("--methods", default="all")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--step_rounds", type=int, default=21)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  torch.set_num_threads(THREADS)
  torch.manual_seed(0)
  names = (list(torchjd_aggregators(args.agg_tasks)) if args.methods == "all"
           else args.methods.split(","))
  result = {
      "machine": f"2-core CPU box ({platform.processor() or platform.machine()}), "
                 f"{THREADS} threads each side",
      "versions": {p: md.version(p) for p in ("jax", "jaxlib", "optax", "torch", "torchjd")},
  }
  if args.part in ("all", "aggregation"):
    agg = aggregation(args.agg_tasks, args.millions, args.rounds, names)
    result["aggregation"] = {"tasks": args.agg_tasks, "parameters": args.millions * LEAF,
                             "rounds": args.rounds, "methods": agg}
    print(f"aggregation, {args.agg_tasks} tasks x {args.millions}M float32 parameters "
          "(median ms; ratio = project / TorchJD):")
    for name, row in agg.items():
      print(f"  {name:12s} {row['jax_ms']:9.1f} {row.get('torchjd_ms', float('nan')):9.1f} "
            f"{row.get('ratio', float('nan')):6.3f}")
  if args.part in ("all", "step"):
    result["step"] = {"rounds": args.step_rounds, "batch": 256, "d_in": 256, "width": 1024,
                      "depth": 3, "by_tasks": {}}
    print("multi-task step, MLP trunk 3 x 1024 + T heads, UPGrad + Adam (median ms):")
    for num_tasks in map(int, args.tasks.split(",")):
      row = step(num_tasks, args.step_rounds)
      result["step"]["by_tasks"][str(num_tasks)] = row
      print(f"  T={num_tasks}: project {row['jax_ms']:8.2f}  TorchJD {row['torchjd_ms']:8.2f}  "
            f"ratio {row['ratio']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  main()
