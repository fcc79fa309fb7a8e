"""Fixtures shared by the test files."""

import jax
import pytest


@pytest.fixture
def x64():
    """Float64 mode for one test (finite differences), restored afterwards."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)
