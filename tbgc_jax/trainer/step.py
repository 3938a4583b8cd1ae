"""The train step: the paper's Algorithm 1 as jitted, sharded, donated functions.

Two forms, same results:
- ``per_task_jit`` (default): one jitted ``value_and_grad`` per task, called in sequence, then
  one jitted update (gradient method + AdamW) that takes the per-task gradients donated.
  Algorithm 1 literally: each executable holds one task's activations, on every backend, and
  compile time is the sum of the per-task compiles (XLA:CPU compiles the fused 3-head step
  superlinearly slower: over 10 minutes for the tiny config, against ~2 for this form).
- ``fused``: everything in one jit; per-task gradients by
  ``tbgc_jax.per_task_value_and_grad(..., sequential=config.grad.sequential)``.
"""

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import tbgc_jax
from tbgc_jax.models.multitask import task_filter
from tbgc_jax.trainer import sharding
from tbgc_jax.trainer.optim import nonfinite_counters

STEP_MODES = ("per_task_jit", "fused")


def _reseed(model: nnx.Module, key: jax.Array) -> None:
  """Per-step keys for the model's rng streams, which drop path draws from.

  The layers may hold the "dropout" stream or fall back to "default" (``nnx.Rngs(seed)``);
  reseeding a stream the model lacks is a no-op.
  """
  nnx.reseed(model, default=key, dropout=key)


