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

3. Exactness: every shared deterministic method on random Jacobians (2-4 tasks x 6
   coordinates, task norms spread over 2 and over 4 decades), both sides in float32, against
   the float64 solutions of the methods' defining problems in ``tests/mtl_reference.py``:
   median and max of ||out - reference|| / ||reference||, and for the non-conflicting methods
   (UPGrad, DualProj, MGDA) the smallest cosine between the update and a task gradient
   (negative: the update conflicts with that task).

Both sides use 2 CPU threads (torch.set_num_threads; XLA's CPU pool on the 2-core machine).
Rounds interleave the two sides and the methods so machine noise hits them alike; medians in
milliseconds and the ratio project / TorchJD are printed, and written as JSON with --out.

  OMP_NUM_THREADS=2 nice -n 10 python benchmarks/vs_torchjd.py --out docs/results/vs_torchjd.json
  python benchmarks/vs_torchjd.py --part step --tasks 2,4 --rounds 5
"""

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tbgc_jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import mtl_reference as ref  # noqa: E402

LEAF = 1 << 20
THREADS = 2


def torchjd_aggregators(num_tasks: int) -> dict:
  """The project's method name -> TorchJD's aggregator with the same hyperparameters."""
  from torchjd import aggregation as tja

  return {
      "mean": tja.Mean(), "upgrad": tja.UPGrad(), "dualproj": tja.DualProj(),
      "mgda": tja.MGDA(), "imtl_g": tja.IMTLG(), "aligned_mtl": tja.AlignedMTL(),
      "cagrad": tja.CAGrad(c=0.5), "pcgrad": tja.PCGrad(), "graddrop": tja.GradDrop(),
      "gradvac": tja.GradVac(beta=0.5), "nash_mtl": tja.NashMTL(n_tasks=num_tasks),
      "config": tja.ConFIG(), "fairgrad": tja.FairGrad(alpha=1.0),
  }


def _timed(fn) -> tuple[float, float]:
  """Wall-clock and process CPU seconds (all threads) of one call."""
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def _summary(jax_times, torch_times=None) -> dict:
  """Medians in ms of wall and CPU time, and the project / TorchJD ratios of both."""
  j_wall, j_cpu = (1e3 * statistics.median(x) for x in zip(*jax_times, strict=True))
  row = {"jax_ms": round(j_wall, 2), "jax_cpu_ms": round(j_cpu, 2)}
  if torch_times:
    t_wall, t_cpu = (1e3 * statistics.median(x) for x in zip(*torch_times, strict=True))
    row |= {"torchjd_ms": round(t_wall, 2), "torchjd_cpu_ms": round(t_cpu, 2),
            "ratio": round(j_wall / t_wall, 3), "cpu_ratio": round(j_cpu / t_cpu, 3)}
  return row


def aggregation(num_tasks: int, millions: int, rounds: int, names) -> dict:
  import torch

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
      times[(side, name)].append(_timed((jax_fns if side == "jax" else torch_fns)[name]))
  return {name: _summary(times[("jax", name)], times.get(("torch", name))) for name in jax_fns}


NON_CONFLICTING = ("upgrad", "dualproj", "mgda")


def exactness(trials: int, decades: float) -> dict:
  import torch

  rng = np.random.default_rng(0)
  names = [n for n in ref.DETERMINISTIC if n in torchjd_aggregators(2)]
  errors = {(side, n): [] for side in ("jax", "torch") for n in names}
  worst_cos = {(side, n): 1.0 for side in ("jax", "torch") for n in NON_CONFLICTING}
  updates = {}
  for trial in range(trials):
    num_tasks = (2, 3, 4)[trial % 3]
    tasks = tuple(f"t{i}" for i in range(num_tasks))
    scales = 10.0 ** rng.uniform(-decades / 2, decades / 2, size=(num_tasks, 1))
    jac = (rng.normal(size=(num_tasks, 6)) * scales).astype(np.float32)
    for name in names:
      want = ref.DETERMINISTIC[name](jac.astype(np.float64))
      if (name, num_tasks) not in updates:
        tx = tbgc_jax.make_method(name, tasks=tasks)
        updates[name, num_tasks] = (tx, jax.jit(tx.update))
      tx, update = updates[name, num_tasks]
      got = {"jax": np.asarray(update({t: jnp.asarray(jac[i]) for i, t in enumerate(tasks)},
                                      tx.init(jnp.zeros(6)))[0], np.float64),
             "torch": torchjd_aggregators(num_tasks)[name](torch.from_numpy(jac)).double().numpy()}
      for side, out in got.items():
        errors[(side, name)].append(np.linalg.norm(out - want) / np.linalg.norm(want))
        if name in NON_CONFLICTING and np.linalg.norm(out) > 0:
          cos = jac.astype(np.float64) @ out / (np.linalg.norm(jac, axis=1) * np.linalg.norm(out))
          worst_cos[(side, name)] = min(worst_cos[(side, name)], float(cos.min()))
  out = {}
  for name in names:
    row = {}
    for side in ("jax", "torch"):
      e = errors[(side, name)]
      row[side] = {"median": float(f"{np.median(e):.2e}"), "max": float(f"{np.max(e):.2e}"),
                   "over_1e-3": int(sum(x > 1e-3 for x in e))}
      if name in NON_CONFLICTING:
        row[side]["min_cosine"] = round(worst_cos[(side, name)], 4)
    out[name] = row
  return out


def _mlp_sizes(d_in: int, width: int, depth: int):
  return [(d_in if i == 0 else width, width) for i in range(depth)]


def step(num_tasks: int, rounds: int, batch: int = 256, d_in: int = 256, width: int = 1024,
         depth: int = 3) -> dict:
  import torch
  from torchjd import aggregation as tja
  from torchjd.autojac import jac_to_grad, mtl_backward

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
      times[side].append(_timed(run_jax if side == "jax" else run_torch))
  return _summary(times["jax"], times["torch"])


def _fmt(row: dict) -> str:
  text = f"{row['jax_ms']:9.1f} ({row['jax_cpu_ms']:9.1f})"
  if "ratio" in row:
    text += (f" {row['torchjd_ms']:9.1f} ({row['torchjd_cpu_ms']:9.1f})"
             f"  {row['ratio']:6.3f} ({row['cpu_ratio']:6.3f})")
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("all", "aggregation", "step", "exactness"),
                      default="all")
  parser.add_argument("--trials", type=int, default=60, help="Jacobians per exactness setting")
  parser.add_argument("--tasks", default="2,4,8", help="T of the multi-task step")
  parser.add_argument("--agg_tasks", type=int, default=3)
  parser.add_argument("--millions", type=int, default=25, help="parameters (x 2^20)")
  parser.add_argument("--methods", default="all")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--step_rounds", type=int, default=21)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  import torch  # the optional torch environment: only after --help

  torch.set_num_threads(THREADS)
  torch.manual_seed(0)
  names = (list(torchjd_aggregators(args.agg_tasks)) if args.methods == "all"
           else args.methods.split(","))
  result = {
      "machine": f"2-core CPU box ({platform.processor() or platform.machine()}), "
                 f"{THREADS} threads each side",
      "versions": {p: md.version(p) for p in ("jax", "jaxlib", "optax", "torch", "torchjd")},
      "command": "OMP_NUM_THREADS=2 nice -n 10 python benchmarks/vs_torchjd.py "
                 + " ".join(sys.argv[1:]),
      "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
  }
  if args.part in ("all", "aggregation"):
    agg = aggregation(args.agg_tasks, args.millions, args.rounds, names)
    result["aggregation"] = {"tasks": args.agg_tasks, "parameters": args.millions * LEAF,
                             "rounds": args.rounds, "methods": agg}
    print(f"aggregation, {args.agg_tasks} tasks x {args.millions}M float32 parameters, median "
          "ms wall (CPU): project, TorchJD, ratio project / TorchJD")
    for name, row in agg.items():
      print(f"  {name:12s} {_fmt(row)}")
  if args.part in ("all", "step"):
    result["step"] = {"rounds": args.step_rounds, "batch": 256, "d_in": 256, "width": 1024,
                      "depth": 3, "by_tasks": {}}
    print("multi-task step, MLP trunk 3 x 1024 + T heads, UPGrad + Adam, median ms wall (CPU)")
    for num_tasks in map(int, args.tasks.split(",")):
      row = step(num_tasks, args.step_rounds)
      result["step"]["by_tasks"][str(num_tasks)] = row
      print(f"  T={num_tasks:<10d} {_fmt(row)}")
  if args.part in ("all", "exactness"):
    result["exactness"] = {"trials": args.trials, "by_decades": {}}
    for decades in (2.0, 4.0):
      rows = exactness(args.trials, decades)
      result["exactness"]["by_decades"][f"{decades:g}"] = rows
      print(f"exactness, {args.trials} Jacobians (2-4 tasks x 6), norms over {decades:g} "
            "decades: relative error median / max (project | TorchJD), min cosine")
      for name, row in rows.items():
        j, t = row["jax"], row["torch"]
        extra = (f"   min cos {j['min_cosine']:+.4f} | {t['min_cosine']:+.4f}"
                 if "min_cosine" in j else "")
        print(f"  {name:12s} {j['median']:8.1e} {j['max']:8.1e} | {t['median']:8.1e} "
              f"{t['max']:8.1e}{extra}")
  result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
      f.write("\n")


if __name__ == "__main__":
  main()
