"""The one error type users see: bad input, reported as one line and exit code 2 by the CLI."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input (file, config, flag). Message names the file, line or row, and field.

    The CLI prints ``preftune: error: <message>`` and exits with code 2, no traceback.
    Raise it *before* anything is written to an output folder.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = "" if path is None else f"{path}: " if line is None else f"{path}:{line}: "
        what = f"field '{field}': " if field is not None else ""
        self.path, self.line, self.field = path, line, field  # for callers (and tests) that need the parts
        self.message = message
        super().__init__(f"{where}{what}{message}")


def did_you_mean(word: str, choices: list[str], quote: str = "'") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {quote}{close[0]}{quote}?)" if close else ""


def one_line(e: BaseException) -> str:
    """An exception's first line for a one-line error (its type's name when it says nothing)."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN/inf. The last good checkpoint is left intact."""
