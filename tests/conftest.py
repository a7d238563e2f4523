"""Test setup: 8 fake CPU devices (so meshes are testable on one CPU)."""

import os

# Must happen before jax initialises its backends; tests that need one device just use devices()[0].
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
