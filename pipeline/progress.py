"""How a run tells a person where it is.

In a terminal, Ray Data draws its own progress bars. In a log (stdout not a terminal: a
submitted job, CI, ``> run.log``) Ray Data instead writes a dozen-line report every ten
seconds, hundreds of lines per run; there the driver turns Ray Data's report off and
writes one line of its own per interval, plus a line per stage of the run.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from netloupe.contract.errors import netloupe_cause

PROGRESS_INTERVAL_S = 30.0
"""Seconds between two progress lines of the explain pass in a log."""


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``: a duration as a person reads it."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def size(n_bytes: int) -> str:
    """``812 KB``, ``81.4 MB``, ``3.20 GB``."""
    if n_bytes < 1e6:
        return f"{n_bytes / 1e3:.0f} KB"
    if n_bytes < 1e9:
        return f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e9:.2f} GB"


def count(n: int, noun: str) -> str:
    """``1 layer``, ``3 layers``, ``12,000 instances``, ``10 classes``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n:,} {noun}" + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


class RunProgress:
    """Reports nothing: the base of the reporters, and what a library caller gets by default."""

    ray_bars = False
    """Whether Ray Data shows its own progress (bars in a terminal)."""

    def configure_ray_data(self, context) -> None:
        """Set Ray Data (its ``DataContext``, already imported) to report as this reporter wants."""
        context.enable_progress_bars = self.ray_bars
        _filter_ray_data_console(only_warnings=not self.ray_bars)

    def stage(self, text: str) -> None:
        """A stage of the run began or ended (validation, explain pass, projections, catalog)."""

    def explaining(self, total: int) -> None:
        """The explain pass starts on ``total`` instances."""

    def explained(self, rows: int) -> None:
        """Another batch of ``rows`` instances is done."""

    def explaining_done(self) -> None:
        """The explain pass ended (finished or failed)."""


class ProgressLines(RunProgress):
    """One line per stage, and one line per :data:`PROGRESS_INTERVAL_S` of the explain pass
    (instances done, rate, time left), written by ``write``."""

    def __init__(self, write: Callable[[str], None] = print, interval_s: float = PROGRESS_INTERVAL_S):
        self.write = write
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.total = 0
        self.done = 0
        self._explain_started = 0.0
        self._first: tuple[float, int] | None = None
        """When the first batch arrived and its rows: the rate is measured from there, since the
        workers' start (model load, chunk tuning) would make the first minutes look slow."""
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def stage(self, text: str) -> None:
        self.write(f"[{duration(time.monotonic() - self.started):>10}] {text}")

    def explaining(self, total: int) -> None:
        self.total, self.done, self._first = total, 0, None
        self._explain_started = time.monotonic()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, name="netloupe-progress", daemon=True)
        self._ticker.start()

    def explained(self, rows: int) -> None:
        self.done += rows
        if self._first is None:
            self._first = (time.monotonic(), rows)

    def explaining_done(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None

    def line(self) -> str:
        """The explain pass's state: ``explained 12,288 of 50,000 instances (25%), 410/s, about 1 min 32 s left``."""
        share = self.done / self.total if self.total else 1.0
        text = f"explained {self.done:,} of {self.total:,} instances ({share:.0%})"
        if self._first is None:
            return text + "; the workers are starting and explaining their first batches"
        first_time, first_rows = self._first
        since = time.monotonic() - first_time
        if self.done == first_rows or since <= 0:
            return text
        rate = (self.done - first_rows) / since
        return text + f", {rate:,.0f} per second, about {duration((self.total - self.done) / rate)} left"

    def _tick(self) -> None:
        # A timer, not a synchronisation: the line goes out whether or not a batch arrived.
        while not self._stop.wait(self.interval_s):
            self.stage(self.line())


class RayBars(ProgressLines):
    """In a terminal: Ray Data's bars for the passes, a line per stage."""

    ray_bars = True

    def explaining(self, total: int) -> None:
        self.total, self.done = total, 0

    def explaining_done(self) -> None:
        pass


class _OnlyWarnings(logging.Filter):
    """Ray Data's console notices below warnings ("Starting execution of...", execution plans,
    "finished in...") and its warning that its progress bars are off: the driver's own lines
    say the same. Its log file keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "Progress bars disabled" not in record.getMessage()


class _NoTracebackForKnownErrors(logging.Filter):
    """Ray Data logs a worker's exception with its whole traceback before re-raising it (and
    calls it a Ray bug to report); for a :class:`NetloupeError` the CLI prints the one-line
    message, so that is noise. Ray logs while handling the error, so ``sys.exc_info`` has it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return error is None or netloupe_cause(error) is None


def _filter_ray_data_console(only_warnings: bool) -> None:
    """Set the filters of Ray Data's console handler (its log file keeps everything) for
    this run; a later run in the same process (a notebook) may want its notices back."""
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, SessionFileHandler):
            continue
        for kind, wanted in ((_NoTracebackForKnownErrors, True), (_OnlyWarnings, only_warnings)):
            present = [f for f in handler.filters if isinstance(f, kind)]
            if wanted and not present:
                handler.addFilter(kind())
            for extra in present if not wanted else []:
                handler.removeFilter(extra)


def progress_for(stream=None) -> RunProgress:
    """Ray Data's bars when ``stream`` (default stdout) is a terminal, else lines for a log."""
    stream = stream or sys.stdout
    write = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    return RayBars(write) if stream.isatty() else ProgressLines(write)
