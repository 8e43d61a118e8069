"""Errors a user can cause. The CLI prints them as one line and exits non-zero; nothing else is caught."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's text (library errors can span pages), else its type name."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


class FastCifarError(Exception):
    """Base class: the message is shown to the user verbatim, so it names the file / key / expected form."""

    exit_code = 2


class DataError(FastCifarError):
    """A data source or store is missing, corrupt, malicious or of the wrong shape."""


class RecipeError(FastCifarError):
    """A recipe key is unknown, of the wrong type, or out of range. The message starts with the dotted key path."""


class CheckpointError(FastCifarError):
    """A checkpoint is missing, truncated, of another model, or refused by weights-only loading."""


class DiskFullError(FastCifarError):
    """A write ran out of space; the file it would have replaced is left as it was."""
