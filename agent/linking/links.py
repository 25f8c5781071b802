"""Atomic symlinks in ``_base``: a reader sees the old link or the new
one, never none."""

import contextlib
import os

from agent import naming


def link_atomically(target, link_path):
    tmp = naming.temp_filenames(link_path)[0]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link_path)
    fd = os.open(os.path.dirname(link_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_target(link_path):
    try:
        return os.readlink(link_path)
    except OSError:
        return None
