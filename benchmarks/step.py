"""Train-step time of the gradient methods, and the memory of Algorithm 1, side by side.

  python -m benchmarks.step --config configs/tiny.py [--rounds 7] [--steps 3]
  python -m benchmarks.step --config configs/challenge.py:/data --parts=time   # on a GPU

Time: the trainer's step (``config.grad.step_mode``, default "per_task_jit") built once per
method (none / vanilla / tbgc) on the same model, initial parameters and batches; rounds
interleave the methods so machine noise hits them alike. Prints median seconds per step and
ratios. The methods differ only in the update, so on a CPU (where the forward/backward dominate)
the ratios sit near 1; ``benchmarks/transform.py`` times the update alone.

Memory: ``jit(...).lower(...).compile().memory_analysis()`` of
- each single-task training step of the same model (one task's loss, its gradient, AdamW);
- the summed-loss step (gradient of the sum of the task losses, the "none" baseline): XLA sees
  every task's activations in one backward pass;
- the per-task step of the trainer (Algorithm 1): "per_task_jit" is one executable per task,
  then the update; its peak is the largest phase (state + batches + gradients already computed
  + that executable's temporaries and outputs). "fused sequential" and "fused plain" are the
  one-jit forms (``tbgc_jax.per_task_value_and_grad(sequential=True/False)``).
The bound checked: per-task step <= 1.1 x (largest single-task step + (tasks - 1) gradient
accumulators of the parameters' size).

On CPU the memory compiles use ``xla_backend_optimization_level=0`` and
``xla_llvm_disable_expensive_passes``: buffer assignment (what memory_analysis reports) runs
before LLVM, so the figures are those of a default compile, and the 3-task one-jit steps compile
in about a minute instead of not finishing in ten.
"""

import copy
import os
import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags


def _define_flags() -> None:
  """Defined when run as a script only: benchmarks/compile.py imports this module's helpers."""
  global _CONFIG, _PARTS, _ROUNDS, _STEPS, _METHODS, _FUSED
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Trainer config file.")
  _PARTS = flags.DEFINE_list("parts", ["time", "memory"], "time, memory or both.")
  _ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved rounds (time).")
  _STEPS = flags.DEFINE_integer("steps", 3, "Steps per method per round (time).")
  _METHODS = flags.DEFINE_list("methods", ["none", "vanilla", "tbgc"], "Gradient methods (time).")
  _FUSED = flags.DEFINE_bool("fused", True, "Also compile the one-jit per-task steps (memory).")

MiB = 2**20


def _with(config, **fields):
  """A copy of ``config`` with dotted fields replaced (``grad__method="none"``)."""
  c = copy.deepcopy(config)
  c.unlock()
  for key, value in fields.items():
    *path, last = key.split("__")
    node = c
    for p in path:
      node = node[p]
    node[last] = value
  return c


def _batches(setup, n: int = 2):
  """``n`` fixed training batches per task, on device, sharded as the trainer shards them."""
  from tbgc_jax.data import pipeline
  from tbgc_jax.tasks import get_task
  from tbgc_jax.trainer.sharding import global_batch

  out = []
  its = {t: pipeline.train_iterator(setup.config.data[t], get_task(t).data, seed=0, num_epochs=1,
                                    batch_size=setup.local_batch_size(t))
         for t in setup.tasks}
  for _ in range(n):
    out.append({t: global_batch(next(it), setup.data_sharding) for t, it in its.items()})
  return out


def _state(setup, tx, params=None):
  import jax
  import jax.numpy as jnp

  params = jax.tree.map(jnp.copy, setup.params) if params is None else params
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": jax.jit(tx.init)(params), "rng": jax.random.PRNGKey(0)}
  return jax.device_put(state, setup.replicated)


def _build(setup, config, tasks=None):
  """(step, state) of the trainer for ``config`` on ``setup``'s model, training ``tasks``."""
  from tbgc_jax.models.multitask import backbone_mask
  from tbgc_jax.trainer.optim import make_optimizer
  from tbgc_jax.trainer.step import make_train_step

  tasks = tuple(tasks or setup.tasks)
  tx, schedules = make_optimizer(config, tasks, backbone_mask, 1000, 100)
  state = _state(setup, tx)
  step = make_train_step(setup.graphdef, tasks, tx, schedules, config, backbone_mask,
                         setup.mesh, state, setup.rest)
  return step, state


def time_methods(config) -> None:
  import jax

  from tbgc_jax.trainer.setup import Setup

  setup = Setup(config)
  batches = _batches(setup)
  runs = {}
  for method in _METHODS.value:
    t0 = time.perf_counter()
    step, state = _build(setup, _with(config, grad__method=method))
    for b in batches:  # compile + warm up
      state, _ = step(state, setup.rest, b)
    jax.block_until_ready(state)
    runs[method] = [step, state, []]
    print(f"  built {method:8s} in {time.perf_counter() - t0:6.1f} s", flush=True)

  methods = list(runs)
  for r in range(_ROUNDS.value):
    order = methods[r % len(methods):] + methods[:r % len(methods)]
    for method in order:
      step, state, times = runs[method]
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      for i in range(_STEPS.value):
        state, metrics = step(state, setup.rest, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - t0) / _STEPS.value)
      runs[method][1] = state

  med = {m: statistics.median(runs[m][2]) for m in methods}
  print(f"\nstep time, {config.grad.step_mode}, median of {_ROUNDS.value} rounds x "
        f"{_STEPS.value} steps ({jax.devices()[0].device_kind}, {jax.device_count()} device(s))")
  for m in methods:
    spread = max(runs[m][2]) - min(runs[m][2])
    print(f"  {m:8s} {med[m] * 1e3:9.1f} ms/step   (spread {spread * 1e3:.1f} ms)")
  if "tbgc" in med and "vanilla" in med:
    print(f"  tbgc / vanilla = {med['tbgc'] / med['vanilla']:.3f}   (goal <= 1.05)")
  if "none" in med:
    for m in methods:
      if m != "none":
        print(f"  {m} / none = {med[m] / med['none']:.3f}")


