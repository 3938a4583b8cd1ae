"""tbgc-jax: task-level backbone-oriented gradient clipping for multi-task JAX training."""

__version__ = "0.1.0"
