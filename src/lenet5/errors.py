"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """A foreign exception's message (a library's, often several lines) as one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class Lenet5Error(Exception):
    """Base class: the message names the file or option and what is wrong with it."""


class DataError(Lenet5Error):
    """A data file is missing, corrupt, truncated or not what it claims to be."""


class DownloadError(DataError):
    """No mirror delivered a file that passed verification."""


class ConfigError(Lenet5Error):
    """An impossible or inconsistent option."""


class CheckpointError(Lenet5Error):
    """A checkpoint or run folder that cannot be read or resumed."""


class FileWriteError(Lenet5Error, OSError):
    """A file could not be written: a full disk, no permission, a read-only file system.

    Also an OSError (with its errno), so code that tolerates failed writes can still catch those."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()
