"""What the trainer and ``eval.py`` build from a config: checks, mesh, model, schedule lengths."""

import logging
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from tbgc_jax.data import configs as data_configs
from tbgc_jax.data import pipeline
from tbgc_jax.data.augment import AUGMENT_MODES
from tbgc_jax.data.batching import padding_example
from tbgc_jax.data.fields import pop_counts
from tbgc_jax.models.rngs import construction_rngs
from tbgc_jax.tasks import get_task, task_names
from tbgc_jax.trainer import sharding
from tbgc_jax.trainer.cli import ConfigError
from tbgc_jax.trainer.evaluate import eval_specs
from tbgc_jax.trainer.model_factory import build_model
from tbgc_jax.trainer.optim import method_hyperparameters
from tbgc_jax.trainer.step import STEP_MODES

NO_PRETRAINED = "none"  # config.model.pretrained value that asks for random init explicitly
NONFINITE_POLICIES = ("drop_task", "stop")
INIT_FROM_PARTS = ("params", "params+opt_state")
_log = logging.getLogger(__name__)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start, with a message naming the field, on an invalid value or combination."""
  tasks, registered = tuple(config.tasks), task_names()
  if not tasks or len(set(tasks)) != len(tasks) or not set(tasks) <= set(registered):
    raise ValueError(f"config.tasks must be distinct names among the registered tasks "
                     f"{registered}, got {tasks}")
  method_hyperparameters(config.grad)  # the method and its hyperparameters (registry checks)
  if config.grad.step_mode not in STEP_MODES:
    raise ValueError(f"config.grad.step_mode must be one of {STEP_MODES}, got "
                     f"{config.grad.step_mode!r}")
  if config.get("augment_mode", "") and config.augment_mode not in AUGMENT_MODES:
    raise ValueError(f"config.augment_mode must be '' (each task's data.<task>.augment.mode) "
                     f"or one of {AUGMENT_MODES}, got {config.augment_mode!r}")
  if str(config.get("init_from_parts", "params")) not in INIT_FROM_PARTS:
    raise ValueError(f"config.init_from_parts must be one of {INIT_FROM_PARTS}, got "
                     f"{config.init_from_parts!r}")
  for task in tasks:
    if task not in config.data:
      raise ValueError(f"config.data has no section for task {task!r}")
    if task not in config.loss_weights or not config.loss_weights[task] > 0:
      raise ValueError(f"config.loss_weights.{task} must be > 0")
  if not config.total_steps > 0 and not config.num_epochs > 0:
    raise ValueError("set config.num_epochs or config.total_steps to a positive value")
  if config.log_every <= 0 or config.checkpoint_every <= 0:
    raise ValueError("config.log_every and config.checkpoint_every must be positive")
  if not int(config.get("eval_every", 0) or 0) >= 0:
    raise ValueError(f"config.eval_every must be >= 0 (0: evaluate only at the end), got "
                     f"{config.eval_every}")
  eval_specs(config)
  pretrained = str(config.model.pretrained)
  if config.model.get("require_pretrained", False) and not pretrained:
    raise ValueError(
        "config.model.pretrained: this config trains from an ImageNet-pretrained backbone; "
        "expected a converted InternImage .npz (python -m tbgc_jax.models.convert), got ''. "
        "Set it to 'none' to start from random weights")
  if pretrained == NO_PRETRAINED:
    _log.warning("config.model.pretrained='none': the backbone starts from random weights")
  nonfinite = config.get("nonfinite", None)
  if nonfinite is not None:
    if nonfinite.policy not in NONFINITE_POLICIES:
      raise ValueError(f"config.nonfinite.policy must be one of {NONFINITE_POLICIES}, got "
                       f"{nonfinite.policy!r}")
    if not int(nonfinite.max_consecutive) >= 1:
      raise ValueError(f"config.nonfinite.max_consecutive must be >= 1, got "
                       f"{nonfinite.max_consecutive}")
  if config.mesh_devices < 0 or config.mesh_devices > jax.device_count():
    raise ValueError(f"config.mesh_devices must be in [0, {jax.device_count()}] (0 = all), "
                     f"got {config.mesh_devices}")


def use_compilation_cache(workdir: str) -> None:
  """Persistent XLA compilation cache in ``<workdir>/jax_cache``, unless one is set already.

  ``eval.py`` and resumed runs then reuse the training run's compiles.
  ``$JAX_COMPILATION_CACHE_DIR`` (or an earlier ``jax.config`` setting) wins.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(workdir), "jax_cache"))


