"""The exceptions the CLI turns into one clear line (no traceback), and their exit codes.

Exit codes (docs/reliability.md#exit-codes): 0 done; 1 a command mapd ran failed (the training launcher:
mapd.serve.CommandFailed); 2 bad input or config (nothing was changed);
3 a stage ended incomplete (calls failed or were not made: every record it has is written, and a
rerun makes only the missing calls); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM, handled like Ctrl-C).
"""


class MapdError(Exception):
    """A problem the user can fix: bad input, a missing file, a bad config field.

    The message names the file, line or field at fault. The CLI prints it as one
    line and exits non-zero; nothing already computed is deleted.
    """

    exit_code = 2


class IncompleteStage(MapdError):
    """A stage finished with calls that failed or were not made (the budget, a stopped teacher).

    Its records are written (failed calls as records with an error); rerunning the same command
    makes only the calls still missing. ``summary``, when given, is what the stage did so far: ``mapd run``
    records it in the manifest beside the ``incomplete`` status.
    """

    exit_code = 3

    def __init__(self, message: str, *, summary: dict | None = None):
        super().__init__(message)
        self.summary = summary