def make_loss_fns(graphdef: nnx.GraphDef, tasks: Sequence[str], weights: dict[str, float]
                  ) -> dict[str, Callable[..., Any]]:
  """``{task: loss(params, batch, rest, rng) -> (weighted loss, metrics)}``.

  Each runs the backbone on that task's images and only that task's head; ``rng`` is the
  step's key, folded per task.
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


def accumulate(fn: Callable[[Any, jax.Array], Any], batch: Any, rng: jax.Array,
               num: int) -> Any:
  """The mean of ``fn(micro_batch, key)`` over ``num`` micro-batches, in float32.

  ``num == 1``: ``fn(batch, rng)`` itself (outputs cast to float32). Otherwise ``batch``'s
  leaves carry a leading axis of ``num`` micro-batches, run one after the other under
  ``jax.lax.scan`` (one micro-batch's activations alive at a time) with the keys
  ``fold_in(rng, i)``; every output (losses, metrics, gradients) is summed in float32, then
  divided by ``num``. For a loss that is a mean over the examples of a micro-batch, the mean
  gradient is the gradient of the mean loss over all ``num`` micro-batches.

  Examples:
    >>> import jax.numpy as jnp
    >>> f = lambda b, key: jax.grad(lambda w: jnp.mean((b * w) ** 2))(2.0)
    >>> x = jnp.arange(6.0)
    >>> bool(jnp.allclose(accumulate(f, x.reshape(3, 2), jax.random.key(0), 3),
    ...                   f(x, None)))
    True
  """
  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  if num == 1:
    return f32(fn(batch, rng))

  def body(total, xs):
    i, micro = xs
    out = f32(fn(micro, jax.random.fold_in(rng, i)))
    return jax.tree.map(jnp.add, total, out), None

  first = jax.tree.map(lambda x: x[0], batch)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                       jax.eval_shape(fn, first, rng))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num), batch))
  return jax.tree.map(lambda x: x / num, total)


def _update(state, losses, aux, grads, *, tasks, tx, schedules):
  """Non-finite policy + gradient method + optimizer + metrics; shared by both step forms."""
  params = state["params"]
  metrics = {}
  updates, opt_state = tx.update(grads, state["opt_state"], params, losses=losses)
  nonfinite = nonfinite_counters(opt_state)
  for t in tasks:
    metrics[f"{t}/dropped"] = (~nonfinite.kept[t]).astype(jnp.int32)
    metrics[f"{t}/dropped_total"] = nonfinite.count[t]
    metrics[f"{t}/dropped_streak"] = nonfinite.streak[t]
  for t, d in tbgc_jax.task_diagnostics(opt_state).items():
    metrics[f"{t}/backbone_grad_norm"] = d["backbone_norm"]
    metrics[f"{t}/backbone_grad_norm_after"] = d["backbone_norm_after"]
    metrics[f"{t}/grad_norm"] = d["total_norm"]
    metrics[f"{t}/num_nonfinite"] = d["num_nonfinite"]
  metrics.update({f"grad/{k}": v for k, v in tbgc_jax.gradient_diagnostics(opt_state).items()})
  for t in tasks:
    metrics[f"{t}/loss"] = losses[t]
    metrics.update({f"{t}/{k}": jnp.asarray(v, jnp.float32) for k, v in aux[t].items()})
  metrics["lr"] = schedules["head"](state["step"])
  metrics["backbone_lr"] = schedules["backbone"](state["step"])
  new_params = optax.apply_updates(params, updates)
  metrics["params_finite"] = tbgc_jax.all_finite(new_params).astype(jnp.int32)
  new_state = {
      "step": state["step"] + 1,
      "params": new_params,
      "opt_state": opt_state,
      "rng": state["rng"],
  }
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class PerTaskStep:
  """The ``per_task_jit`` step: Algorithm 1 as one executable per task, then the update.

  The first call compiles every executable at once, in threads (XLA compiles release the GIL),
  instead of one after the other as each is first reached; later calls run the compiled
  executables, so a step serves the shapes of its first call (the trainer's are fixed).

  Attributes:
    tasks: task order of a step.
    task_grads: ``{task: jit((params, rest, batch, rng, step) -> ((loss, aux), grads))}``;
      ``grads`` holds the leaves of ``task_filter(task)`` only (the backbone and that head).
    update: ``jit((state, {task: task_grads output}) -> (state, metrics))``, donating state.
    compiler_options: XLA options of that first compile (None: XLA's defaults).
  """

  tasks: tuple[str, ...]
  task_grads: dict[str, Callable[..., Any]]
  update: Callable[..., Any]
  compiler_options: dict | None = None
  _compiled: list = dataclasses.field(default_factory=list, repr=False, compare=False)

  def compile(self, state: dict, rest: Any, batches: dict,
              compiler_options: dict | None = None) -> "PerTaskStep":
    """Compiles the per-task functions and the update concurrently for these inputs.

    Args:
      state, rest, batches: the step's inputs (arrays or ``jax.ShapeDtypeStruct``).
      compiler_options: XLA options passed to every compile (``Lowered.compile``).

    Returns:
      A `PerTaskStep` whose ``task_grads`` and ``update`` are the compiled executables.
    """
    args = {t: (state["params"], rest, batches[t], state["rng"], state["step"])
            for t in self.tasks}
    lowered = {t: self.task_grads[t].lower(*args[t]) for t in self.tasks}
    outs = {t: jax.eval_shape(self.task_grads[t], *args[t]) for t in self.tasks}
    lowered["__update__"] = self.update.lower(state, outs)
    # One XLA:CPU compile keeps about two cores busy: more threads than cores / 2 only contend
    # (on 2 cores, one after the other was faster than all at once; docs/performance.md).
    workers = max(1, min(len(lowered), (os.cpu_count() or 2) // 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      futures = {k: pool.submit(low.compile, compiler_options) for k, low in lowered.items()}
      compiled = {k: f.result() for k, f in futures.items()}
    update = compiled.pop("__update__")
    step = PerTaskStep(self.tasks, compiled, update)
    step._compiled.append(step)  # already compiled: calls run these executables
    return step

  def warm_up(self, state: dict, rest: Any, batches: dict) -> None:
    """Compiles the step for these inputs now (arrays or ``jax.ShapeDtypeStruct`` trees with
    their shardings), unless it is compiled already; later calls run those executables."""
    if not self._compiled:
      self._compiled.append(self.compile(state, rest, batches, self.compiler_options))

  def __call__(self, state: dict, rest: Any, batches: dict) -> tuple[dict, dict]:
    self.warm_up(state, rest, batches)
    step = self._compiled[0]
    outs = {t: step.task_grads[t](state["params"], rest, batches[t], state["rng"], state["step"])
            for t in self.tasks}
    return step.update(state, outs)


def make_train_step(
    graphdef: nnx.GraphDef, tasks: Sequence[str], tx: optax.GradientTransformation,
    schedules: dict[str, optax.Schedule], config: Any, backbone_mask: Callable[[Any], Any],
    mesh: jax.sharding.Mesh, state: dict, rest: Any,
) -> Callable[[dict, Any, dict], tuple[dict, dict]]:
  """Builds the jitted ``step(state, rest, batches) -> (state, metrics)``.

  A `PerTaskStep` for ``config.grad.step_mode == "per_task_jit"``, one ``jax.jit`` for "fused"
  (``config`` checked by ``setup.validate_config``: the step mode is one of `STEP_MODES`).
  On the CPU backend the `PerTaskStep` compiles with ``config.xla_cpu_options`` (optional; see
  docs/performance.md).

  ``state`` is ``{"step", "params", "opt_state", "rng"}`` (donated; replicated
  over ``mesh``); ``rest`` the model's non-parameter state (rng streams); ``batches``
  ``{task: batch}`` sharded over the mesh's "data" axis. Randomness:
  ``fold_in(state["rng"], step)``. Metrics stay on device (no host sync inside).

  With ``config.grad_accum_steps = k > 1`` each batch leaf has a leading axis of ``k``
  micro-batches (``sharding.train_batch_sharding``): each task's loss, metrics and gradient
  are their means over the ``k`` micro-batches (`accumulate`, float32), taken before the
  gradient method; the step is one optimizer update.
  """
  tasks = tuple(tasks)
  loss_fns = make_loss_fns(graphdef, tasks, {t: float(config.loss_weights[t]) for t in tasks})
  del backbone_mask  # The gradient method in ``tx`` holds it.
  update = jax.tree_util.Partial(_update, tasks=tasks, tx=tx, schedules=schedules)
  replicated = sharding.replicated(mesh)
  accum = int(config.get("grad_accum_steps", 1))
  data = sharding.train_batch_sharding(mesh, accum)
  rep = lambda tree: jax.tree.map(lambda _: replicated, tree)

  if config.grad.step_mode == "fused":
    grad_fn = tbgc_jax.per_task_value_and_grad(
        loss_fns, has_aux=True, sequential=bool(config.grad.sequential))

    def fused(state, rest, batches):
      rng = jax.random.fold_in(state["rng"], state["step"])
      (losses, aux), grads = accumulate(
          lambda b, key: grad_fn(state["params"], b, rest, key), batches, rng, accum)
      return update(state, losses, aux, grads)

    return jax.jit(fused, in_shardings=(rep(state), rep(rest), data),
                   out_shardings=(rep(state), replicated), donate_argnums=0)

  def task_grad(task):
    # The gradient of the leaves this task reads (backbone + its head) only: the other heads'
    # parameters are unused inputs, which jit drops, so the executable is the same whatever
    # the other tasks are (the compilation cache shares it) and returns no zeros for them.
    keep = task_filter(task)

    def fn(params, rest, batch, rng, step):
      rng = jax.random.fold_in(rng, step)
      own, other = nnx.split_state(params, keep, ...)

      def micro(batch, key):
        loss = lambda own: loss_fns[task](nnx.merge_state(own, other), batch, rest, key)
        return jax.value_and_grad(loss, has_aux=True)(own)
      return accumulate(micro, batch, rng, accum)
    return jax.jit(fn, in_shardings=(rep(state["params"]), rep(rest), data, replicated,
                                     replicated), out_shardings=replicated)

  def apply(state, outs):
    losses = {t: outs[t][0][0] for t in tasks}
    aux = {t: outs[t][0][1] for t in tasks}
    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    grads = {t: nnx.merge_state(zeros, outs[t][1]) for t in tasks}
    return update(state, losses, aux, grads)

  options = config.get("xla_cpu_options") if jax.default_backend() == "cpu" else None
  return PerTaskStep(tasks, {t: task_grad(t) for t in tasks},
                     jax.jit(apply, out_shardings=(rep(state), replicated), donate_argnums=0),
                     dict(options) if options else None)
