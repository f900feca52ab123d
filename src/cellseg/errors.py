"""The one error family a user sees: ``cellseg`` prints the message as one line, exit code 2.

Each message names the file or setting at fault and what to do. Anything else that escapes is a
bug and keeps its traceback.
"""


class CellsegError(Exception):
    """Base of every error the user can fix."""


class DataError(CellsegError):
    """Raw data or a converted dataset that is missing, unreadable or not what was pinned."""


class ConfigError(CellsegError, ValueError):
    """A profile or override that does not fit the training configuration."""


class CheckpointError(CellsegError):
    """A checkpoint or weights file that is missing, foreign, or does not fit the model."""


class TrainingError(CellsegError):
    """Training cannot start as asked."""


class InputError(CellsegError, ValueError):
    """An image a predictor cannot take."""


class JobFailed(CellsegError):
    """A training job on the cluster failed, was rejected, or did not finish in time."""


def one_line(value: object) -> str:
    """``value`` (a message or an exception) on one line: whitespace runs collapsed; an
    exception without a message gives its type's name."""
    text = " ".join(str("" if value is None else value).split())
    return text or (type(value).__name__ if isinstance(value, BaseException) else "")
