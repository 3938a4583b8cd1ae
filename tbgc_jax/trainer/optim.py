"""Optimizer of the paper's recipe: gradient method, then AdamW with a backbone lr multiplier."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

import tbgc_jax

GRAD_METHODS = ("none", "vanilla", "tbgc_star", "tbgc")


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
    ``(tx, schedules)``. For ``grad.method == "none"`` the transform takes the gradient of
    the summed loss (one params-shaped tree); otherwise ``{task: grads}``.
  """
  method, max_norm = config.grad.method, config.grad.max_norm
  if method not in GRAD_METHODS:
    raise ValueError(f"config.grad.method must be one of {GRAD_METHODS}, got {method!r}")
  schedules = lr_schedules(config.optim, total_steps, steps_per_epoch)

  def labels(params):
    return jax.tree.map(lambda m: "backbone" if m else "head", backbone_mask(params))

  adamw = {
      name: optax.adamw(sched, b1=config.optim.b1, b2=config.optim.b2,
                        weight_decay=config.optim.weight_decay)
      for name, sched in schedules.items()
  }
  inner = optax.multi_transform(adamw, labels)
  if method == "none":
    return inner, schedules
  first = {
      "vanilla": lambda: tbgc_jax.vanilla_clip(max_norm, backbone_mask, tasks=tasks),
      "tbgc_star": lambda: tbgc_jax.per_task_clip(max_norm, backbone_mask, tasks=tasks),
      "tbgc": lambda: tbgc_jax.tbgc(max_norm, backbone_mask, tasks=tasks,
                                    rescale_heads=config.grad.rescale_heads),
  }[method]()
  return optax.chain(first, inner), schedules
