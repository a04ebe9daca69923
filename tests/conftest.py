"""Test harness: 4 host CPU devices (for sharding tests) and 32-bit JAX, set before jax loads.

`JAX_ENABLE_X64=1 pytest` runs the suite in 64-bit mode instead (an audit of which tests depend
on the float32 arithmetic path); by default the suite runs in 32-bit mode whatever the
environment says.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=4".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", os.environ.get("JAX_ENABLE_X64", "0").lower() in ("1", "true"))
# Implicit rank promotion hides shape bugs (a [B] added to a [B, 1] silently becomes [B, B]).
jax.config.update("jax_numpy_rank_promotion", "raise")
