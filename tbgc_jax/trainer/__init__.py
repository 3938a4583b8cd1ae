"""The multi-task trainer: optimizer, the jitted Algorithm 1 step, checkpoints, logs, eval.

What differs per task is its specification (``tbgc_jax.tasks``)."""
