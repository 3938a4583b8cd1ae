"""Test-session set-up for the whole repository (tests/ and the package's doctests).

Eight simulated CPU devices for the sharding tests. This must run before any JAX backend is
initialised, hence it lives in the root conftest, which pytest loads before collecting
anything.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
