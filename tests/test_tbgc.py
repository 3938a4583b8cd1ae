"""Property tests of the TBGC transforms against an independent float64 numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import tbgc_jax

S = 0.1
METHODS = ("tbgc", "tbgc_backbone_only", "per_task", "backbone_clip", "vanilla")


# ---------------------------------------------------------------- float64 reference
def _norm(leaves):
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in leaves)))


def reference(method, grads, is_backbone, max_norm):
  """The paper's formulas, step by step, in float64 (grads: {task: [leaves]}); for
  "backbone_clip", the first-place code's clip by the backbone norm."""
  grads = {t: [np.asarray(x, np.float64) for x in g] for t, g in grads.items()}
  if method == "backbone_clip":
    out = [0.0] * len(is_backbone)
    for g in grads.values():
      c = min(1.0, max_norm / (_norm([x for x, bb in zip(g, is_backbone, strict=True) if bb])
                               + 1e-6))
      out = [o + x * c for o, x in zip(out, g, strict=True)]
    return out
  if method == "vanilla":
    total = [sum(g[i] for g in grads.values()) for i in range(len(is_backbone))]
    n = _norm(total)
    return [x * (min(1.0, max_norm / n) if n > 0 else 1.0) for x in total]
  out = [0.0] * len(is_backbone)
  for g in grads.values():
    n = _norm(g)
    g = [x * (min(1.0, max_norm / n) if n > 0 else 1.0) for x in g]  # per-task clip
    if method.startswith("tbgc"):
      b = _norm([x for x, bb in zip(g, is_backbone, strict=True) if bb])
      r = max_norm / b if b > 0 else 1.0
      heads_too = method == "tbgc"
      g = [x * r if (bb or heads_too) else x for x, bb in zip(g, is_backbone, strict=True)]
    out = [o + x for o, x in zip(out, g, strict=True)]
  return out


def make_tx(method, tasks, mask, max_norm=S, **kw):
  if method == "tbgc":
    return tbgc_jax.tbgc(max_norm, mask, tasks=tasks, **kw)
  if method == "tbgc_backbone_only":
    return tbgc_jax.tbgc(max_norm, mask, tasks=tasks, rescale_heads=False, **kw)
  if method == "per_task":
    return tbgc_jax.per_task_clip(max_norm, mask, tasks=tasks, **kw)
  if method == "backbone_clip":
    return tbgc_jax.backbone_clip(max_norm, mask, tasks=tasks, **kw)
  return tbgc_jax.vanilla_clip(max_norm, mask, tasks=tasks, **kw)


MASK = {"backbone": True, "heads": False}


def _tree(backbone, heads):
  return {"backbone": {f"b{i}": x for i, x in enumerate(backbone)},
          "heads": {f"h{i}": x for i, x in enumerate(heads)}}


def _leaves_flags(tree):
  flags = jax.tree.leaves(tbgc_jax.path_mask("^backbone/")(tree))
  return jax.tree.leaves(tree), flags


@st.composite
def task_gradients(draw, min_tasks=1):
  """Random trees: 1-3 backbone and 0-3 head leaves; per-task norms over 8 decades."""
  num_tasks = draw(st.integers(min_tasks, 4))
  shapes = st.lists(st.sampled_from([(3,), (2, 2), (4, 1, 2), ()]), min_size=1, max_size=3)
  bb_shapes = draw(shapes)
  head_shapes = draw(st.lists(st.sampled_from([(2,), (3, 2)]), max_size=3))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  grads = {}
  for t in range(num_tasks):
    scale = 10.0 ** draw(st.floats(-4.0, 4.0))
    grads[f"task{t}"] = _tree(
        [(rng.normal(size=s) * scale).astype(np.float32) for s in bb_shapes],
        [(rng.normal(size=s) * scale).astype(np.float32) for s in head_shapes])
  return grads


