"""The tool's exceptions: a failure the user can act on, and its exit status."""

from __future__ import annotations


class OverlayError(Exception):
    """A failure the user can act on; the message says what to do. Exit status 1."""

    exit_code = 1


class UnsupportedRelease(OverlayError):
    """The release is not in patches/releases.toml. Exit status 2."""

    exit_code = 2


class NotOnCPU(UnsupportedRelease):
    """The release is listed but does not run on CPU (``cpu = false``): nothing CPU-only is built for it.
    Exit status 2."""
