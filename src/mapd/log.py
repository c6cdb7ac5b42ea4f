"""What mapd says while it works. Every line goes through logging: results (what a command reports, on
the ``mapd.out`` logger) to standard output as they are, everything else (retries, waits, failures, budget
lines, each call at ``-v``) to standard error with a ``mapd:`` prefix, both above the progress bars
(through tqdm); and, while a folder is being written, every line of every level to ``mapd.log`` in it,
a fatal error or an interrupt included."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from mapd.errors import MapdError

log = logging.getLogger("mapd")
out = logging.getLogger("mapd.out")  # a command's results: standard output, no prefix


def say(text: str) -> None:
    """A command's result line (what a print would have said): standard output, and mapd.log."""
    if not any(isinstance(handler, _AboveTheBars) for handler in log.handlers):
        setup()  # mapd used as a library, no `mapd` command set logging up: results show as the command's would
    out.info(text.rstrip("\n"))


def _is_result(record: logging.LogRecord) -> bool:
    return record.name == out.name


class _Redaction(logging.Filter):
    """The one filter on every handler mapd makes (the terminal's, each mapd.log's): it runs each record through
    the filters registered with :func:`redact_with` (mapd.secrets.protect_logs's redactor), so that a record of
    any mapd logger, the child loggers' included, is redacted wherever mapd writes it."""

    def __init__(self) -> None:
        super().__init__()
        self._filters: tuple[logging.Filter, ...] = ()

    def add(self, record_filter: logging.Filter) -> None:
        if record_filter not in self._filters:
            self._filters += (record_filter,)

    def filter(self, record: logging.LogRecord) -> bool:
        return all(record_filter.filter(record) for record_filter in self._filters)


_REDACTION = _Redaction()


def redact_with(record_filter: logging.Filter) -> None:
    """Pass every record that mapd's handlers write through ``record_filter`` first (it may rewrite the record)."""
    _REDACTION.add(record_filter)


class _AboveTheBars(logging.Handler):
    """Writes each line with ``tqdm.write``, so it lands above the progress bars instead of through them:
    the results to standard output, the rest to standard error."""

    def __init__(self, level: int, results: bool) -> None:
        super().__init__(level)
        self.results = results
        self.addFilter(lambda record: _is_result(record) == results)
        self.addFilter(_REDACTION)
        self.setFormatter(logging.Formatter("%(message)s" if results else "mapd: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout if self.results else sys.stderr)
        except Exception:  # a closed terminal must not stop the run
            self.handleError(record)


def setup(verbosity: int = 0) -> None:
    """Terminal logging: -1 (``--quiet``) errors only, 0 results, warnings and retries, 1 (``-v``) also
    every call (teacher, key, status, attempts, latency, tokens)."""
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    terminals = [_AboveTheBars(level, results=False), _AboveTheBars(level, results=True)]
    log.handlers = [handler for handler in log.handlers if not isinstance(handler, _AboveTheBars)] + terminals
    log.setLevel(logging.DEBUG)
    log.propagate = False


INTERRUPTED = "interrupted; rerun the same command to continue where it stopped"
TERMINAL_ONLY = "terminal_only"  # a record with this attribute set goes to the terminal, not to mapd.log


def end(exc: BaseException) -> None:
    """Print the line that ends a command stopped by ``exc`` (the folder's mapd.log has it already, from
    :func:`to_file`; a mapd.log of another command in this process does not get it)."""
    log.error(ending(exc), extra={TERMINAL_ONLY: True})


def ending(exc: BaseException) -> str:
    """The line that ends a command stopped by ``exc``: ``error: ...`` or the interrupt."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    return f"error: {exc}" if isinstance(exc, MapdError) else f"error: {type(exc).__name__}: {exc}"


@contextmanager
def to_file(folder: Path) -> Iterator[Path]:
    """Also append every line (all levels) to ``folder/mapd.log`` while the block runs."""
    path = Path(folder) / "mapd.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(lambda record: not getattr(record, TERMINAL_ONLY, False))
    handler.addFilter(_REDACTION)
    log.addHandler(handler)
    try:
        yield path
    except (Exception, KeyboardInterrupt) as exc:  # the error or interrupt that ends the command: in the file too
        traceback = None if isinstance(exc, (KeyboardInterrupt, MapdError)) else (type(exc), exc, exc.__traceback__)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, ending(exc), None, traceback)
        handler.handle(record)  # (the handler's filters redact it)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
