"""One place decides the back-end's compile workarounds (`tbgc_jax.trainer.backend`); each
gives what its natural form gives, and an accelerator's lowering holds the natural forms."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from tbgc_jax.models.internimage import InternImage
from tbgc_jax.models.rngs import construction_rngs
from tbgc_jax.trainer import backend, export
from tbgc_jax.trainer.model_factory import backbone_config
from tests import micro_config

_ALL_ON = backend.Workarounds(True, True, True)
_ALL_OFF = backend.Workarounds(False, False, False)


def test_auto_is_on_for_the_cpu_back_end_only_and_each_field_overrides():
  config = tiny.get_config()
  assert backend.workarounds(config, "cpu") == _ALL_ON
  assert backend.workarounds(config, "gpu") == backend.workarounds(config, "tpu") == _ALL_OFF
  assert backend.workarounds(config) == (_ALL_ON if jax.default_backend() == "cpu" else _ALL_OFF)
  config.backend.own_head_grads = False
  config.backend.dw_conv_by_shifts = True
  assert backend.workarounds(config, "cpu") == backend.Workarounds(True, False, True)
  assert backend.workarounds(config, "gpu") == backend.Workarounds(False, False, True)
  # A config without the section: every workaround "auto".
  assert backend.workarounds(ml_collections.ConfigDict({}), "cpu") == _ALL_ON


@pytest.mark.parametrize("section,message", [
    ({"flat_update": "yes"}, r"config\.backend\.flat_update must be 'auto', True or False"),
    ({"flat": True}, r"config\.backend\.flat is not a workaround"),
])
def test_a_bad_value_names_the_field(section, message):
  with pytest.raises(ValueError, match=message):
    backend.workarounds(ml_collections.ConfigDict({"backend": section}), "cpu")


def _micro_backbone(shifts: bool):
  config = micro_config.get_config()  # seg, cls
  config.model.backbone_overrides.scan_blocks = True
  cfg = backbone_config(config, backend.Workarounds(False, False, shifts))
  return config, cfg


def test_the_model_takes_the_depthwise_form_from_its_config_with_the_same_values():
  # (The two forms' gradients: tests/test_dcnv3.py, on the layer.)
  _, by_conv = _micro_backbone(False)
  _, by_shifts = _micro_backbone(True)
  assert by_shifts == dataclasses.replace(by_conv, dw_conv_by_shifts=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  out = {}
  for cfg in (by_conv, by_shifts):
    model = InternImage(cfg, rngs=construction_rngs(0))
    model.eval()
    graphdef, params = nnx.split(model)

    def forward(params, graphdef=graphdef):
      return nnx.merge(graphdef, params)(x)
    lowered = jax.jit(forward).lower(params)
    # The grouped (depthwise) conv is in the program unless the config asks for the shifts.
    assert (max(_group_counts(lowered.as_text())) > 1) != cfg.dw_conv_by_shifts
    out[cfg.dw_conv_by_shifts] = lowered.compile()(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
               out[False], out[True])


def _group_counts(text: str) -> set[int]:
  return {int(n) for n in re.findall(r"feature_group_count = (\d+)", text)}


def test_an_accelerator_lowering_holds_the_natural_forms():
  """Lowered for cuda with backend "gpu": the update takes params-shaped trees, each task's
  gradient is the whole tree, the scanned blocks' depthwise conv is a grouped conv (in the
  gradient too)."""
  config, _ = _micro_backbone(False)
  step, state, rest, batches, outs = export.abstract_step(config, backend="gpu")
  params = state["params"]
  largest = max(x.size for x in jax.tree.leaves(params))
  # No flat vectors: the AdamW moments are params-shaped.
  assert max(x.size for x in jax.tree.leaves(state["opt_state"])) == largest
  # The task's gradient is the whole parameter tree (no zero-filling in the update).
  leaves = len(jax.tree.leaves(params))
  assert len(jax.tree.leaves(outs["cls"][1])) == leaves
  args = (params, rest, batches["cls"], state["rng"], state["step"])
  text = jax.export.export(step.task_grads["cls"], platforms=("cuda",))(*args).mlir_module()
  assert max(_group_counts(text)) > 1  # the depthwise conv (and its gradients) as such
  # The CPU workarounds, for contrast: flat moments, own-head gradients.
  step, state, rest, batches, outs = export.abstract_step(config, backend="cpu")
  assert max(x.size for x in jax.tree.leaves(state["opt_state"])) > largest
  assert len(jax.tree.leaves(outs["cls"][1])) < leaves
