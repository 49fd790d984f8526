"""Progress reporting for long work: a rich bar on a terminal, plain log lines elsewhere.

Batch systems (SLURM, CI) capture stderr into files where a redrawn bar becomes
thousands of lines, so when stderr is not a TTY the reporter writes one log line
at most every ``log_interval_s`` seconds (and one at the end) instead.

Usage::

    with progress_reporter(total=len(tiles), description="segmenting") as progress:
        for tile in tiles:
            ...
            progress.advance()
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

LOGGER_NAME = "nuclei_app"


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The package logger (or a child of it, e.g. ``nuclei_app.segment``)."""
    return logging.getLogger(name)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record.

    A handler bound to the stream of the moment would keep writing to a replaced
    stream (pytest's capture, a pipeline redirecting stderr after start-up).
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401 - property of logging.StreamHandler
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the package's log records to stderr as ``nuclei-app: message`` lines.

    Idempotent: a handler is added only when the package logger has none, so a
    pipeline that configured logging itself keeps its own handlers.
    """
    logger = get_logger()
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("nuclei-app: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


class ProgressReporter:
    """Count finished work units and show it (rich bar on a TTY, log lines otherwise).

    Parameters
    ----------
    total : int
        Number of work units expected.
    description : str
        Short text shown before the bar or at the start of each log line.
    enabled : bool
        False silences the reporter entirely (library use, tests).
    logger : logging.Logger, optional
        Where log lines go when stderr is not a terminal.
    log_interval_s : float
        Minimum seconds between two log lines.
    use_bar : bool, optional
        Force the bar on (True) or off (False); default: on when stderr is a TTY.
    """

    def __init__(
        self,
        total: int,
        description: str,
        enabled: bool = True,
        logger: logging.Logger | None = None,
        log_interval_s: float = 5.0,
        use_bar: bool | None = None,
    ) -> None:
        self.total = int(total)
        self.description = description
        self.enabled = enabled
        self.done = 0
        self.logger = logger or get_logger()
        self.log_interval_s = log_interval_s
        self.use_bar = (sys.stderr.isatty() if use_bar is None else use_bar) and enabled
        self._bar: Any = None
        self._task: Any = None
        self._last_log = 0.0
        self._started = time.monotonic()

    def __enter__(self) -> "ProgressReporter":
        if self.use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        self._started = time.monotonic()
        self._last_log = self._started
        return self

    def advance(self, count: int = 1) -> None:
        """Record ``count`` more finished units."""
        self.done += count
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=count)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s and self.done < self.total:
            self._last_log = now
            self._log_line(now)

    def _log_line(self, now: float) -> None:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        self.logger.info(
            "%s: %d/%d (%.0f%%, %.1f s)", self.description, self.done, self.total, percent, now - self._started
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.enabled and exc_type is None:
            self._log_line(time.monotonic())


def progress_reporter(total: int, description: str, enabled: bool = True, **options: Any) -> ProgressReporter:
    """A `ProgressReporter` to use as a context manager (see module docstring)."""
    return ProgressReporter(total, description, enabled=enabled, **options)
