"""The train step: the paper's Algorithm 1 in one sharded, jitted, donated function."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import tbgc_jax


def _reseed(model: nnx.Module, key: jax.Array) -> None:
  """Per-step keys for the model's "dropout" streams (drop path), if it has any."""
  has_dropout = any(
      getattr(p[-2] if len(p) > 1 else None, "key", None) == "dropout"
      or "dropout" in map(str, p)
      for p, _ in nnx.to_flat_state(nnx.state(model, nnx.RngKey)))
  if has_dropout:
    nnx.reseed(model, dropout=key)


def make_loss_fns(graphdef: nnx.GraphDef, tasks: Sequence[str], weights: dict[str, float]
                  ) -> dict[str, Callable[..., Any]]:
  """``{task: loss(params, batch, rest, rng) -> (weighted loss, metrics)}``.

  Each runs the backbone on that task's images and only that task's head.
  """

  def make(k: int, task: str):
    def loss(params, batch, rest, rng):
      # copy=True: fresh Variables owned by this trace, so drop path may advance its rng count
      # inside grad / switch traces (flax raises TraceContextError otherwise).
      model = nnx.merge(graphdef, params, rest, copy=True)
      _reseed(model, jax.random.fold_in(rng, 2 * k + 1))
      value, metrics = model.task_loss(task, batch, jax.random.fold_in(rng, 2 * k))
      return weights[task] * value, metrics
    return loss

  return {t: make(k, t) for k, t in enumerate(tasks)}


def make_train_step(
    graphdef: nnx.GraphDef, tasks: Sequence[str], tx: optax.GradientTransformation,
    schedules: dict[str, optax.Schedule], config: Any, backbone_mask: Callable[[Any], Any],
) -> Callable[[dict, Any, dict], tuple[dict, dict]]:
  """Builds ``step(state, rest, batches) -> (state, metrics)``, a pure function.

  ``state`` is ``{"step", "params", "opt_state", "rng"}``; ``rest`` the model's non-parameter
  state (rng streams); ``batches`` ``{task: batch}``. With ``config.grad.method`` other than
  "none", each task's loss and gradient are computed on its own (Algorithm 1; one task's
  activations alive at a time when ``config.grad.sequential``), then the gradient method and
  AdamW update the parameters. "none" takes one gradient of the summed loss instead.
  Randomness: ``fold_in(state["rng"], step)``. No host work: metrics stay on device.
  """
  tasks = tuple(tasks)
  weights = {t: float(config.loss_weights[t]) for t in tasks}
  loss_fns = make_loss_fns(graphdef, tasks, weights)
  method = config.grad.method
  grad_fn = tbgc_jax.per_task_value_and_grad(
      loss_fns, has_aux=True, sequential=bool(config.grad.sequential))

  def summed_grad(params, batches, rest, rng):
    def total(params):
      outs = {t: loss_fns[t](params, batches[t], rest, rng) for t in tasks}
      return sum(o[0] for o in outs.values()), outs
    (_, outs), grads = jax.value_and_grad(total, has_aux=True)(params)
    return ({t: o[0] for t, o in outs.items()}, {t: o[1] for t, o in outs.items()}), grads

  def step(state, rest, batches):
    rng = jax.random.fold_in(state["rng"], state["step"])
    params = state["params"]
    metrics = {}
    if method == "none":
      (losses, aux), grads = summed_grad(params, batches, rest, rng)
      mask = jax.tree.leaves(backbone_mask(grads))
      leaves = jax.tree.leaves(grads)
      metrics["backbone_grad_norm"] = optax.tree.norm(
          [g for g, m in zip(leaves, mask, strict=True) if m])
    else:
      (losses, aux), grads = grad_fn(params, batches, rest, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    if method != "none":
      for t, d in tbgc_jax.task_diagnostics(opt_state).items():
        metrics[f"{t}/backbone_grad_norm"] = d["backbone_norm"]
        metrics[f"{t}/backbone_grad_norm_after"] = d["backbone_norm_after"]
        metrics[f"{t}/grad_norm"] = d["total_norm"]
        metrics[f"{t}/num_nonfinite"] = d["num_nonfinite"]
    for t in tasks:
      metrics[f"{t}/loss"] = losses[t]
      metrics.update({f"{t}/{k}": jnp.asarray(v, jnp.float32) for k, v in aux[t].items()})
    metrics["lr"] = schedules["head"](state["step"])
    metrics["backbone_lr"] = schedules["backbone"](state["step"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    return new_state, metrics

  return step


def jit_train_step(step: Callable, mesh: jax.sharding.Mesh, state: dict, rest: Any):
  """jit with the state donated and replicated, batches sharded over the "data" axis."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.jit(
      step,
      in_shardings=(jax.tree.map(lambda _: replicated, state),
                    jax.tree.map(lambda _: replicated, rest), data),
      out_shardings=(jax.tree.map(lambda _: replicated, state), replicated),
      donate_argnums=0,
  )
