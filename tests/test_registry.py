"""The gradient-method registry, the `none` baseline as a transform, and the trainer's use of
both (one table of names, factories and checks)."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import tbgc_jax
from tbgc_jax.trainer.optim import make_optimizer, method_hyperparameters

MASK = {"backbone": True, "heads": False}
TASKS = ("a", "b")


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  return {t: {"backbone": jnp.asarray(rng.normal(size=(3, 2)) * 10.0**k, jnp.float32),
              "heads": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
          for k, t in enumerate(TASKS)}


def _params():
  return {"backbone": jnp.zeros((3, 2)), "heads": jnp.zeros(2)}


def test_the_clipping_methods_and_none_are_registered():
  assert {"none", "vanilla", "tbgc_star", "tbgc"} <= set(tbgc_jax.method_names())
  assert tbgc_jax.method_names() == tuple(sorted(tbgc_jax.method_names()))
  tbgc = tbgc_jax.get_method("tbgc")
  assert tbgc.factory is tbgc_jax.tbgc
  assert tbgc.required == ("max_norm",)
  assert {"max_norm", "rescale_heads", "drop_nonfinite"} <= set(tbgc.hyperparameters)


@pytest.mark.parametrize("name,factory,hparams", [
    ("tbgc", tbgc_jax.tbgc, {"max_norm": 0.1, "rescale_heads": False}),
    ("tbgc_star", tbgc_jax.per_task_clip, {"max_norm": 0.1}),
    ("backbone_clip", tbgc_jax.backbone_clip, {}),
    ("vanilla", tbgc_jax.vanilla_clip, {"max_norm": 0.1}),
    ("none", tbgc_jax.sum_tasks, {}),
])
def test_make_method_builds_the_factory_and_ignores_losses(name, factory, hparams):
  direct = factory(backbone_mask=MASK, tasks=TASKS, **hparams)
  tx = tbgc_jax.make_method(name, MASK, tasks=TASKS, **hparams)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  grads, params = _grads(), _params()
  want, want_state = jax.jit(direct.update)(grads, direct.init(params), params)
  got, got_state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      losses={"a": 1.0, "b": 2.0})
  chex.assert_trees_all_equal(got, want)
  chex.assert_trees_all_equal(got_state, want_state)


def test_sum_tasks_is_the_gradient_of_the_summed_loss():
  grads, params = _grads(), _params()
  tx = tbgc_jax.sum_tasks(tasks=TASKS)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_close(out, jax.tree.map(jnp.add, grads["a"], grads["b"]), rtol=1e-7)
  d = tbgc_jax.method_diagnostics(optax.chain(tx, optax.sgd(1.0)).init(params))
  assert d["task/a/backbone_scale"] == d["task/b/head_scale"] == 1.0
  assert int(d["task/a/nonfinite_total"]) == 0
  low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
  chex.assert_trees_all_equal_dtypes(tx.update(low, state)[0], low["a"])


@pytest.mark.parametrize("name,hparams,message", [
    ("clip", {}, r"method must be one of \("),
    ("tbgc", {"max_norm": 0.0}, r"max_norm must be > 0 with method 'tbgc', got 0\.0"),
    ("vanilla", {"max_norm": -1.0}, "max_norm must be > 0"),
    ("tbgc", {}, "max_norm is required by method 'tbgc'"),
    ("none", {"max_norm": 0.1}, "max_norm is not a hyperparameter of method 'none'"),
])
def test_invalid_names_and_hyperparameters_fail_before_building(name, hparams, message):
  with pytest.raises(ValueError, match=message):
    tbgc_jax.make_method(name, MASK, tasks=TASKS, **hparams)
  with pytest.raises(ValueError, match="config.grad." + message.lstrip("r")):
    tbgc_jax.check_method(name, hparams, prefix="config.grad.")


def test_register_a_method_then_build_it_by_name():
  seen = {}

  @tbgc_jax.register("scaled_sum_test", checks={"factor": (lambda x: x > 0, "> 0")},
                     uses_losses=True)
  def scaled_sum(backbone_mask=None, *, tasks, factor=2.0):
    inner = tbgc_jax.sum_tasks(backbone_mask, tasks=tasks)

    def update_fn(updates, state, params=None, *, losses, **extra):
      del extra
      seen["losses"] = losses
      out, state = inner.update(updates, state, params)
      return jax.tree.map(lambda x: factor * x, out), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)

  try:
    assert "scaled_sum_test" in tbgc_jax.method_names()
    assert tbgc_jax.get_method("scaled_sum_test").uses_losses
    with pytest.raises(ValueError, match="exists already"):
      tbgc_jax.register("scaled_sum_test", scaled_sum)
    with pytest.raises(ValueError, match="factor must be > 0"):
      tbgc_jax.make_method("scaled_sum_test", tasks=TASKS, factor=0.0)
    tx = optax.chain(tbgc_jax.make_method("scaled_sum_test", tasks=TASKS, factor=3.0),
                     optax.sgd(1.0))
    grads, params = _grads(), _params()
    out, _ = tx.update(grads, tx.init(params), params, losses={"a": 0.5, "b": 1.5})
    chex.assert_trees_all_close(
        out, jax.tree.map(lambda x, y: -3.0 * (x + y), grads["a"], grads["b"]), rtol=1e-6)
    assert seen["losses"] == {"a": 0.5, "b": 1.5}
  finally:
    tbgc_jax.unregister("scaled_sum_test")
  assert "scaled_sum_test" not in tbgc_jax.method_names()
  with pytest.raises(TypeError, match="must accept"):
    tbgc_jax.register("bad_test", lambda tasks: None)


@pytest.mark.parametrize("name", tbgc_jax.method_names())
def test_every_method_refuses_a_bare_string_of_tasks(name):
  """``tasks="det"`` would otherwise be three one-letter tasks."""
  method = tbgc_jax.get_method(name)
  hparams = {p: 0.1 for p in method.required}
  with pytest.raises(ValueError, match="single string 'det'"):
    method.factory(backbone_mask=MASK, tasks="det", **hparams)
  with pytest.raises(ValueError, match="single string 'det'"):
    tbgc_jax.make_method(name, MASK, tasks="det", **hparams)
  with pytest.raises(ValueError, match="distinct names"):
    method.factory(backbone_mask=MASK, tasks=("a", "a"), **hparams)


def _trainer_config(method, **hparams):
  if not hparams and "max_norm" in tbgc_jax.get_method(method).required:
    hparams = {"max_norm": 0.1}
  c = ml_collections.ConfigDict()
  c.grad = ml_collections.ConfigDict(dict(
      method=method, step_mode="per_task_jit", sequential=True,
      hparams=ml_collections.ConfigDict(hparams)))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, weight_decay=0.0, backbone_lr_mult=1.0, warmup_epochs=0.0, warmup_ratio=1.0,
      b1=0.9, b2=0.999))
  return c


def test_trainer_takes_config_grad_hparams_checked_against_the_method():
  assert method_hyperparameters(_trainer_config("tbgc", max_norm=0.1, rescale_heads=False).grad
                                ) == {"max_norm": 0.1, "rescale_heads": False}
  assert method_hyperparameters(_trainer_config("vanilla").grad) == {"max_norm": 0.1}
  assert method_hyperparameters(_trainer_config("none").grad) == {}
  c = _trainer_config("tbgc")
  c.grad.hparams.drop_nonfinite = False
  assert method_hyperparameters(c.grad)["drop_nonfinite"] is False
  c.grad.hparams.bogus = 1
  with pytest.raises(ValueError, match=r"config\.grad\.hparams\.bogus is not a hyperparameter "
                                       r"of method 'tbgc'"):
    method_hyperparameters(c.grad)
  # A method's hyperparameter anywhere else in config.grad is named, with where it belongs.
  c = _trainer_config("tbgc")
  c.grad.max_norm = 0.1
  with pytest.raises(ValueError, match=r"config\.grad\.max_norm: .* config\.grad\.hparams"):
    method_hyperparameters(c.grad)
  with pytest.raises(ValueError, match=r"config\.grad\.hparams\.max_norm is required"):
    method_hyperparameters(_trainer_config("tbgc", rescale=False).grad)


@pytest.mark.parametrize("method", ["none", "vanilla", "tbgc_star", "tbgc"])
def test_trainer_optimizer_takes_per_task_grads_and_losses(method):
  mask_fn = tbgc_jax.path_mask("^backbone")
  tx, _ = make_optimizer(_trainer_config(method), TASKS, mask_fn, 10, 5)
  grads, params = _grads(), _params()
  direct = tbgc_jax.make_method(method, mask_fn, tasks=TASKS,
                                **method_hyperparameters(_trainer_config(method).grad))
  first, _ = direct.update(grads, direct.init(params), params)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      losses={"a": 1.0, "b": 1.0})
  # AdamW's first step moves every coordinate by -lr * sign(first link's output).
  np.testing.assert_allclose(np.asarray(updates["heads"]),
                             -1e-3 * np.sign(np.asarray(first["heads"])), rtol=1e-3)
  d = tbgc_jax.method_diagnostics(state)
  assert {"task/a/backbone_grad_norm", "task/b/nonfinite_streak"} <= set(d)


def test_trainer_update_logs_what_the_method_state_offers(tmp_path):
  import functools
  import json

  from tbgc_jax.trainer import logs
  from tbgc_jax.trainer.step import _update

  mask_fn = tbgc_jax.path_mask("^backbone")
  grads, params = _grads(), _params()
  losses = {"a": jnp.float32(1.0), "b": jnp.float32(2.0)}
  keys = {}
  for method in ("none", "tbgc", "upgrad"):
    tx, schedules = make_optimizer(_trainer_config(method), TASKS, mask_fn, 10, 5)
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params),
             "rng": jax.random.PRNGKey(0)}
    update = jax.jit(functools.partial(_update, tasks=TASKS, tx=tx, schedules=schedules))
    _, metrics = update(state, losses, {t: {} for t in TASKS}, grads)
    keys[method] = set(metrics)
    rows = [{"step": s, **{k: float(v) for k, v in metrics.items()}} for s in range(3)]
    path = tmp_path / f"{method}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / method
    out.mkdir()
    written = {p.rsplit("/", 1)[-1] for p in logs.plot_training(str(path), str(out), TASKS)}
    assert ("task_weights.png" in written) == (method == "upgrad")
  assert {"a/loss", "b/loss", "lr", "task/a/nonfinite", "task/b/backbone_grad_norm"
          } <= keys["none"]
  assert not any(k.startswith("grad/") or k.endswith("/weight") for k in keys["none"])
  assert {"task/a/backbone_grad_norm_after", "task/b/grad_norm"} <= keys["tbgc"]
  assert {"task/a/weight", "grad/cosine/a/b", "grad/num_conflicts",
          "task/b/backbone_grad_norm_after", "task/b/nonfinite_total"} <= keys["upgrad"]
  # One reader, one set of names: the step's metrics are the method's diagnostics as they are.
  for method in keys:
    assert not any(k.startswith(("a/", "b/")) and k not in ("a/loss", "b/loss")
                   for k in keys[method]), method


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tbgc", "upgrad", "pcgrad", "famo"])
def test_the_flat_update_equals_the_update_on_trees(method):
  """`flat_groups` packs leaves per group; the updates and method state match the tree form."""
  from tbgc_jax.trainer.optim import FlatLayout

  rng = np.random.default_rng(3)
  params = {"backbone": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(4, jnp.bfloat16)},
            "heads": {"w": jnp.ones((2, 5)), "b": jnp.zeros(1)}}
  grads = [{t: jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
            for t in TASKS} for _ in range(3)]
  grads[1]["b"]["heads"]["b"] = jnp.full((1,), jnp.nan)  # task b dropped at the second step
  mask_fn = tbgc_jax.path_mask("^backbone")
  out = {}
  for flat in (False, True):
    c = _trainer_config(method)
    c.backend = ml_collections.ConfigDict({"flat_update": flat})
    tx, _ = make_optimizer(c, TASKS, mask_fn, 10, 5)
    state, p, steps = tx.init(params), params, []
    for i, g in enumerate(grads):
      u, state = jax.jit(tx.update)(g, state, p, losses={"a": 1.0 + i, "b": 2.0})
      p = optax.apply_updates(p, u)
      steps.append(p)
    out[flat] = steps, tbgc_jax.method_diagnostics(state)
  for a, b in zip(out[False][0], out[True][0], strict=True):
    chex.assert_trees_all_close(a, b, rtol=2e-5, atol=1e-6)
  assert int(out[True][1]["task/b/nonfinite_total"]) == 1
  assert int(out[False][1]["task/b/nonfinite_total"]) == 1
  layout = FlatLayout.of(params, jax.tree.map(lambda m: "backbone" if m else "head",
                                              mask_fn(params)))
  assert layout.groups == (("backbone/bfloat16", (0,)), ("backbone/float32", (1,)),
                           ("head", (2, 3)))
  chex.assert_trees_all_equal(layout.unravel(layout.ravel(grads[0]["a"])), grads[0]["a"])


@pytest.mark.parametrize("flat", [False, True])
def test_no_decay_paths_and_the_backbone_lr_multiplier(flat):
  params = {"backbone": {"norm": {"scale": jnp.ones(2)}, "fc": {"kernel": jnp.ones((2, 2))}},
            "heads": {"norm": {"bias": jnp.ones(2)}, "out": {"kernel": jnp.ones(3)}}}
  zero = {t: jax.tree.map(jnp.zeros_like, params) for t in TASKS}
  c = _trainer_config("none")
  c.optim.update(weight_decay=0.5, backbone_lr_mult=0.1, no_decay="norm")
  c.backend = ml_collections.ConfigDict({"flat_update": flat})
  tx, _ = make_optimizer(c, TASKS, tbgc_jax.path_mask("^backbone"), 10, 5)
  updates, _ = jax.jit(tx.update)(zero, tx.init(params), params, losses={"a": 1.0, "b": 1.0})
  # A zero gradient leaves only AdamW's decay: -lr * mult * wd * p, and 0 on the no-decay paths.
  np.testing.assert_allclose(updates["backbone"]["fc"]["kernel"], -1e-3 * 0.1 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(updates["heads"]["out"]["kernel"], -1e-3 * 0.5, rtol=1e-5)
  assert not np.any(updates["backbone"]["norm"]["scale"])
  assert not np.any(updates["heads"]["norm"]["bias"])
