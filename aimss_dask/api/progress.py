"""Progress where work is long: Dask's own bar for graphs, a text bar for loaders and sinks.

``progress=None`` (the default everywhere) shows progress only where someone
watches: a terminal on stderr, or a Jupyter kernel. ``True`` always shows
it, ``False`` never does.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["Bar", "compute", "wanted"]


def wanted(progress: bool | None, stream: IO[str] | None = None) -> bool:
    """Whether to show progress: ``progress`` as given, or (None) whether anyone watches ``stream`` (stderr).

    >>> wanted(False), wanted(True)
    (False, True)
    """
    if progress is not None:
        if not isinstance(progress, bool):
            raise TypeError(f"progress={progress!r} must be True, False or None (show it where someone watches)")
        return progress
    stream = sys.stderr if stream is None else stream
    return _in_notebook() or _isatty(stream)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def compute(*collections: Any, progress: bool | None) -> tuple[Any, ...]:
    """``dask.compute(*collections)``, with Dask's progress bar when wanted and a distributed client is there."""
    import dask

    client = None
    if wanted(progress):
        from distributed import default_client

        try:
            client = default_client()
        except ValueError:
            client = None
    if client is None:
        return dask.compute(*collections)
    from distributed import progress as dask_progress

    futures = client.compute(list(collections))
    try:
        # A text bar that returns when all are done in a terminal; a widget
        # in a notebook, which returns at once (gather waits).
        dask_progress(futures)
        return tuple(client.gather(futures))
    finally:
        for f in futures:
            f.release()


class Bar:
    """A one-line text bar, ``desc: 40% |######      | 400/1000 rows [2.1 s, 190 rows/s]``.

    Redrawn in place (``\\r``) at most every ``interval`` seconds; ``total``
    None draws the count and rate only. Nothing is written when ``show`` is
    False.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = Bar(10, "sink", "rows", file=out, interval=0)
    >>> bar.update(4); bar.close(10)
    >>> out.getvalue().splitlines()[-1].startswith("sink: 100% |")
    True
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        *,
        file: IO[str] | None = None,
        show: bool = True,
        width: int = 30,
        interval: float = 0.1,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.file = sys.stderr if file is None else file
        self.show = show
        self.width = width
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int) -> None:
        """``done`` units so far (not an increment)."""
        self.done = done
        now = time.monotonic()
        if self.show and now - self._drawn >= self.interval:
            self._drawn = now
            self._draw(end="")

    def close(self, done: int | None = None) -> None:
        """Draw the last state and end the line."""
        if done is not None:
            self.done = done
        if self.show:
            self._draw(end="\n")

    def _draw(self, end: str) -> None:
        took = time.monotonic() - self.started
        rate = f", {self.done / took:,.0f} {self.unit}/s" if took > 0 else ""
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * self.width)
            line = (
                f"{self.desc}: {frac:4.0%} |{'#' * filled}{' ' * (self.width - filled)}| "
                f"{self.done:,}/{self.total:,} {self.unit} [{took:.1f} s{rate}]"
            )
        else:
            line = f"{self.desc}: {self.done:,} {self.unit} [{took:.1f} s{rate}]"
        self.file.write("\r" + line + end)
        self.file.flush()
