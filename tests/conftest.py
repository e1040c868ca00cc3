"""Every test runs on 8 fake CPU devices, with no network."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS was set too late)"
