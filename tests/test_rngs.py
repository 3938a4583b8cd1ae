"""`construction_rngs`: the same model as ``nnx.Rngs``, built without traced counter writes."""

import jax
import numpy as np
import pytest
from flax import nnx

from tbgc_jax.models.rngs import construction_rngs
from tbgc_jax.trainer.model_factory import build_model
from tests import micro_config


def _leaves(tree):
  as_np = lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x)
  return [(jax.tree_util.keystr(p), as_np(x)) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("traced", [False, True])
def test_the_model_is_bit_identical_to_nnx_rngs(traced):
  config = micro_config.get_config("cls")

  def state(rngs_fn):
    return nnx.split(build_model(config, rngs=rngs_fn(config.seed)), nnx.Param, ...)[1:]

  run = jax.jit if traced else (lambda f: f)
  want = _leaves(run(lambda: state(nnx.Rngs))())
  got = _leaves(run(lambda: state(construction_rngs))())
  assert [p for p, _ in got] == [p for p, _ in want]
  assert len(want) > 20
  for (path, a), (_, b) in zip(want, got, strict=True):
    np.testing.assert_array_equal(a, b, err_msg=path)


def test_keys_differ_per_call_and_reads_are_copies():
  rngs = construction_rngs(0, dropout=1)
  keys = [rngs.params() for _ in range(3)] + [rngs.dropout()]
  data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
  assert len(data) == 4
  read = rngs.params.count[...]
  rngs.params()
  assert int(read) == 3 and int(rngs.params.count[...]) == 4


def test_nothing_traced_is_written_while_building():
  """Under a trace the counters stay host numbers: the build's jaxpr holds only the draws."""
  rngs_seen = []

  def build():
    rngs = construction_rngs(0)
    rngs_seen.append(rngs)
    return build_model(micro_config.get_config("cls"), rngs=rngs)

  nnx.eval_shape(build)
  count = rngs_seen[0].params.count.get_value()
  assert isinstance(count, np.ndarray) and int(count) > 10
