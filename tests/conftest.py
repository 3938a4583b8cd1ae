"""Test-session set-up: eight simulated CPU devices for the sharding tests.

This must run before any JAX backend is initialised, hence it lives in conftest.
"""

import os

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory) -> str:
  """One embedded-data folder per test session (shared by xdist workers; generation is
  atomic and process-safe)."""
  from tbgc_jax.data import embedded

  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  return embedded.ensure_embedded(str(base / "tbgc_embedded"))
