"""Fixtures shared by the test files."""

import gc
import os
import shutil
import tempfile

import jax
import pytest

import metagrad

# The suite runs on a disk cache of its own, empty when it starts (its child
# processes inherit it): a developer's cache may hold programs that the code
# under test would no longer build.
CACHE_DIR = tempfile.mkdtemp(prefix="metagrad-test-cache-")
os.environ["METAGRAD_CACHE_DIR"] = CACHE_DIR
os.environ.pop("METAGRAD_CACHE", None)


@pytest.fixture(autouse=True, scope="session")
def remove_the_test_cache():
    yield
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


@pytest.fixture
def x64():
    """Float64 mode for one test (finite differences), restored afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop each test file's compiled programs when it ends. XLA's CPU JIT maps 3-4
    memory regions per executable, and the whole suite in one process otherwise
    passes Linux's 65530 mappings (vm.max_map_count): LLVM then crashes on a failed
    mmap (a segfault inside jax's compile, seen in the last test file)."""
    yield
    jax.clear_caches()
    metagrad.clear_cache()
    gc.collect()
