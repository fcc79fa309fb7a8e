"""Progress of a long run in the runtime: a tqdm bar fed from C++.

The runner calls back between executions (at most every 50 ms) with the
steps done and the total; the bar is drawn only when stderr is a terminal
(``disable=None``) and only for runs that last over a second (``delay``), so
scripts, logs and short calls stay quiet.
"""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm


@contextlib.contextmanager
def steps_bar(description: str, enabled: bool | None):
    """A ``progress(done, total)`` callable for the runner (None when ``enabled`` is False).

    ``enabled``: None draws on a terminal only, True always, False never.
    """
    if enabled is False:
        yield None
        return
    bar = tqdm(desc=description, unit="step", file=sys.stderr, delay=1.0, leave=False,
               disable=None if enabled is None else False)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        bar.close()
