"""Test configuration: 8 host CPU devices, fast XLA compilation, one compilation cache.

The environment is set here, before any test module imports jax (XLA reads its
flags and JAX its cache settings when they initialise), and it is inherited by
the subprocesses the tests start:

* ``--xla_force_host_platform_device_count=8``: 8 CPU devices for the sharding tests.
* ``--xla_backend_optimization_level=0``: the programs of the tests are tiny and compiling
  them is most of their time; XLA:CPU's LLVM back end at its default level spends seconds
  on a model's random initialiser alone. The level changes how fast the machine code runs,
  not what it computes (the HLO passes run as usual; results can differ in the last bit of a
  float32, like any other compiler flag); a test comparing two runs bit for bit compiles
  both the same way. Set ``XLA_FLAGS`` yourself to test with other flags.
* JAX's persistent compilation cache in a fresh directory of this session (removed at exit):
  a program compiled once (the same tiny train step of several runs, of a subprocess and its
  parent) is not compiled again.
"""

import atexit
import os
import shutil
import tempfile

DEVICES_FLAG = "--xla_force_host_platform_device_count"
os.environ.setdefault("XLA_FLAGS", f"{DEVICES_FLAG}=8 --xla_backend_optimization_level=0")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="tpgm_jax_tests_xla_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
