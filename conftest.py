"""Test-session set-up for the whole repository (tests/ and the package's doctests).

This must run before any JAX backend is initialised, hence it lives in the root conftest,
which pytest loads before collecting anything:
- eight simulated CPU devices for the sharding tests;
- XLA:CPU's cheap back-end (no LLVM optimisation): the tests are compile-bound, and at these
  tiny shapes a test spends far more time in LLVM than in running code. Compiled buffer
  sizes (``memory_analysis``) do not depend on it. Subprocesses started by tests (train.py,
  eval.py) inherit it through the environment. Set ``TBGC_TEST_XLA_OPT=1`` to test with the
  default back-end.
"""

import os

import jax

_FAST_BACKEND = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
if os.environ.get("TBGC_TEST_XLA_OPT", "0") != "1":
  flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(
      flags + [f for f in _FAST_BACKEND if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")])

jax.config.update("jax_num_cpu_devices", 8)