def _run(tx, grads, jit=True):
  params = jax.tree.map(jnp.zeros_like, next(iter(grads.values())))
  update = jax.jit(tx.update) if jit else tx.update
  out, state = update(grads, tx.init(params), params)
  return out, state


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=10, deadline=None)
@given(grads=task_gradients())
def test_matches_float64_reference(method, jit, grads):
  tasks = tuple(grads)
  out, _ = _run(make_tx(method, tasks, MASK), grads, jit)
  leaves = {t: jax.tree.leaves(g) for t, g in grads.items()}
  _, flags = _leaves_flags(grads[tasks[0]])
  want = reference(method, leaves, flags, S)
  for got, w in zip(jax.tree.leaves(out), want, strict=True):
    # Terms of size S cancel to ~0 in some entries: float32 rounding of S, not 1e-8, bounds them.
    np.testing.assert_allclose(np.asarray(got, np.float64), w, rtol=5e-5, atol=S * 1e-6)


@settings(max_examples=12, deadline=None)
@given(grads=task_gradients())
def test_every_task_moves_the_backbone_by_exactly_s(grads):
  tasks = tuple(grads)
  tx = tbgc_jax.tbgc(S, MASK, tasks=tasks)
  _, state = _run(tx, grads)
  for task, d in tbgc_jax.task_diagnostics(state).items():
    np.testing.assert_allclose(d["backbone_norm_after"], S, rtol=1e-5, err_msg=task)
  # Alone (the other tasks' gradients zero), each task's output has backbone norm S.
  for task in tasks:
    alone = {t: g if t == task else jax.tree.map(np.zeros_like, g) for t, g in grads.items()}
    out, _ = _run(tx, alone)
    np.testing.assert_allclose(_norm(jax.tree.leaves(out["backbone"])), S, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(grads=task_gradients(min_tasks=2), data=st.data())
def test_invariant_to_task_order(grads, data):
  tasks = tuple(grads)
  perm = data.draw(st.permutations(tasks))
  out, _ = _run(tbgc_jax.tbgc(S, MASK, tasks=tasks), grads)
  shuffled = {t: grads[t] for t in perm}
  out2, _ = _run(tbgc_jax.tbgc(S, MASK, tasks=tuple(perm)), shuffled)
  chex.assert_trees_all_equal(out, out2)  # Bitwise: tasks are summed in sorted-name order.


@settings(max_examples=12, deadline=None)
@given(grads=task_gradients(), log_c=st.floats(-3.0, 3.0))
def test_invariant_to_scaling_a_task_gradient(grads, log_c):
  tasks = tuple(grads)
  tx = tbgc_jax.tbgc(S, MASK, tasks=tasks)
  scaled = dict(grads)
  scaled[tasks[0]] = jax.tree.map(lambda x: x * np.float32(10.0**log_c), grads[tasks[0]])
  # Each task adds a backbone part of norm S: where tasks cancel, float32 rounding of terms of
  # size ~S leaves ~S * 1e-7 (atol), not an exact zero.
  chex.assert_trees_all_close(_run(tx, grads)[0], _run(tx, scaled)[0], rtol=1e-4, atol=S * 1e-6)


@settings(max_examples=12, deadline=None)
@given(grads=task_gradients(), max_norm=st.sampled_from([1e-3, 0.1, 10.0, 1e4]))
def test_one_task_without_rescale_is_clip_by_global_norm(grads, max_norm):
  g = grads["task0"]
  out, _ = _run(tbgc_jax.tbgc(max_norm, MASK, tasks=("task0",), rescale=False), {"task0": g})
  want, _ = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
  chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-10)


def _backbone_norms(grads):
  return {t: _norm(jax.tree.leaves(g["backbone"])) for t, g in grads.items()}


def _with_backbone_norms(grads, low, high, data):
  """``grads`` with each task's gradient rescaled so that its backbone norm lies in
  ``[low, high]`` (drawn log-uniformly)."""
  out = {}
  for t, g in grads.items():
    b = _norm(jax.tree.leaves(g["backbone"]))
    target = 10.0 ** data.draw(st.floats(np.log10(low), np.log10(high)))
    out[t] = jax.tree.map(lambda x, c=target / b: (x * c).astype(np.float32), g)
  return out


