"""Shared test setup: the flows' persistent compilation cache goes to a temporary folder, and the
number of compiled programs held by the test process stays bounded (see ``MAX_MAPPINGS``).

The PTQ, generation and model-report flows turn JAX's persistent compilation cache on by default
under ``$XDG_CACHE_HOME/svdquant_jax/jax_cache`` (``svdquant_jax.utils.compile_cache``). The
tests run those flows in-process and as subprocesses (which inherit the environment), so
``XDG_CACHE_HOME`` points at one temporary folder for the whole session: nothing is written
into the user's home, and the tests' runs share their compiled programs.
"""

import gc
import os

import jax
import pytest

import torch_refs

# peft (a test-only reference) imports torchvision, whose CPU wheel lacks operator schemas that
# transformers' import chain needs: define them before any test module imports diffusers.
torch_refs.import_torchvision()


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache_in_tmp(tmp_path_factory):
  saved = os.environ.get("XDG_CACHE_HOME")
  os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
  yield
  if saved is None:
    os.environ.pop("XDG_CACHE_HOME", None)
  else:
    os.environ["XDG_CACHE_HOME"] = saved


# Every compiled XLA CPU program holds ~6 memory mappings until it is freed. The whole suite
# compiles thousands of programs in one process, and past the kernel's vm.max_map_count (65530
# by default) the next mapping fails ("LLVM compilation error: Cannot allocate memory") and XLA's
# compiler crashes with SIGSEGV (reproduced: a process holding 65,000 mappings crashes on its next
# compile; at 30,000 it compiles on). Between tests, once
# the process holds more than MAX_MAPPINGS mappings, the compiled programs are dropped (the next
# test recompiles what it needs).
MAX_MAPPINGS = 30_000


def _mapping_count() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
  yield
  if _mapping_count() > MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()
