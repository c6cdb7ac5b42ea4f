"""What mapd says while it works: retries, waits, failures and budget lines go to the terminal above
the progress bars (through tqdm) and, while a folder is being written, to ``mapd.log`` in it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("mapd")


class _AboveTheBars(logging.Handler):
    """Writes each line with ``tqdm.write``, so it lands above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a closed terminal must not stop the run
            self.handleError(record)


def setup(verbosity: int = 0) -> None:
    """Terminal logging: -1 (``--quiet``) errors only, 0 warnings and retries, 1 (``-v``) everything."""
    level = {-1: logging.ERROR, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    terminal = _AboveTheBars(level)
    terminal.setFormatter(logging.Formatter("mapd: %(message)s"))
    log.handlers = [handler for handler in log.handlers if not isinstance(handler, _AboveTheBars)] + [terminal]
    log.setLevel(logging.DEBUG)
    log.propagate = False


@contextmanager
def to_file(folder: Path) -> Iterator[Path]:
    """Also append every line (all levels) to ``folder/mapd.log`` while the block runs."""
    path = Path(folder) / "mapd.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield path
    finally:
        log.removeHandler(handler)
        handler.close()