@settings(max_examples=4, deadline=None)
@given(grads=task_gradients(), data=st.data())
def test_backbone_clip_is_tbgc_when_every_backbone_norm_exceeds_s(grads, data):
  grads = _with_backbone_norms(grads, 2 * S, 1e4, data)
  tasks = tuple(grads)
  ours, _ = _run(tbgc_jax.backbone_clip(S, MASK, tasks=tasks), grads)
  paper, _ = _run(tbgc_jax.tbgc(S, MASK, tasks=tasks), grads)
  # Equal up to the 1e-6 added to the backbone norm (relative 1e-6 / ||B(g)|| < 5e-6 here).
  chex.assert_trees_all_close(ours, paper, rtol=2e-5, atol=S * 1e-5)


@settings(max_examples=4, deadline=None)
@given(grads=task_gradients(), data=st.data())
def test_backbone_clip_leaves_tasks_whose_backbone_norm_is_at_most_s(grads, data):
  grads = _with_backbone_norms(grads, 1e-4, S * 0.99, data)
  tasks = tuple(grads)
  tx = tbgc_jax.backbone_clip(S, MASK, tasks=tasks)
  out, state = _run(tx, grads)
  plain, _ = _run(tbgc_jax.sum_tasks(tasks=tasks), grads)
  chex.assert_trees_all_close(out, plain, rtol=1e-6, atol=1e-12)
  for d in tbgc_jax.task_diagnostics(state).values():
    assert float(d["backbone_scale"]) == float(d["head_scale"]) == 1.0


@settings(max_examples=6, deadline=None)
@given(grads=task_gradients())
def test_backbone_clip_never_scales_up(grads):
  """Per task (the float64 reference checks the update): one factor <= 1 on the whole task
  gradient, and a backbone contribution of min(||B(g_t)||, S)."""
  tasks = tuple(grads)
  _, state = _run(tbgc_jax.backbone_clip(S, MASK, tasks=tasks), grads)
  norms = _backbone_norms(grads)
  for t, d in tbgc_jax.task_diagnostics(state).items():
    assert float(d["backbone_scale"]) <= 1.0 and d["backbone_scale"] == d["head_scale"], t
    np.testing.assert_allclose(d["backbone_norm_after"], min(norms[t], S), rtol=2e-5, err_msg=t)


def test_backbone_clip_needs_a_backbone():
  params = _tree([jnp.zeros(3)], [jnp.zeros(2)])
  with pytest.raises(ValueError, match="backbone_mask is required"):
    tbgc_jax.backbone_clip(S, tasks=("a",))
  with pytest.raises(ValueError, match="selects no parameter leaf"):
    tbgc_jax.backbone_clip(S, {"backbone": False, "heads": False}, tasks=("a",)).init(params)


