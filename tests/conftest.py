"""Test harness: 4 host CPU devices (for sharding tests) and 32-bit JAX, set before jax loads."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=4".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
