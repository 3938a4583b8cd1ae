"""The per-task step compiles its executables concurrently and computes what the jits do."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from tbgc_jax.models.multitask import backbone_mask
from tbgc_jax.models.rngs import construction_rngs
from tbgc_jax.trainer.model_factory import build_model
from tbgc_jax.trainer.optim import make_optimizer
from tbgc_jax.trainer.setup import train_batch_shapes
from tbgc_jax.trainer.step import PerTaskStep, make_loss_fns, make_train_step
from tests import micro_config

_TASKS = ("det", "cls")


class _Toy(nnx.Module):
  """A shared layer and one head per task, with the multi-task model's ``task_loss``."""

  def __init__(self, rngs, extra_head=False, noise=0.1):
    self.noise = noise
    self.backbone = nnx.Linear(3, 4, rngs=rngs)
    heads = {"det": nnx.Linear(4, 2, rngs=rngs), "cls": nnx.Linear(4, 1, rngs=rngs)}
    if extra_head:  # a head no task of the step uses
      heads["pose"] = nnx.Linear(4, 7, rngs=rngs)
    self.heads = nnx.Dict(heads)

  def task_loss(self, task, batch, rng):
    y = self.heads[task](jnp.tanh(self.backbone(batch["x"])))
    noise = jax.random.normal(rng, y.shape) * self.noise
    return jnp.mean((y + noise) ** 2), {"mean": jnp.mean(y)}


def _setup(extra_head=False, noise=0.1, rows=2, step_mode="per_task_jit", **fields):
  config = tiny.get_config()
  config.tasks = _TASKS
  config.grad.step_mode = step_mode
  config.update(fields)
  model = _Toy(nnx.Rngs(0), extra_head, noise)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, schedules = make_optimizer(config, _TASKS, backbone_mask, 100, 10)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": tx.init(params), "rng": jax.random.PRNGKey(0)}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  step = make_train_step(graphdef, _TASKS, tx, schedules, config, backbone_mask, mesh, state,
                         rest)
  rng = np.random.default_rng(0)
  batches = {t: {"x": jnp.asarray(rng.normal(size=(rows, 3)), jnp.float32)} for t in _TASKS}
  return step, state, rest, batches


def test_concurrent_compile_equals_the_jitted_functions():
  step, state, rest, batches = _setup()
  assert isinstance(step, PerTaskStep)
  copy = lambda s: jax.tree.map(jnp.copy, s)
  # Reference: the per-task jits, one after the other, then the jitted update.
  ref_state = copy(state)
  outs = {t: step.task_grads[t](ref_state["params"], rest, batches[t], ref_state["rng"],
                                ref_state["step"]) for t in _TASKS}
  want, want_metrics = step.update(ref_state, outs)
  got, metrics = step(copy(state), rest, batches)  # first call: concurrent AOT compile
  compiled = step._compiled[0]
  assert all(isinstance(f, jax.stages.Compiled) for f in compiled.task_grads.values())
  assert isinstance(compiled.update, jax.stages.Compiled)
  for a, b in zip(jax.tree.leaves((want, want_metrics)), jax.tree.leaves((got, metrics)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # Later calls reuse the executables (no compile), and they are for fixed shapes only.
  got2, _ = step(got, rest, batches)
  assert step._compiled[0] is compiled and int(got2["step"]) == 2
  wider = {t: {"x": jnp.zeros((3, 3))} for t in _TASKS}
  with pytest.raises((TypeError, ValueError)):
    step(got2, rest, wider)


def test_xla_cpu_options_reach_the_compile():
  fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  step = _setup(xla_cpu_options=fast)[0]
  assert step.compiler_options == (fast if jax.default_backend() == "cpu" else None)
  assert _setup()[0].compiler_options is None


def test_a_task_executable_reads_and_differentiates_only_its_own_leaves():
  step, state, rest, batches = _setup()
  (loss, _), grads = step.task_grads["det"](state["params"], rest, batches["det"], state["rng"],
                                            state["step"])
  # Its gradient: the backbone and the det head, nothing of the cls head.
  assert set(grads.keys()) == {"backbone", "heads"} and set(grads["heads"].keys()) == {"det"}
  assert np.isfinite(loss)
  # The update sees params-shaped gradients: zeros on the cls head for the det task.
  outs = {t: step.task_grads[t](state["params"], rest, batches[t], state["rng"], state["step"])
          for t in _TASKS}
  new_state, _ = step.update(jax.tree.map(jnp.copy, state), outs)
  assert jax.tree.structure(new_state["params"]) == jax.tree.structure(state["params"])
  # The cls head moves: its gradient came through.
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["params"], new_state["params"])
  assert all(jax.tree.leaves(moved["heads"]["cls"]))
  # Heads no task of the step reads are unused inputs that jit drops: the det executable is
  # the same program with or without them, so one compilation cache entry serves both.
  other, other_state, other_rest, _ = _setup(extra_head=True)
  text = lambda s, st, r: s.task_grads["det"].lower(
      st["params"], r, batches["det"], st["rng"], st["step"]).as_text()
  assert text(step, state, rest) == text(other, other_state, other_rest)


def test_k_micro_batches_give_the_gradients_and_update_of_one_batch_of_k_rows():
  # One batch of 6 rows against 3 micro-batches of 2 (deterministic loss: no noise draw).
  # The "fused" step runs the same `accumulate` (its doctest).
  whole, state, rest, batches = _setup(noise=0.0, rows=6)
  accum, state_k, rest_k, _ = _setup(noise=0.0, rows=6, grad_accum_steps=3)
  micro = jax.tree.map(lambda x: x.reshape(3, 2, *x.shape[1:]), batches)
  for t in _TASKS:
    args = (state["params"], rest, batches[t], state["rng"], state["step"])
    (loss, _), grads = whole.task_grads[t](*args)
    (loss_k, _), grads_k = accum.task_grads[t](*args[:2], micro[t], *args[3:])
    np.testing.assert_allclose(loss_k, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads_k, grads)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads_k))
  want, metrics = whole(state, rest, batches)
  got, metrics_k = accum(state_k, rest_k, micro)
  assert int(got["step"]) == int(want["step"]) == 1  # one update for the k micro-batches
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got["params"], want["params"])
  for key in ("det/loss", "cls/loss", "task/det/grad_norm", "task/cls/backbone_grad_norm"):
    np.testing.assert_allclose(metrics_k[key], metrics[key], rtol=1e-5)


