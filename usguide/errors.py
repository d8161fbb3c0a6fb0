"""Typed errors of usguide.

Every error names the file (or device) and the reason in one line, so the CLI can print it as it is
and exit with code 2. Messages never carry header values such as patient names.
"""

from __future__ import annotations

from os import PathLike


class UsguideError(Exception):
    """Base of every error usguide raises on bad input.

    Parameters
    ----------
    source : str or PathLike
        The file, folder or device the error is about.
    reason : str
        What is wrong, in plain words.
    """

    def __init__(self, source: str | PathLike[str], reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self) -> tuple[type[UsguideError], tuple[str, str]]:
        # Survives pickling (a pipeline in another process raises it in its parent).
        return self.__class__, (self.source, self.reason)


class SourceNotFoundError(UsguideError, FileNotFoundError):
    """The file or folder does not exist."""


class NoPixelDataError(UsguideError):
    """A readable file that holds no image (for example a DICOM structured report)."""


class CorruptSourceError(UsguideError):
    """A file that is truncated or cannot be decoded."""


class UnsupportedFormatError(UsguideError):
    """A file of a kind or encoding usguide cannot read (for example a transfer syntax)."""


class EmptySourceError(UsguideError):
    """A source that opens but delivers no frame (an empty video or folder)."""


class DeviceError(UsguideError):
    """A live capture device that cannot be opened or stopped delivering frames."""


class TruncatedSourceWarning(UserWarning):
    """A file ends before the frames its header announces; the intact frames are still read."""


class CalibrationWarning(UserWarning):
    """Calibration found in a file was rejected; spacing is unknown (None) instead."""
