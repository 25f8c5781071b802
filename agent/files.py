"""Small file helpers shared by the handlers and the volume backends."""

import contextlib
import os


def fsync_path(path, directory=False):
    """fsync a file, or a directory (to make a rename or unlink durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