def _matmul_dtypes(jaxpr) -> collections.Counter:
  """Output dtypes of the matmuls and convolutions of a jaxpr (its sub-jaxprs included)."""
  ops = re.findall(r"(\w+)\[[\d,]*\] = (?:dot_general|conv_general_dilated)\b", str(jaxpr))
  return collections.Counter(ops)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_precision_is_the_compute_dtype_and_everything_else_stays_float32(precision):
  config = micro_config.get_config("cls")
  config.precision = precision
  model = nnx.eval_shape(lambda: build_model(config, rngs=construction_rngs(0)))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss = make_loss_fns(graphdef, ("cls",), {"cls": 1.0})["cls"]
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  batch = train_batch_shapes(config, mesh)["cls"]
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  args = (params, batch, rest, jax.random.key(0))
  (value, _), grads = jax.eval_shape(grad_fn, *args)
  tx, _ = make_optimizer(config, ("cls",), backbone_mask, 10, 5)
  opt_state = jax.eval_shape(tx.init, params)
  floats = lambda tree: {x.dtype for x in jax.tree.leaves(tree)
                         if jnp.issubdtype(x.dtype, jnp.floating)}
  # Master weights: parameters, gradients, optimizer state and the loss in float32.
  assert floats(params) == floats(grads) == floats(opt_state) == {jnp.dtype(jnp.float32)}
  assert value.dtype == jnp.float32
  dtypes = _matmul_dtypes(jax.make_jaxpr(grad_fn)(*args))
  if precision == "float32":
    assert set(dtypes) == {"f32"}
  else:  # the layers' matmuls and convolutions (forward and backward) in bf16
    assert dtypes["bf16"] > 20 * dtypes["f32"], dtypes


def test_without_own_head_grads_each_task_differentiates_the_whole_tree_to_the_same_update():
  """The natural form (accelerators' default) and the CPU workaround give the same step."""
  import ml_collections
  runs = {}
  for own in (True, False):
    backend = ml_collections.ConfigDict({"own_head_grads": own, "flat_update": False})
    step, state, rest, batches = _setup(extra_head=True, backend=backend)
    (_, _), grads = step.task_grads["det"](state["params"], rest, batches["det"], state["rng"],
                                           state["step"])
    runs[own] = step(state, rest, batches), grads
  # Natural form: the whole parameter tree, zeros on the heads det does not read.
  full = runs[False][1]
  assert jax.tree.structure(full) == jax.tree.structure(runs[True][0][0]["params"])
  assert all(not jnp.any(g) for g in jax.tree.leaves(full["heads"]["pose"]))
  assert set(runs[True][1]["heads"].keys()) == {"det"}
  (got, got_m), (want, want_m) = runs[False][0], runs[True][0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (got["params"], got_m), (want["params"], want_m))
