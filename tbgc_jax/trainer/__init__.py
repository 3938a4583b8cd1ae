"""The multi-task trainer: optimizer, the jitted Algorithm 1 step, checkpoints, logs, eval."""
