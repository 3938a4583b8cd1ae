"""Accuracy of the methods' float32 JAX solvers against the float64 references of the tests.

Random Jacobians (T tasks x 6 coordinates) with per-task norms spread over ``--decades``
decades; prints, per method, the median and maximum of ||ours - reference|| / ||reference||.

  python -m benchmarks.accuracy [--trials 60] [--decades 2]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import tbgc_jax
from tests import mtl_reference as ref


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=60)
  parser.add_argument("--decades", type=float, default=2.0)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  updates, errors = {}, {name: [] for name in ref.DETERMINISTIC}
  for trial in range(args.trials):
    num_tasks = (2, 3, 4)[trial % 3]
    tasks = tuple(f"t{i}" for i in range(num_tasks))
    scales = 10.0 ** rng.uniform(-args.decades / 2, args.decades / 2, size=(num_tasks, 1))
    J = (rng.normal(size=(num_tasks, 6)) * scales).astype(np.float32)
    for name, reference in ref.DETERMINISTIC.items():
      if name == "krum" and num_tasks < 3:  # needs three tasks or more
        continue
      if (name, num_tasks) not in updates:
        tx = tbgc_jax.make_method(name, tasks=tasks, **ref.hyperparameters(name, num_tasks))
        updates[name, num_tasks] = (tx, jax.jit(tx.update))
      tx, update = updates[name, num_tasks]
      out, _ = update({t: jnp.asarray(J[i]) for i, t in enumerate(tasks)}, tx.init(jnp.zeros(6)))
      want = reference(J.astype(np.float64))
      err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
      errors[name].append(err)
  print(f"{args.trials} Jacobians, 2-4 tasks x 6, task norms over {args.decades:g} decades")
  print(f"{'method':12s} {'median':>9s} {'max':>9s}")
  for name, errs in errors.items():
    print(f"{name:12s} {np.median(errs):9.1e} {np.max(errs):9.1e}")


if __name__ == "__main__":
  main()
