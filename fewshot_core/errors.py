"""User-facing errors.

A ``FsadError`` carries a one-line message that names the offending file and the fix; the CLI prints
it without a traceback and exits with ``exit_code``.
"""


class FsadError(Exception):
    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
