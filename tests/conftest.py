"""Test-session setup: 8 fake CPU devices (so meshes are testable on one CPU) and configs importable."""

import os
import sys

# Must happen before jax initialises its backends; tests that need one device just use devices()[0].
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