class VariantsTest(chex.TestCase):
  """Deterministic cases, run with and without jit through `chex.variants`."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.grads = {
        "det": _tree([rng.normal(size=(4, 3)) * 50.0, rng.normal(size=(3,))],
                     [rng.normal(size=(3, 2)) * 5.0]),
        "seg": _tree([rng.normal(size=(4, 3)) * 1e-3, rng.normal(size=(3,)) * 1e-3],
                     [rng.normal(size=(3, 2))]),
    }
    self.grads = jax.tree.map(lambda x: np.asarray(x, np.float32), self.grads)
    self.params = jax.tree.map(jnp.zeros_like, self.grads["det"])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*METHODS)
  def test_reference(self, method):
    tx = make_tx(method, ("det", "seg"), MASK)
    out, _ = self.variant(tx.update)(self.grads, tx.init(self.params), self.params)
    leaves = {t: jax.tree.leaves(g) for t, g in self.grads.items()}
    _, flags = _leaves_flags(self.grads["det"])
    for got, w in zip(jax.tree.leaves(out), reference(method, leaves, flags, S), strict=True):
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-9)

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_task_contributes_nothing(self):
    zero = jax.tree.map(np.zeros_like, self.grads["seg"])
    for method in METHODS:
      both = make_tx(method, ("det", "seg"), MASK)
      only = make_tx(method, ("det",), MASK)
      out, state = self.variant(both.update)(
          {"det": self.grads["det"], "seg": zero}, both.init(self.params), self.params)
      want, _ = only.update({"det": self.grads["det"]}, only.init(self.params), self.params)
      chex.assert_tree_all_finite((out, state))
      chex.assert_trees_all_close(out, want, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nonfinite_task_is_dropped_and_counted(self):
    bad = jax.tree.map(np.copy, self.grads["seg"])
    bad["backbone"]["b0"][0, 0] = np.nan
    bad["heads"]["h0"][0, 0] = np.inf
    for method in METHODS:
      both = make_tx(method, ("det", "seg"), MASK)
      only = make_tx(method, ("det",), MASK)
      update = self.variant(both.update)
      out, state = update({"det": self.grads["det"], "seg": bad}, both.init(self.params),
                          self.params)
      out, state = update({"det": self.grads["det"], "seg": bad}, state, self.params)
      want, _ = only.update({"det": self.grads["det"]}, only.init(self.params), self.params)
      chex.assert_trees_all_close(out, want, rtol=1e-6)
      diag = tbgc_jax.task_diagnostics(state)
      self.assertEqual(int(diag["seg"]["num_nonfinite"]), 2)
      self.assertEqual(int(diag["det"]["num_nonfinite"]), 0)
      # Without dropping, the NaN reaches the output (for a later apply_if_finite).
      keep = make_tx(method, ("det", "seg"), MASK, drop_nonfinite=False)
      out, _ = self.variant(keep.update)(
          {"det": self.grads["det"], "seg": bad}, keep.init(self.params), self.params)
      self.assertFalse(bool(jnp.all(jnp.isfinite(out["backbone"]["b0"]))))

  @chex.variants(with_jit=True, without_jit=True)
  def test_low_precision_in_low_precision_out(self):
    for dtype in (jnp.bfloat16, jnp.float16):
      # 1e3 squared overflows float16: the norms must be computed in float32.
      low = jax.tree.map(lambda x, dt=dtype: jnp.asarray(x * 20.0, dt), self.grads)
      params = jax.tree.map(lambda x, dt=dtype: jnp.zeros_like(x, dt), self.params)
      tx = tbgc_jax.tbgc(S, MASK, tasks=("det", "seg"))
      out, state = self.variant(tx.update)(low, tx.init(params), params)
      chex.assert_trees_all_equal_dtypes(out, params)
      chex.assert_tree_all_finite(out)
      high = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), low)
      want, _ = tx.update(high, tx.init(self.params), self.params)
      chex.assert_trees_all_close(jax.tree.map(lambda x: x.astype(jnp.float32), out), want,
                                  rtol=2e-2, atol=1e-4)
      for d in tbgc_jax.task_diagnostics(state).values():
        np.testing.assert_allclose(d["backbone_norm_after"], S, rtol=1e-5)

  def test_no_retrace_on_second_call(self):
    tx = tbgc_jax.tbgc(S, MASK, tasks=("det", "seg"))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(grads, state):
      return tx.update(grads, state)

    state = tx.init(self.params)
    for _ in range(3):
      _, state = step(self.grads, state)


# ---------------------------------------------------------------- composition
def test_chain_with_adamw_and_diagnostics_under_jit():
  params = {"backbone": {"w": jnp.ones((4,))}, "heads": {"a": jnp.ones(2), "b": jnp.ones(3)}}

  def loss_a(p, x):
    return jnp.sum((p["backbone"]["w"] * x) ** 2) + jnp.sum(p["heads"]["a"] ** 2)

  def loss_b(p, x):
    return 1e-4 * jnp.sum(p["backbone"]["w"] * x) + jnp.sum(p["heads"]["b"])

  grad_fn = tbgc_jax.per_task_value_and_grad({"a": loss_a, "b": loss_b})
  tx = optax.chain(tbgc_jax.tbgc(S, tbgc_jax.path_mask("^backbone/"), tasks=("a", "b")),
                   optax.adamw(1e-2))

  @jax.jit
  def step(params, opt_state, batches):
    losses, grads = grad_fn(params, batches)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses

  opt_state = tx.init(params)
  batches = {"a": jnp.full((4,), 30.0), "b": jnp.ones((4,))}
  for _ in range(3):
    params, opt_state, losses = step(params, opt_state, batches)
  diag = tbgc_jax.task_diagnostics(opt_state)
  # Before: the two tasks' backbone gradients differ by many orders of magnitude ...
  assert float(diag["a"]["backbone_norm"]) > 1e5 * float(diag["b"]["backbone_norm"])
  # ... after: both contribute exactly S to the backbone.
  for d in diag.values():
    np.testing.assert_allclose(d["backbone_norm_after"], S, rtol=1e-5)
  assert set(losses) == {"a", "b"}


def test_apply_if_finite_after_tbgc_skips_nonfinite_steps():
  params = _tree([jnp.ones(3)], [jnp.ones(2)])
  tx = optax.chain(
      tbgc_jax.tbgc(S, MASK, tasks=("a", "b"), drop_nonfinite=False),
      optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=5))
  good = _tree([jnp.ones(3)], [jnp.ones(2)])
  bad = _tree([jnp.array([np.nan, 0.0, 0.0])], [jnp.ones(2)])
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = update({"a": good, "b": bad}, state, params)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert int(state[1].notfinite_count) == 1
  updates, state = update({"a": good, "b": good}, state, params)
  assert float(jnp.abs(updates["backbone"]["b0"]).sum()) > 0


def test_multisteps_after_tbgc_averages_the_clipped_sums():
  params = _tree([jnp.zeros(3)], [jnp.zeros(2)])
  inner = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  tx = optax.chain(tbgc_jax.tbgc(S, MASK, tasks=("a", "b")), inner.gradient_transformation())
  rng = np.random.default_rng(3)
  steps = [{t: _tree([rng.normal(size=3).astype(np.float32)],
                     [rng.normal(size=2).astype(np.float32)]) for t in "ab"} for _ in range(2)]
  bare = tbgc_jax.tbgc(S, MASK, tasks=("a", "b"))
  clipped = [bare.update(g, bare.init(params))[0] for g in steps]
  update = jax.jit(tx.update)
  state = tx.init(params)
  first, state = update(steps[0], state, params)
  chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, params))
  second, state = update(steps[1], state, params)
  want = jax.tree.map(lambda x, y: -(x + y) / 2, *clipped)
  chex.assert_trees_all_close(second, want, rtol=1e-6)


def test_inject_hyperparams_schedules_max_norm():
  params = _tree([jnp.zeros(3)], [jnp.zeros(2)])
  schedule = optax.linear_schedule(1.0, 0.1, transition_steps=4)
  tx = optax.inject_hyperparams(tbgc_jax.tbgc, static_args=("backbone_mask", "tasks"))(
      max_norm=schedule, backbone_mask=MASK, tasks=("a",))
  g = {"a": _tree([jnp.ones(3)], [jnp.ones(2)])}
  update = jax.jit(tx.update)
  state = tx.init(params)
  for step in range(5):
    out, state = update(g, state, params)
    np.testing.assert_allclose(_norm(jax.tree.leaves(out["backbone"])), schedule(step),
                               rtol=1e-5)


def test_sharded_gradients_give_identical_results():
  devices = np.array(jax.devices())
  assert len(devices) == 8, "conftest sets eight CPU devices"
  mesh = jax.sharding.Mesh(devices, ("data",))
  rng = np.random.default_rng(4)
  grads = {t: _tree([rng.normal(size=(16, 8)).astype(np.float32) * 10.0**k],
                    [rng.normal(size=(8, 4)).astype(np.float32)]) for k, t in enumerate("abc")}
  sharded = jax.device_put(
      grads, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  params = jax.tree.map(jnp.zeros_like, grads["a"])
  for method in METHODS:
    tx = make_tx(method, tuple(grads), MASK)
    update = jax.jit(tx.update)
    want, want_state = update(grads, tx.init(params), params)
    got, got_state = update(sharded, tx.init(params), params)
    assert len(got["backbone"]["b0"].sharding.device_set) == 8
    # Equal up to float32 reduction order across shards.
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-5)


# ---------------------------------------------------------------- errors and helpers
def test_mask_without_backbone_fails_at_init():
  params = _tree([jnp.zeros(3)], [jnp.zeros(2)])
  with pytest.raises(ValueError, match="selects no parameter leaf"):
    tbgc_jax.tbgc(S, {"backbone": False, "heads": False}, tasks=("a",)).init(params)
  with pytest.raises(ValueError, match="selects no parameter leaf"):
    tbgc_jax.tbgc(S, tbgc_jax.path_mask("^trunk/"), tasks=("a",)).init(params)


def test_mask_of_the_wrong_shape_fails_clearly():
  params = _tree([jnp.zeros(3)], [jnp.zeros(2)])
  with pytest.raises(ValueError, match="does not match the parameter tree"):
    tbgc_jax.tbgc(S, {"trunk": True}, tasks=("a",)).init(params)


def test_mismatched_task_trees_fail_at_trace_time():
  params = _tree([jnp.zeros(3)], [jnp.zeros(2)])
  tx = tbgc_jax.tbgc(S, MASK, tasks=("a", "b"))
  state = tx.init(params)
  good = _tree([jnp.ones(3)], [jnp.ones(2)])
  with pytest.raises(ValueError, match="task 'b' does not match params"):
    jax.jit(tx.update)({"a": good, "b": _tree([jnp.ones(3)], [])}, state, params)
  with pytest.raises(ValueError, match=r"expected exactly \['a', 'b'\]"):
    tx.update({"a": good}, state, params)
  with pytest.raises(ValueError, match=r"tasks \['backbone', 'heads'\].*must map each task"):
    tx.update(good, state, params)
  with pytest.raises(TypeError, match="mapping task name"):
    tx.update([good, good], state, params)
  with pytest.raises(ValueError, match="distinct names"):
    tbgc_jax.tbgc(S, MASK, tasks=("a", "a"))


def test_path_mask_on_nnx_state():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.backbone = nnx.Linear(2, 3, rngs=rngs)
      self.heads = nnx.Dict({"cls": nnx.Linear(3, 4, rngs=rngs)})

  _, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  mask = tbgc_jax.path_mask("^backbone/")(params)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): m
          for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat == {"backbone/bias/value": True, "backbone/kernel/value": True,
                  "heads/cls/bias/value": False, "heads/cls/kernel/value": False}
  tx = tbgc_jax.tbgc(S, tbgc_jax.path_mask("^backbone/"), tasks=("cls",))
  grads = jax.tree.map(jnp.ones_like, params)
  out, _ = jax.jit(tx.update)({"cls": grads}, tx.init(params), params)
  np.testing.assert_allclose(_norm(jax.tree.leaves(out["backbone"])), S, rtol=1e-6)


def test_many_small_leaves_lower_to_few_reductions():
  """XLA:CPU compiles each reduction kernel separately: one per leaf took minutes to compile
  for a real model (~400 leaves x 3 tasks). Small leaves must share one reduction."""
  params = _tree([jnp.zeros((7,)) for _ in range(150)], [jnp.zeros((3,)) for _ in range(150)])
  grads = {t: params for t in ("a", "b", "c")}
  for method in METHODS:
    tx = make_tx(method, ("a", "b", "c"), MASK)
    hlo = jax.jit(tx.update).lower(grads, tx.init(params), params).as_text()
    assert hlo.count("stablehlo.reduce") <= 8, (method, hlo.count("stablehlo.reduce"))


def test_all_finite_is_exact_and_lowers_to_few_reductions():
  params = _tree([jnp.zeros((7,)) for _ in range(150)], [jnp.zeros((3,)) for _ in range(150)])
  params["big"] = jnp.zeros((1 << 16,))
  hlo = jax.jit(tbgc_jax.all_finite).lower(params).as_text()
  assert hlo.count("stablehlo.reduce") <= 2, hlo.count("stablehlo.reduce")
  assert bool(tbgc_jax.all_finite(params))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    for key in ("big", "backbone"):
      tree = dict(params)
      if key == "big":
        tree["big"] = params["big"].at[-1].set(bad)
      else:
        tree["backbone"] = {**params["backbone"], "b9": params["backbone"]["b9"].at[3].set(bad)}
      assert not bool(tbgc_jax.all_finite(tree)), (bad, key)
  # Large but finite values are finite (no overflow, unlike a sum of squares).
  assert bool(tbgc_jax.all_finite({"x": jnp.full((3,), 3e38, jnp.float32)}))
