"""metagrad: exact metagradients through whole training runs."""
