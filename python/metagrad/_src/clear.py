"""``metagrad.clear_cache``: every cache of compiled work, in one call."""

from metagrad._src import baselines, cache, compiled


def clear_cache(*, disk: bool = False) -> None:
    """Forget the tasks compiled in this process and JAX baselines' compilations;
    ``disk=True`` also empties the persistent compile cache (``$METAGRAD_CACHE_DIR``,
    by default ``~/.cache/metagrad``)."""
    compiled.forget_compiled()
    baselines.clear_cache()
    if disk:
        cache.clear()
