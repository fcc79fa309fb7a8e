"""The package's version (pyproject.toml states it too, for the build)."""

VERSION = "0.2.0"
