"""Cost of every registered gradient method vs the plain sum, as tasks and parameters grow.

For each configuration (tasks x parameters), every method is jitted on the same per-task
gradients (float32; 80% of the parameters in 1M-element backbone leaves, the rest split into one
head per task, other tasks' heads zero as ``jax.grad`` gives); rounds interleave the methods so
machine noise hits them alike; medians in milliseconds and ratios to ``none`` (the plain sum)
and to ``tbgc`` are printed. At 3 tasks x 25M parameters, two lines compare every Gramian
method with 1.3x ``tbgc`` and GradDrop (elementwise) with 1.5x ``tbgc``, from the same run.

  python -m benchmarks.methods                        # goal point, task and size sweeps
  python -m benchmarks.methods --configs 3x25 --rounds 9 --methods none,tbgc,upgrad
  python -m benchmarks.methods --configs 3x25 --rounds 9 --paired   # on a shared machine
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import tbgc_jax

LEAF = 1 << 20
CLIPPING = ("none", "vanilla", "tbgc_star", "tbgc", "backbone_clip")
# Not Gramian methods: GradDrop works per coordinate (one random draw per backbone coordinate),
# the trimmed mean ranks the tasks' values per coordinate; MoCo, DB-MTL and ExcessMTL update
# per-task running statistics of the whole backbone gradient.
ELEMENTWISE = ("graddrop", "trimmed_mean", "moco", "db_mtl", "excess_mtl")


def make_grads(num_tasks: int, millions: float, seed: int = 0):
  """Per-task gradients with a shared backbone and one head per task."""
  total = int(millions * LEAF)
  backbone_leaves = max(1, round(0.8 * total / LEAF))
  head = max(1, (total - backbone_leaves * LEAF) // num_tasks)
  tasks = tuple(f"task{k}" for k in range(num_tasks))
  keys = iter(jax.random.split(jax.random.key(seed), backbone_leaves * num_tasks + num_tasks))
  grads = {}
  for k, task in enumerate(tasks):
    scale = 10.0 ** (1 - k % 3)  # norms spread over decades, as in the paper's Figure 1
    grads[task] = {
        "backbone": {f"w{i}": scale * jax.random.normal(next(keys), (1024, 1024))
                     for i in range(backbone_leaves)},
        "heads": {t: (scale * jax.random.normal(next(keys), (head,)) if t == task
                      else jnp.zeros((head,))) for t in tasks},
    }
  return tasks, grads


def hyperparameters(name: str, tasks: tuple[str, ...]) -> dict:
  """The clipping threshold, and what the methods that require hyperparameters are given."""
  n = len(tasks)
  return {"max_norm": 0.1} if name in CLIPPING[1:] else {
      "constant": {"weights": (1.0,) * n}, "krum": {"n_byzantine": 0, "n_selected": 2},
      "trimmed_mean": {"trim_number": (n - 1) // 2},
      "pcd": {"primary": tasks[0]}}.get(name, {})


def time_config(num_tasks: int, millions: float, names, rounds: int, paired: bool = False
                ) -> tuple[dict[str, float], dict[str, float]]:
  """Median seconds per method and, with ``paired``, the median over rounds of each method's
  time over that of a ``tbgc`` call made just before it (robust to load that drifts within a
  round on a shared machine)."""
  tasks, grads = make_grads(num_tasks, millions)
  params = jax.tree.map(jnp.zeros_like, grads[tasks[0]])
  mask = tbgc_jax.path_mask("^backbone/")
  compiled = {}
  for name in names:
    tx = tbgc_jax.make_method(name, mask, tasks=tasks, **hyperparameters(name, tasks))
    state = tx.init(params)
    losses = ({t: jnp.float32(1.0 + k) for k, t in enumerate(tasks)}
              if tbgc_jax.get_method(name).uses_losses else None)
    fn = lambda g, tx=tx, state=state, losses=losses: tx.update(
        g, state, params, **({"losses": losses} if losses else {}))[0]
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(grads).compile()
    jax.block_until_ready(compiled[name](grads))  # warm-up
    print(f"    compiled {name:12s} {time.perf_counter() - t0:6.1f} s", flush=True)
  times = {name: [] for name in compiled}
  ratios = {name: [] for name in compiled}

  def timed(name):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled[name](grads))
    times[name].append(time.perf_counter() - t0)
    return times[name][-1]

  for r in range(rounds):
    order = list(compiled)[r % len(compiled):] + list(compiled)[:r % len(compiled)]
    for name in order:
      if paired and "tbgc" in compiled:
        before = timed("tbgc")
        ratios[name].append(timed(name) / before)
      else:
        timed(name)
  return ({name: statistics.median(ts) for name, ts in times.items()},
          {name: statistics.median(rs) for name, rs in ratios.items() if rs})


def report(label: str, med: dict[str, float], paired: dict[str, float]) -> None:
  print(f"  {label}")
  print(f"  {'method':14s} {'median ms':>10s} {'vs none':>8s} {'vs tbgc':>8s}"
        + (f" {'paired':>8s}" if paired else ""))
  for name, t in med.items():
    vs_tbgc = f"{t / med['tbgc']:7.2f}x" if "tbgc" in med else ""
    pair = f" {paired[name]:7.2f}x" if name in paired else ""
    print(f"  {name:14s} {t * 1e3:10.1f} {t / med['none']:7.2f}x {vs_tbgc}{pair}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="3x25,2x5,4x5,8x5,16x5,3x1,3x5,3x50",
                      help="comma-separated TASKSxMILLIONS")
  parser.add_argument("--methods", default="", help="comma-separated (default: all)")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--paired", action="store_true",
                      help="time a tbgc call before each method call; ratios per pair")
  args = parser.parse_args()
  names = [n for n in args.methods.split(",") if n] or list(tbgc_jax.method_names())
  for required in ("none", "tbgc"):
    if required not in names:
      names.insert(0, required)
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"float32, {args.rounds} interleaved rounds per configuration")
  for config in args.configs.split(","):
    num_tasks, millions = config.split("x")
    med, paired = time_config(int(num_tasks), float(millions), names, args.rounds, args.paired)
    report(f"{num_tasks} tasks x {millions}M parameters", med, paired)
    ratio_of = paired if paired else {n: med[n] / med["tbgc"] for n in med}
    if (int(num_tasks), float(millions)) == (3, 25.0):
      gramian = [n for n in med if n not in CLIPPING + ELEMENTWISE]
      worst = max(gramian, key=lambda n: ratio_of[n]) if gramian else None
      if worst:
        ratio = ratio_of[worst]
        above = [n for n in gramian if ratio_of[n] > 1.3]
        print(f"  every Gramian method <= 1.3x tbgc at 3 tasks x 25M: "
              f"{'yes' if ratio <= 1.3 else 'no'} (worst {worst} {ratio:.2f}x; above: {above})")
      for name in ELEMENTWISE:
        if name in med:
          ratio = ratio_of[name]
          print(f"  {name} (elementwise, not a Gramian method): {ratio:.2f}x tbgc "
                f"({'<=' if ratio <= 1.5 else '>'} 1.5x)")


if __name__ == "__main__":
  main()
