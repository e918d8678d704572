"""Test configuration: 8 host CPU devices, fast XLA compilation, one compilation cache.

The environment is set here, before any test module imports jax (XLA reads its
flags and JAX its cache settings when they initialise), and it is inherited by
the subprocesses the tests start:

* ``--xla_force_host_platform_device_count=8``: 8 CPU devices for the sharding tests.
* ``--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false``: the programs
  of the tests are tiny and compiling them is most of their time. XLA:CPU's LLVM back end at
  its default level spends seconds on a model's random initialiser alone, and its newer
  fusion emitters compile a train step about three times slower than the classic ones.
  These flags change how the machine code is generated and how fast it runs, not what it
  computes: the HLO passes run as usual, and results can differ from the defaults' in the
  last bit of a float32, as with any other compiler flag. A test comparing two runs bit for
  bit compiles both the same way (subprocesses inherit the flags). Set ``XLA_FLAGS``
  yourself to test with other flags.
* JAX's persistent compilation cache in a fresh directory of this session (removed at exit):
  a program compiled once (the same tiny train step of several runs, of a subprocess and its
  parent) is not compiled again.
"""

import atexit
import os
import shutil
import tempfile

DEVICES_FLAG = "--xla_force_host_platform_device_count"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"{DEVICES_FLAG}=8 {FAST_COMPILE}")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="tpgm_jax_tests_xla_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
