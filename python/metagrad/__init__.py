"""metagrad: exact metagradients through whole training runs."""

from metagrad.task import Task

__all__ = ["Task"]
