"""Every test runs on 8 fake CPU devices, with no network."""
import importlib.metadata
import os

# The tests' programs are tiny and compile-bound; the flags below change how XLA's CPU backend
# generates code, never the HLO (so sharding and memory are the same): LLVM optimization level 0
# (about a third faster), and on the jaxlib they were measured with, the classic fusion emitters
# instead of the MLIR ones and one LLVM module per program (together about half the compile time
# again: the DiT pipeline test 55 s -> 30 s, the suite 757 s -> 385 s). XLA aborts on a flag it does
# not know, so a jaxlib that may have dropped them runs without them (slower, never broken).
CODEGEN_FLAGS = {(0, 10): " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"}
_jaxlib = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0" + CODEGEN_FLAGS.get(_jaxlib, "")).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# The programs' persistent compilation cache stays out of the user's cache (a test that checks it
# sets its own directory).
os.environ.setdefault("WEIT_COMPILATION_CACHE", "off")

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402


# The test files that take longest, longest first (CPU seconds on the 2-core development machine,
# from 108 down to 10). With ``--dist loadfile --no-loadscope-reorder`` (scripts/test.sh) the two
# workers take files in collection order, so the long ones start first and the short ones fill in
# at the end, instead of one worker finishing a long file while the other idles.
SLOWEST_FIRST = ("test_reliability.py", "test_control_programs.py", "test_programs.py", "test_dit.py",
                 "test_resnet.py", "test_multihost.py", "test_pretrain.py", "test_generator.py", "test_inits.py",
                 "test_fine.py", "test_control.py", "test_vit.py", "test_checkpoint_templates.py",
                 "test_sample_quality.py", "test_validation.py", "test_dry_run.py")


def pytest_collection_modifyitems(items):
  # Tests marked slow are skipped (said in the summary) unless WEIT_TEST_SLOW=1: they would break
  # the suite's time budget (7 minutes on 2 cores).
  if not os.environ.get("WEIT_TEST_SLOW"):
    for item in items:
      if item.get_closest_marker("slow"):
        item.add_marker(pytest.mark.skip(reason="slow: WEIT_TEST_SLOW=1 bash scripts/test.sh runs it"))
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))  # stable: others keep their order


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS was set too late)"


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session: tests that build the same model (its init,
  its parameter statistics, the same step) compile it once. Fresh per session, so nothing stale."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def write_idx(path, array):
  import gzip
  import struct
  import numpy as np
  header = b"\0\0\x08" + bytes([array.ndim]) + b"".join(struct.pack(">i", n) for n in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory):
  """A tiny, learnable Fashion-MNIST stand-in: each class is a bright bar at its own position
  plus seeded noise. Returns a function that points a config's ``data`` section at it."""
  import numpy as np
  from weit_jax import input_pipeline
  d = tmp_path_factory.mktemp("idx_learnable")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 320), ("t10k", 64)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 90, (n, 28, 28)).astype(np.uint8)
    for i, y in enumerate(labels):
      images[i, 2 + 2 * y:4 + 2 * y, 4:24] = 255
    write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
  data_dir = str(tmp_path_factory.mktemp("tfds_learnable"))

  def apply(config):
    config.data.idx_dir = str(d)
    config.data.data_dir = data_dir
    config.data.read_threads = 2
    config.data.prefetch_buffer_size = 16
    config.data.flip = False
    config.data.crop_padding = 0
    input_pipeline.prepare(config.data)
    return config
  return apply
