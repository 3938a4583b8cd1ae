"""Optimizer of the paper's recipe: gradient method, then AdamW with a backbone lr multiplier."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

import tbgc_jax

# config.grad fields that configure the step, not the gradient method.
_STEP_FIELDS = ("method", "step_mode", "sequential", "hparams")


def method_hyperparameters(grad_cfg: Any) -> dict[str, Any]:
  """The hyperparameters ``config.grad`` gives its method, checked against the registry.

  The fields of ``config.grad`` that the method takes (e.g. ``max_norm``, ``rescale_heads``),
  plus everything in the optional ``config.grad.hparams`` (which must all be the method's).

  Raises:
    ValueError: naming the config field, for an unknown method or an invalid value.
  """
  takes = tbgc_jax.get_method(grad_cfg.method, where="config.grad.method").hyperparameters
  hparams = {k: v for k, v in grad_cfg.items() if k in takes and k not in _STEP_FIELDS}
  hparams.update(dict(grad_cfg.get("hparams", None) or {}))
  tbgc_jax.check_method(grad_cfg.method, hparams, prefix="config.grad.")
  return hparams


def lr_schedules(optim_cfg: Any, total_steps: int, steps_per_epoch: int
                 ) -> dict[str, optax.Schedule]:
  """Cosine decay with linear warm-up from ``lr * warmup_ratio`` (mmcv's 'linear' warm-up).

  Returns:
    ``{"head": schedule, "backbone": schedule * backbone_lr_mult}``.
  """
  warmup = min(int(round(optim_cfg.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  head = optax.warmup_cosine_decay_schedule(
      init_value=optim_cfg.lr * optim_cfg.warmup_ratio, peak_value=optim_cfg.lr,
      warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0)
  mult = optim_cfg.backbone_lr_mult
  return {"head": head, "backbone": lambda step: head(step) * mult}


def make_optimizer(
    config: Any, tasks: Sequence[str], backbone_mask: Callable[[Any], Any],
    total_steps: int, steps_per_epoch: int,
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """The gradient method (first link) chained with AdamW at differential learning rates.

  Args:
    config: the trainer config (uses ``config.grad`` and ``config.optim``).
    tasks: task names (the keys of the per-task gradients).
    backbone_mask: ``params -> bool pytree``, True on backbone leaves.
    total_steps: number of optimizer steps of the run.
    steps_per_epoch: steps in one epoch (for the warm-up length).

  Returns:
    ``(tx, schedules)``; ``tx.update`` takes ``{task: grads}`` and ``losses={task: loss}``.
  """
  first = tbgc_jax.make_method(config.grad.method, backbone_mask, tasks=tasks,
                               **method_hyperparameters(config.grad))
  schedules = lr_schedules(config.optim, total_steps, steps_per_epoch)

  def labels(params):
    return jax.tree.map(lambda m: "backbone" if m else "head", backbone_mask(params))

  adamw = {
      name: optax.adamw(sched, b1=config.optim.b1, b2=config.optim.b2,
                        weight_decay=config.optim.weight_decay)
      for name, sched in schedules.items()
  }
  return optax.chain(first, optax.multi_transform(adamw, labels)), schedules