def resolved_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with its shortcuts applied: the one the run reads and records.

  ``config.augment_mode``, when not empty, is a shortcut that sets every task's
  ``data.<task>.augment.mode``; the copy holds the modes there only (its ``augment_mode`` is
  ''), so that each task's mode has one place. The caller's config is left as it is; a
  locked config gives a locked copy, a ``FrozenConfigDict`` a (locked) ``ConfigDict``.
  """
  if isinstance(config, ml_collections.FrozenConfigDict):
    config = ml_collections.ConfigDict(config)
  else:
    config = config.copy_and_resolve_references()
  if config.get("augment_mode", ""):
    data_configs.set_augment_mode(config.data, config.augment_mode)
    config.augment_mode = ""
  return config


def augment_modes(config: ml_collections.ConfigDict) -> dict[str, str]:
  """``{task: augmentation mode}`` of a resolved config (tasks with an ``augment`` section)."""
  return {t: str(config.data[t].augment.mode) for t in config.tasks
          if "augment" in config.data[t]}


class Setup:
  """Everything ``train_and_evaluate`` and ``eval.py`` build from a config, in one place.

  ``config`` is checked (`validate_config`; a mistake raises `ConfigError`) and not modified:
  ``self.config`` is its `resolved_config`, the one the run reads from then on. The model is
  built abstractly (``nnx.eval_shape``): ``abstract_params`` are shapes and shardings, the
  restore target of a checkpoint. ``params``, the initial parameters (with the pretrained
  backbone of ``config.model.pretrained``), are computed on first use only, so that a run
  restoring a checkpoint, and ``eval.py``, never initialise or read the pretrained file.
  ``rest`` (the model's non-parameter state) is always concrete.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    try:
      validate_config(config)
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(str(e)) from e
    config = resolved_config(config)
    self.config = config
    self.tasks = tuple(config.tasks)
    self.mesh = sharding.make_mesh(config)
    self.replicated = sharding.replicated(self.mesh)
    self.data_sharding = sharding.data_sharding(self.mesh)

    def create():
      return build_model(config, rngs=construction_rngs(config.seed))

    abstract = nnx.eval_shape(create)
    abstract.train()
    self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    abstract.eval()
    self.eval_graphdef = nnx.split(abstract, nnx.Param, ...)[0]
    self.abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), abs_params)
    self._create = create
    # The non-parameter state only: XLA drops the parameters' initialisation.
    self.rest = jax.jit(lambda: nnx.split(create(), nnx.Param, ...)[2],
                        out_shardings=jax.tree.map(lambda _: self.replicated, abs_rest))()
    self._params = None

  @property
  def params(self):
    """The initial parameters (random, with the pretrained backbone if the config names
    one), replicated over the mesh; computed on first use."""
    if self._params is None:
      params = jax.jit(lambda: nnx.split(self._create(), nnx.Param, ...)[1],
                       out_shardings=jax.tree.map(lambda _: self.replicated,
                                                  self.abstract_params))()
      pretrained = self.config.model.pretrained
      if pretrained and pretrained != NO_PRETRAINED:
        from tbgc_jax.models.convert import load_backbone_weights

        model = nnx.merge(self.graphdef, params, self.rest)
        load_backbone_weights(model, pretrained)
        _, params, _ = nnx.split(model, nnx.Param, ...)
        params = jax.device_put(params, self.replicated)
      self._params = params
    return self._params

  def local_batch_size(self, task: str) -> int:
    """Examples of ``task`` per step on this host: per-device batch x this host's devices."""
    local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
    return int(self.config.data[task].batch_size) * local


def train_batch_shapes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                       ) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """``{task: {field: ShapeDtypeStruct}}`` of the global training batches over ``mesh``, with
  the data sharding: what the train step is compiled for before any data is read.

  The fields, shapes and dtypes are those of the data pipeline's padded examples
  (`tbgc_jax.data.batching.padding_example`) at ``config.data.<task>.image_size``, without
  the pipeline's ``skipped`` counter and the drop counters (``num_dropped_<field>``), which
  the trainer takes off before the step; a batch
  has ``config.data.<task>.batch_size`` rows per device of ``mesh``.
  """
  out = {}
  for t in config.tasks:
    d = config.data[t]
    ex = padding_example(pipeline.fields(d, get_task(t).data), d.image_size)
    pop_counts(ex)
    rows = int(d.batch_size) * mesh.size
    out[t] = {k: jax.ShapeDtypeStruct((rows, *np.shape(v)), np.asarray(v).dtype,
                                      sharding=sharding.data_sharding(mesh))
              for k, v in ex.items()}
  return out


def check_batches(batches: dict, expected: dict) -> None:
  """Raises ValueError, naming the task and field, where a batch's fields, shapes or dtypes
  differ from ``expected`` (`train_batch_shapes`: what the step was compiled for)."""
  for t, want in expected.items():
    got = batches[t]
    if set(got) != set(want):
      raise ValueError(f"task {t!r}: the training batch has fields {sorted(got)}, the step was "
                       f"compiled for {sorted(want)}")
    for k, w in want.items():
      if tuple(got[k].shape) != tuple(w.shape) or got[k].dtype != w.dtype:
        raise ValueError(f"task {t!r}, batch field {k!r}: {got[k].dtype}{list(got[k].shape)}, "
                         f"the step was compiled for {w.dtype}{list(w.shape)} (the task's "
                         "padded example, tbgc_jax.data.batching.padding_example)")


def schedule_lengths(setup: Setup, sources: dict) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): an epoch is one pass over the largest task's data."""
  per_task = {t: len(sources[t]) // jax.process_count() // setup.local_batch_size(t)
              for t in setup.tasks}
  for t, n in per_task.items():
    if n < 1:
      raise ValueError(f"task {t!r}: {len(sources[t])} training examples do not fill one "
                       f"batch of {setup.local_batch_size(t)} per host")
  steps_per_epoch = max(per_task.values())
  cfg = setup.config
  total = int(cfg.total_steps) if cfg.total_steps > 0 else int(cfg.num_epochs) * steps_per_epoch
  return steps_per_epoch, total


def max_consecutive_nonfinite(config) -> int:
  """Dropped steps in a row after which a task stops the run (1 under policy "stop")."""
  nonfinite = config.get("nonfinite", None)
  if nonfinite is None or nonfinite.policy == "stop":
    return 1
  return int(nonfinite.max_consecutive)
