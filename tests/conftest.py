"""Test-session set-up: eight simulated CPU devices for the sharding tests.

This must run before any JAX backend is initialised, hence it lives in conftest.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
