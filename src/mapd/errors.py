"""The one exception type the CLI turns into a single clear line (no traceback)."""


class MapdError(Exception):
    """A problem the user can fix: bad input, a missing file, a bad config field.

    The message names the file, line or field at fault. The CLI prints it as one
    line and exits non-zero; nothing already computed is deleted.
    """
