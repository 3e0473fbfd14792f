"""JAX's persistent compilation cache for the flows: compiled programs reused across runs.

:func:`configure` is called at the start of the PTQ, generation and model-report flows with their
``compilation_cache`` config field:

* ``"auto"`` (the default): ``$XDG_CACHE_HOME/svdquant_jax/jax_cache`` (``~/.cache/...`` when
  ``XDG_CACHE_HOME`` is unset);
* a folder: that folder;
* ``""``: off (no program is read from or written to disk).

A cached program is the one XLA would compile for the same computation, compiler and flags, so
results do not depend on whether it came from the cache. The cache is trusted: do not point it at
a folder that others can write to.
"""

from __future__ import annotations

import gc
import os

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

from svdquant_jax.utils.files import quiet_info_logs

AUTO = "auto"
# Programs that compile faster than this are not written (reading them back saves nothing).
MIN_COMPILE_TIME_SECS = 0.2
MIN_ENTRY_SIZE_BYTES = 0


def default_dir() -> str:
  """``$XDG_CACHE_HOME/svdquant_jax/jax_cache``, ``~/.cache/svdquant_jax/jax_cache`` without it."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "svdquant_jax", "jax_cache")


def resolve(setting: str | None) -> str | None:
  """The cache folder of a ``compilation_cache`` setting (``None``: off)."""
  if setting is None or not str(setting).strip():
    return None
  setting = str(setting).strip()
  return default_dir() if setting == AUTO else os.path.abspath(os.path.expanduser(setting))


def configure(setting: str | None = AUTO) -> str | None:
  """Points JAX's persistent compilation cache at the folder of ``setting`` (or turns it off).

  Returns:
    The folder in use, or ``None`` when the cache is off.
  """
  path = resolve(setting)
  if path is not None:
    os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    with quiet_info_logs():  # (an INFO line "Resetting cache at ...")
      _jax_cache.reset_cache()  # the cache binds its folder at the first compile; a new folder needs a reset
  if path is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
  return path


# Every compiled XLA CPU program holds ~6 memory mappings until it is freed. A process that compiles
# thousands of programs (a PTQ run with several methods, the test suite) reaches the kernel's
# vm.max_map_count (65530 by default); the next mapping fails ("LLVM compilation error: Cannot
# allocate memory") and XLA's compiler crashes (SIGSEGV; reproduced at 65,000 mappings, while a
# process at 30,000 compiles on).
MAX_MAPPINGS = 30_000


def memory_mappings() -> int:
  """How many memory mappings this process holds (``/proc/self/maps``; 0 where there is none)."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


def release_compiled_programs(limit: int = MAX_MAPPINGS) -> bool:
  """Drops JAX's in-memory compiled programs (``jax.clear_caches``) once the process holds more
  than ``limit`` memory mappings; returns whether it did. What runs next recompiles (or reads the
  persistent cache)."""
  if memory_mappings() <= limit:
    return False
  jax.clear_caches()
  gc.collect()
  return True