def _peak(compiled) -> dict:
  m = compiled.memory_analysis()
  arg, out = m.argument_size_in_bytes, m.output_size_in_bytes
  temp, alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  return {"arg": arg, "out": out, "temp": temp, "alias": alias, "peak": arg + out + temp - alias}


def _nbytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory(config) -> None:
  import jax
  import optax

  from tbgc_jax.models.multitask import backbone_mask
  from tbgc_jax.trainer.optim import make_optimizer
  from tbgc_jax.trainer.setup import Setup
  from tbgc_jax.trainer.step import make_loss_fns

  options = {}
  if jax.default_backend() == "cpu":
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

  def compile_(jitted, *args):
    t0 = time.perf_counter()
    c = jitted.lower(*args).compile(compiler_options=options)
    return c, time.perf_counter() - t0

  setup = Setup(config)
  tasks = setup.tasks
  batches = _batches(setup, 1)[0]
  param_bytes = _nbytes(setup.params)
  rows = []

  # Single-task training steps of the same model: one task's loss and gradient, then AdamW.
  single = {}
  for t in tasks:
    cfg = _with(config, grad__method="none", grad__step_mode="fused")
    step, state = _build(setup, cfg, (t,))
    c, secs = compile_(step, state, setup.rest, {t: batches[t]})
    single[t] = _peak(c)
    rows.append((f"single-task step ({t})", single[t]["peak"], secs))

  # The summed-loss step: gradient of sum_t loss_t, then AdamW (the "none" baseline).
  cfg = _with(config, grad__method="none")
  tx, _ = make_optimizer(cfg, tasks, backbone_mask, 1000, 100)
  state = _state(setup, tx)
  loss_fns = make_loss_fns(setup.graphdef, tasks, {t: float(cfg.loss_weights[t]) for t in tasks})

  def summed_step(state, rest, batches):
    rng = jax.random.fold_in(state["rng"], state["step"])

    def total(params):
      return sum(loss_fns[t](params, batches[t], rest, rng)[0] for t in tasks)

    loss, grads = jax.value_and_grad(total)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {**state, "step": state["step"] + 1, "opt_state": opt_state,
            "params": optax.apply_updates(state["params"], updates)}, loss

  c, secs = compile_(jax.jit(summed_step, donate_argnums=0), state, setup.rest, batches)
  summed = _peak(c)
  rows.append(("summed-loss step (none)", summed["peak"], secs))

  # Algorithm 1, per_task_jit: phases run one after another; gradients of earlier tasks stay.
  cfg = _with(config, grad__method="tbgc", grad__step_mode="per_task_jit")
  step, state = _build(setup, cfg)
  state_bytes = _nbytes(state) + _nbytes(setup.rest) + _nbytes(batches)
  held, phases, secs = 0, [], 0.0
  outs = {}
  for t in tasks:
    args = (state["params"], setup.rest, batches[t], state["rng"], state["step"])
    c, s = compile_(step.task_grads[t], *args)
    secs += s
    p = _peak(c)
    phases.append(state_bytes + held + p["temp"] + p["out"])
    held += p["out"]
    outs[t] = jax.eval_shape(step.task_grads[t], *args)
  c, s = compile_(step.update, state, outs)
  secs += s
  p = _peak(c)
  phases.append(state_bytes + held + p["temp"] + p["out"] - p["alias"])
  per_task = max(phases)
  rows.append(("per-task step (per_task_jit, tbgc)", per_task, secs))

  fused = {}
  if _FUSED.value:
    for sequential in (True, False):
      cfg = _with(config, grad__method="tbgc", grad__step_mode="fused",
                  grad__sequential=sequential)
      step, state = _build(setup, cfg)
      c, secs = compile_(step, state, setup.rest, batches)
      name = "sequential" if sequential else "plain"
      fused[name] = _peak(c)["peak"]
      rows.append((f"per-task step (fused {name}, tbgc)", fused[name], secs))

  largest = max(single, key=lambda t: single[t]["peak"])
  bound = single[largest]["peak"] + (len(tasks) - 1) * param_bytes
  print(f"\npeak memory from memory_analysis ({jax.devices()[0].device_kind}); "
        f"parameters {param_bytes / MiB:.1f} MiB")
  for name, peak, secs in rows:
    print(f"  {name:38s} {peak / MiB:9.1f} MiB   (compiled in {secs:5.1f} s)")
  print(f"  largest single-task step ({largest}) + {len(tasks) - 1} gradient accumulators = "
        f"{bound / MiB:.1f} MiB")
  print(f"  per_task_jit / that = {per_task / bound:.3f}   (goal <= 1.10)")
  for name, peak in fused.items():
    print(f"  fused {name} / that = {peak / bound:.3f}")
  print(f"  summed-loss / largest single-task = {summed['peak'] / single[largest]['peak']:.3f}")
  print(f"  per_task_jit / summed-loss = {per_task / summed['peak']:.3f}")


def main(argv):
  del argv
  import jax

  # The per-task gradient executables are the same for every method: compile them once.
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp())
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  config = _CONFIG.value
  unknown = set(_PARTS.value) - {"time", "memory"}
  if unknown:
    raise app.UsageError(f"--parts takes time and/or memory, got {sorted(unknown)}")
  if "time" in _PARTS.value:
    time_methods(config)
  if "memory" in _PARTS.value:
    memory(config)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
