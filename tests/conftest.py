"""Shared test setup: the flows' persistent compilation cache goes to a temporary folder, and the
number of compiled programs held by the test process stays bounded (``compile_cache.MAX_MAPPINGS``).

The PTQ, generation and model-report flows turn JAX's persistent compilation cache on by default
under ``$XDG_CACHE_HOME/svdquant_jax/jax_cache`` (``svdquant_jax.utils.compile_cache``). The
tests run those flows in-process and as subprocesses (which inherit the environment), so
``XDG_CACHE_HOME`` points at one temporary folder for the whole session: nothing is written
into the user's home, and the tests' runs share their compiled programs.
"""

import os

import pytest

import torch_refs

from svdquant_jax.utils import compile_cache

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


# The suite compiles thousands of programs in one process: between tests, past
# compile_cache.MAX_MAPPINGS memory mappings, the compiled programs are dropped (the next test
# recompiles what it needs), as the PTQ flow does between methods (utils/compile_cache.py says why).
@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
  yield
  compile_cache.release_compiled_programs()
