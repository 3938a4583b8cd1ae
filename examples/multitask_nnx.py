"""TBGC in an ordinary Flax NNX training loop: one shared trunk, three heads, three datasets.

The three tasks' losses live on very different scales, so with a plain summed gradient the
trunk would follow the loudest task. `tbgc_jax.tbgc` clips each task's gradient and rescales
its trunk part to norm S, so each task moves the trunk equally. The loop prints, per task,
the trunk ("backbone") gradient norm before and after TBGC, and the losses.

  python examples/multitask_nnx.py [--steps 300]
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import tbgc_jax

TASKS = ("wave", "sign", "tiny")


class MultiHeadMLP(nnx.Module):
  """A shared trunk and one linear head per task."""

  def __init__(self, dim_in: int, width: int, *, rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(
        nnx.Linear(dim_in, width, rngs=rngs), nnx.gelu,
        nnx.Linear(width, width, rngs=rngs), nnx.gelu)
    self.heads = nnx.Dict({t: nnx.Linear(width, 1, rngs=rngs) for t in TASKS})

  def __call__(self, x, task: str):
    return self.heads[task](self.trunk(x))[:, 0]


def make_batch(key, task: str, batch: int = 64, dim: int = 8):
  """Each task has its own inputs and targets; their losses differ by orders of magnitude."""
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (batch, dim))
  w = jax.random.normal(jax.random.key(TASKS.index(task)), (dim,))  # fixed per task
  if task == "wave":  # large-scale regression: huge gradients
    y = 10.0 * jnp.sin(x @ w)
  elif task == "sign":  # classification target in {0, 1}
    y = (x @ w > 0).astype(jnp.float32)
  else:  # small-scale regression: tiny gradients
    y = 0.01 * jnp.cos(x @ w)
  del kw
  return x, y


def loss_fn(task: str, graphdef):
  def loss(params, batch):
    x, y = batch
    pred = nnx.merge(graphdef, params)(x, task)
    if task == "sign":
      return optax.sigmoid_binary_cross_entropy(pred, y).mean()
    return jnp.mean((pred - y) ** 2)
  return loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--max-norm", type=float, default=0.1)
  args = parser.parse_args()

  model = MultiHeadMLP(8, 64, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  # The three lines that matter: per-task grads, TBGC on the trunk, then any optimizer.
  grad_fn = tbgc_jax.per_task_value_and_grad({t: loss_fn(t, graphdef) for t in TASKS})
  tx = optax.chain(
      tbgc_jax.tbgc(args.max_norm, tbgc_jax.path_mask("^trunk/"), tasks=TASKS),
      optax.adamw(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    batches = {t: make_batch(jax.random.fold_in(key, i), t) for i, t in enumerate(TASKS)}
    losses, grads = grad_fn(params, batches)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses

  key = jax.random.key(1)
  first = None
  for i in range(args.steps):
    params, opt_state, losses = step(params, opt_state, jax.random.fold_in(key, i))
    if first is None:
      first = {t: float(v) for t, v in losses.items()}
    if i % max(1, args.steps // 6) == 0 or i == args.steps - 1:
      diag = tbgc_jax.method_diagnostics(opt_state)
      cells = "  ".join(
          f"{t}: loss {float(losses[t]):9.4f} trunk |g| "
          f"{float(diag[f'task/{t}/backbone_grad_norm']):9.3g}"
          f" -> {float(diag[f'task/{t}/backbone_grad_norm_after']):.3g}" for t in TASKS)
      print(f"step {i:4d}  {cells}")
  last = {t: float(v) for t, v in losses.items()}
  print("loss first -> last: " + ", ".join(f"{t} {first[t]:.4g} -> {last[t]:.4g}" for t in TASKS))


if __name__ == "__main__":
  main()
